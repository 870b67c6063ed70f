"""One-call inference for a LazyConfig recipe, result files and drawings.

:class:`Predictor` is the supported way from an image to Detectron2's outputs (it replaces
Detectron2's yacs-based ``DefaultPredictor``)::

    from itpn_d2 import Predictor

    predictor = Predictor("configs/coco/mask_rcnn_itpn_b.py", "model_final.pth")
    instances = predictor("photo.jpg")["instances"]  # boxes etc. in photo.jpg's pixels

:func:`predict_files` runs a predictor over image files and writes ``predictions.json``
(COCO results for detection, PNG label maps for segmentation) and drawings; it is
``tools/predict.py``. :func:`draw_instances` and :func:`draw_sem_seg` are the drawings of
``tools/visualize_predictions.py`` and ``tools/visualize_semseg.py`` too.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import detectron2.data.transforms as T
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import SemanticSegmentor
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger

from ..checkpoint import CheckpointError
from ..errors import UserError, run_cli
from .checkpoint import ITPNCheckpointer
from .config import apply_overrides, load_config
from .data import config_dataset_names, read_image

__all__ = ["IMAGE_EXTENSIONS", "InputError", "Predictor", "draw_instances", "draw_sem_seg",
           "list_images", "predict_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CHANNEL_ORDERS = ("RGB", "BGR")


class InputError(UserError, FileNotFoundError):
    """An input image (or folder of images) that does not exist or holds no image."""


def _test_metadata(cfg) -> Metadata:
    """Metadata (class names, category ids) of the config's test dataset, when it is known."""
    names = config_dataset_names(cfg, splits=("test",))
    if not names:
        return Metadata()
    if names[0] not in DatasetCatalog.list() and names[0].startswith("itpn_toy"):
        from ..data.toy import register_toy_datasets

        try:
            register_toy_datasets()
        except FileNotFoundError:  # no toy data here: name the classes all the same
            from ..data.toy import toy_class_names

            classes = toy_class_names()
            if "sem_seg" in names[0]:
                return Metadata(stuff_classes=["background", *classes])
            return Metadata(thing_classes=classes)
    if names[0] not in DatasetCatalog.list():
        return Metadata()
    return MetadataCatalog.get(names[0])


class Predictor:
    """A recipe's model with its weights and test-time resize, called on one image at a time.

    Args:
        config: a LazyConfig recipe path (``configs/...py``) or a loaded config (not modified).
        checkpoint: weights to load with :class:`~itpn_d2.d2.ITPNCheckpointer` (a Detectron2
            checkpoint of the recipe, or a pretraining / exported / converted one); ``None``:
            the config's ``train.init_checkpoint``; ``""``: none (random weights, for tests).
        device: ``"cuda"``, ``"cpu"``... (``None``: CUDA when available, else the CPU).
        overrides: ``key=value`` config overrides, as on the command lines.
        input_format: channel order of the **arrays** given to :meth:`__call__`: ``"RGB"``
            (PIL, imageio, matplotlib) or ``"BGR"`` (OpenCV). Image files are read by the
            predictor (EXIF orientation applied) and need no such setting.
        allow_random: run even when ``checkpoint`` leaves part of the model random (a
            pretraining checkpoint leaves the heads random); otherwise that is a
            :class:`~itpn_d2.checkpoint.CheckpointError`.

    Calling it on an image returns Detectron2's output for that image, in the coordinates of
    the image as given: ``{"instances": Instances}`` (boxes, scores, classes, full-image masks)
    for R-CNN recipes, ``{"sem_seg": (num_classes, H, W) logits}`` for segmentation recipes
    (the segmentor's own whole-image or sliding-window inference).
    """

    def __init__(self, config: Union[str, Path, Any], checkpoint: Optional[str] = None, *,
                 device: Optional[str] = None, overrides: Sequence[str] = (),
                 input_format: str = "RGB", allow_random: bool = False):
        if input_format not in CHANNEL_ORDERS:
            raise ValueError(f"input_format must be one of {CHANNEL_ORDERS}, got "
                             f"{input_format!r}")
        if isinstance(config, (str, Path)):
            self.cfg = load_config(str(config), overrides)
        else:
            self.cfg = apply_overrides(copy.deepcopy(config), overrides)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.input_format = input_format
        self.model = instantiate(self.cfg.model).to(self.device).eval()
        if checkpoint is None:
            checkpoint = self.cfg.train.get("init_checkpoint", "")
        if checkpoint:
            checkpointer = ITPNCheckpointer(self.model)
            checkpointer.load(checkpoint)
            if not allow_random:
                checkpointer.require_trained("pass allow_random=True, --allow-random-weights "
                                             "in itpn-predict,")
        else:
            logger.warning("Predictor: no checkpoint given, the model has random weights")
        self.checkpoint = checkpoint or None
        # The model's own channel order (RGB for iTPN checkpoints).
        self.model_format = getattr(self.model, "input_format", "RGB")
        augmentations = instantiate(self.cfg.dataloader.test.mapper.augmentations)
        self.augmentations = T.AugmentationList(list(augmentations))
        self.task = "sem_seg" if isinstance(self.model, SemanticSegmentor) else "instances"
        self.metadata = _test_metadata(self.cfg)

    def read_image(self, path: Union[str, Path]) -> np.ndarray:
        """``path`` as an ``(H, W, 3)`` uint8 array in the model's channel order, with its EXIF
        orientation applied (:func:`~itpn_d2.d2.data.read_image`, as in training)."""
        if not Path(path).is_file():
            raise InputError(f"input image {path} does not exist")
        return read_image(str(path), format=self.model_format)

    def __call__(self, image: Union[str, Path, np.ndarray]) -> Dict[str, Any]:
        """Predict one image: a file path or an ``(H, W, 3)`` uint8 array in ``input_format``
        channel order. Returns ``{"instances": ...}`` or ``{"sem_seg": ...}`` (tensors on
        ``self.device``) in the coordinates of the image as given."""
        if isinstance(image, (str, Path)):
            array = self.read_image(image)
            if 0 in array.shape:
                raise InputError(f"input image {image} is empty ({array.shape[1]}x"
                                 f"{array.shape[0]} pixels)")
            return self._predict(array)
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 \
                or 0 in array.shape:
            raise ValueError(f"expected a non-empty (H, W, 3) uint8 image array, got shape "
                             f"{array.shape} and dtype {array.dtype}")
        if self.input_format != self.model_format:
            array = array[:, :, ::-1]
        return self._predict(array)

    @torch.no_grad()
    def _predict(self, array: np.ndarray) -> Dict[str, Any]:
        """``array``: ``(H, W, 3)`` uint8 in the model's channel order."""
        height, width = array.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(array))
        self.augmentations(aug_input)  # the recipe's test-time resize
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        inputs = {"image": tensor.to(self.device), "height": height, "width": width}
        return self.model([inputs])[0]


# ------------------------------------------------------------------------------- drawings


def draw_instances(image: np.ndarray, instances: Instances, metadata=None) -> np.ndarray:
    """``image`` (H, W, 3 RGB uint8) with ``instances`` (boxes, classes, scores, masks) drawn
    by Detectron2's ``Visualizer`` (class names from ``metadata.thing_classes``)."""
    from detectron2.utils.visualizer import ColorMode, Visualizer  # matplotlib: 1 s to import

    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances.to("cpu")).get_image()


def draw_sem_seg(image: np.ndarray, labels: np.ndarray, metadata=None, opacity: float = 0.5
                 ) -> np.ndarray:
    """``image`` (H, W, 3 RGB uint8) with ``labels`` (H, W class ids) drawn over it; pixels
    with the ignore label are left as they are."""
    from detectron2.utils.visualizer import Visualizer

    return Visualizer(image, metadata).draw_sem_seg(labels, alpha=opacity).get_image()


# ---------------------------------------------------------------------------- result files


def list_images(inputs: Sequence[Union[str, Path]]) -> List[Path]:
    """Image files named by ``inputs`` (files, or folders whose images are taken in name
    order, not recursively)."""
    paths: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"input folder {item} holds no image "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise InputError(f"input {item} does not exist (give image files or folders)")
    return paths


def _dataset_category_ids(metadata) -> Optional[List[int]]:
    """Dataset category id of each contiguous class id (COCO ids are not 0..K-1), if known."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if mapping is None and getattr(metadata, "json_file", None) \
            and Path(metadata.json_file).is_file():
        with open(metadata.json_file) as f:  # Detectron2 maps sorted ids to 0..K-1
            ids = sorted(c["id"] for c in json.load(f)["categories"])
        mapping = {cat: i for i, cat in enumerate(ids)}
    if mapping is None:
        return None
    return [cat for cat, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _unique_stem(path: Path, used: set) -> str:
    stem, k = path.stem, 1
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def predict_files(predictor: Predictor, inputs: Sequence[Union[str, Path]],
                  output: Union[str, Path], *, score_threshold: float = 0.5,
                  visualize: bool = True, progress: bool = True) -> Path:
    """Run ``predictor`` on every image of ``inputs`` and write ``output/predictions.json``.

    Detection: a COCO results list, one entry per detection with ``image_id`` (position of the
    image in the input order), ``file_name``, ``category_id`` (the dataset's category id when
    its metadata gives one, else the contiguous class id), ``bbox`` (x, y, w, h in image
    pixels), ``score`` and ``segmentation`` (COCO RLE); detections below ``score_threshold``
    are left out (0 keeps all, as COCO evaluation wants). Segmentation: one entry per image with
    ``file_name``, ``height``, ``width`` and ``sem_seg_file_name``, a PNG label map of class ids
    under ``output/sem_seg/``. With ``visualize``, drawings go to ``output/vis/<stem>.png``.
    Returns the path of ``predictions.json``.
    """
    paths = list_images(inputs)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.task == "sem_seg":
        (out_dir / "sem_seg").mkdir(exist_ok=True)
    if visualize:
        (out_dir / "vis").mkdir(exist_ok=True)
    category_ids = _dataset_category_ids(predictor.metadata)
    records: List[Dict[str, Any]] = []
    used: set = set()
    for index, path in enumerate(tqdm(paths, desc="predict", unit="image",
                                      disable=not progress)):
        image = predictor.read_image(path)  # the model's channel order
        output_dict = predictor._predict(image)
        rgb = np.ascontiguousarray(image if predictor.model_format == "RGB" else image[:, :, ::-1])
        stem = _unique_stem(path, used)
        if predictor.task == "sem_seg":
            labels = output_dict["sem_seg"].argmax(dim=0).cpu().numpy()
            label_file = f"sem_seg/{stem}.png"
            dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
            Image.fromarray(labels.astype(dtype)).save(out_dir / label_file)
            records.append({"file_name": str(path), "height": int(labels.shape[0]),
                            "width": int(labels.shape[1]), "sem_seg_file_name": label_file})
            drawn = draw_sem_seg(rgb, labels, predictor.metadata) if visualize else None
        else:
            instances = output_dict["instances"].to("cpu")
            instances = instances[instances.scores >= score_threshold]
            for result in instances_to_coco_json(instances, index):
                if category_ids is not None:
                    result["category_id"] = category_ids[result["category_id"]]
                records.append({"image_id": index, "file_name": str(path),
                                **{k: v for k, v in result.items() if k != "image_id"}})
            drawn = draw_instances(rgb, instances, predictor.metadata) if visualize else None
        if drawn is not None:
            Image.fromarray(drawn).save(out_dir / "vis" / f"{stem}.png")
    result_path = out_dir / "predictions.json"
    result_path.write_text(json.dumps(records) + "\n")
    return result_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags of ``itpn-predict`` / ``tools/predict.py``."""
    parser = argparse.ArgumentParser(
        description="Predict image files with a recipe and its weights: predictions.json and "
                    "drawings (see itpn_d2.d2.predictor.predict_files for the format).")
    parser.add_argument("--config-file", required=True, help="LazyConfig recipe")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (default: the config's train.init_checkpoint)")
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA if present)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="detections below it are left out of predictions.json and the "
                             "drawings (0 keeps all, e.g. for COCO evaluation)")
    parser.add_argument("--no-vis", action="store_true", help="write no drawings")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="predict even when the weights leave part of the model random "
                             "(no checkpoint, or a pretraining one): to test the pipeline only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    list_images(args.input)  # fail on a missing input before building the model
    setup_logger(name="itpn_d2", abbrev_name="itpn")  # the checkpointer's load table
    cfg = load_config(args.config_file, args.opts)
    checkpoint = args.checkpoint if args.checkpoint is not None \
        else cfg.train.get("init_checkpoint", "")
    if not checkpoint and not args.allow_random_weights:
        raise CheckpointError("no weights: --checkpoint is empty and so is the config's "
                              "train.init_checkpoint; give --checkpoint model_final.pth (or "
                              "--allow-random-weights to predict with random weights)")
    predictor = Predictor(cfg, checkpoint, device=args.device,
                          allow_random=args.allow_random_weights)
    path = predict_files(predictor, args.input, args.output,
                         score_threshold=args.score_threshold, visualize=not args.no_vis)
    print(f"wrote {path}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``itpn-predict``; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: main(argv))

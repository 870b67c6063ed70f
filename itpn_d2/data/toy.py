"""A small synthetic shapes dataset for CPU pretraining, detection and segmentation runs.

Each image is a textured background with up to four filled, textured, upright shapes of
``CLASS_NAMES`` that never overlap. Everything is drawn from ``seed``: the same settings give
identical files. Besides the labelled splits, ``pool`` holds unlabelled images for pretraining
(as ImageNet without its labels is to COCO): much larger than ``train``, drawn the same way.

Layout under ``root`` (default ``$ITPN_TOY_ROOT``, else ``datasets/itpn_toy`` in the working
directory, as Detectron2's ``$DETECTRON2_DATASETS``; made by ``itpn-make-toy`` or
``python -m itpn_d2.data``)::

    images/{train,val,probe}/000000.png            RGB images (probe: optional)
    images/pool/000000.png                         unlabelled RGB images, for pretraining only
    annotations/instances_{train,val,probe}.json   COCO instances, masks as compressed RLE
    sem_seg/{train,val,probe}/000000.png           uint8 labels, same file names as the images
    meta.json                                class names, sizes, seed, version

Labels and masks:
    * Shapes lie wholly inside the image and apart from each other, so a mask is the whole
      shape. Shapes with less than ``min_area`` pixels get no annotation.
    * Shapes are upright (a square's sides are axis-aligned, a triangle points up): a small
      CNN trained on the 256 x 32 px crops of 256 images classifies 93% of the val crops
      upright, 59% when rotated by up to 15 degrees and 33% in any rotation; at the few
      hundred labelled objects of this dataset, rotation was what made it hard to learn.
    * COCO category ids are 1..K in ``CLASS_NAMES`` order. Masks are RLE (not polygons) so
      they are exact, which means Detectron2 mappers need ``instance_mask_format="bitmask"``.
    * Semantic labels: 0 = background (a class of its own), k = COCO category k, and
      ``IGNORE_LABEL`` (255) only on the visible pixels of shapes too small to annotate.

This module never imports detectron2 at import time; :func:`register_toy_datasets` does.
"""

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from ..errors import UserError, run_cli
from .images import IGNORE_LABEL

__all__ = [
    "CLASS_NAMES",
    "IGNORE_LABEL",
    "TOY_IMAGE_SIZE",
    "default_toy_root",
    "make_toy_dataset",
    "register_toy_datasets",
    "render_toy_image",
    "toy_class_names",
    "toy_paths",
]

# Bump when the drawing code changes, so stale datasets on disk are regenerated.
TOY_VERSION = 2
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
BACKGROUND_LABEL = 0
SPLITS = ("train", "val")  # labelled, always made
# Labelled like val, optional (``num_probe``): a held-out set large enough for linear probes to
# give tight intervals (itpn-probe), kept apart so that the demo's val evaluation stays quick.
PROBE_SPLIT = "probe"
# Label-scarce training sets: itpn_toy_train_<n> (and itpn_toy_sem_seg_train_<n>) are the first
# n images of the train split (the generator draws images independently, so any n are a sample).
TRAIN_SUBSETS = (32, 64, 128)
POOL_SPLIT = "pool"  # unlabelled, for pretraining
# Upright pose of each shape (radians): squares axis-aligned, triangles and stars point up.
UPRIGHT = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2,
           "cross": 0.0}
ROOT_ENV = "ITPN_TOY_ROOT"
MAX_SHAPES = 4
# Least distance in pixels between the circumcircles of two shapes: shapes never overlap, so
# each is seen whole (with occlusion, a small detector needs far more labels to learn them).
SHAPE_GAP = 2.0
# Side of the toy images, the toy pretraining size and the size the toy recipes build the
# network at (its position table then matches the pretrained one, so every loader fills it).
TOY_IMAGE_SIZE = 128
# Shape radius (centre to farthest vertex) as a fraction of the image side.
RADIUS_RANGE = (0.10, 0.22)
# Least RGB distance between a shape's colour and the mean colour it is painted over.
MIN_CONTRAST = 90.0
MAKE_COMMAND = "itpn-make-toy"  # python tools/make_toy_dataset.py in a checkout

PathLike = Union[str, os.PathLike]
Instance = Tuple[int, np.ndarray]  # (COCO category id, visible mask [H, W] bool)


def toy_class_names() -> List[str]:
    """Shape class names; COCO category id ``k`` is ``toy_class_names()[k - 1]``."""
    return list(CLASS_NAMES)


def default_toy_root() -> Path:
    """``$ITPN_TOY_ROOT`` if set, else ``datasets/itpn_toy`` in the working directory.

    Like Detectron2's ``$DETECTRON2_DATASETS``: never a path inside the installed package, so
    every checkout and installation finds the data where the user runs the commands.
    """
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    return Path.cwd() / "datasets" / "itpn_toy"


def toy_paths(root: PathLike) -> Dict:
    """Paths of the dataset under ``root``, named as Detectron2's loaders name them."""
    root = Path(root)
    paths = {"root": root, "meta": root / "meta.json", POOL_SPLIT: root / "images" / POOL_SPLIT}
    for split in (*SPLITS, PROBE_SPLIT):
        paths[split] = {
            "image_root": root / "images" / split,
            "json_file": root / "annotations" / f"instances_{split}.json",
            "sem_seg_root": root / "sem_seg" / split,
        }
    return paths


def _settings(num_train: int, num_val: int, num_pool: int, image_size: int, seed: int,
              num_probe: int = 0) -> Dict:
    return {
        "version": TOY_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_pool": num_pool,
        "num_probe": num_probe,
        "image_size": image_size,
        "seed": seed,
        "min_area": _min_area(image_size),
    }


def _min_area(image_size: int) -> int:
    return image_size * image_size // 400  # 40 pixels at 128 x 128


# ----------------------------------------------------------------------------------- drawing
def _shape_polygon(
    class_name: str, center: np.ndarray, radius: float, angle: float
) -> List[Tuple[float, float]]:
    """Vertices of a shape of circumradius ``radius`` rotated by ``angle`` (radians)."""
    if class_name == "circle":
        points = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, False)]
    elif class_name in ("square", "triangle"):
        n = 4 if class_name == "square" else 3
        points = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, n, False)]
    elif class_name == "star":
        radii = [1.0, 0.45] * 5
        angles = np.linspace(0, 2 * math.pi, 10, False)
        points = [(r * math.cos(t), r * math.sin(t)) for r, t in zip(radii, angles)]
    elif class_name == "cross":
        w = 0.3  # half width of an arm
        points = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1)]
        points += [(-x, -y) for x, y in points]
    else:
        raise ValueError(f"unknown toy class {class_name!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [
        (center[0] + radius * (cos * x - sin * y), center[1] + radius * (sin * x + cos * y))
        for x, y in points
    ]


def _rasterize(polygon: Sequence[Tuple[float, float]], size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(list(polygon), fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient or smooth colour blotches, as float32 [H, W, 3] in 0..255."""
    if rng.random() < 0.5:
        c0, c1 = rng.uniform(0, 255, size=(2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:size, 0:size] / (size - 1)
        t = x * math.cos(angle) + y * math.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
        image = c0 + (c1 - c0) * t[..., None]
    else:
        cells = int(rng.integers(2, 7))
        coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    return image.astype(np.float32)


def _texture(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """Solid colour, stripes or per-pixel noise around ``colour``: float32 [H, W, 3]."""
    kind = rng.integers(3)
    texture = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
    if kind == 1:
        period = rng.uniform(4, 10)
        angle = rng.uniform(0, math.pi)
        y, x = np.mgrid[0:size, 0:size]
        phase = (x * math.cos(angle) + y * math.sin(angle)) / period
        dark = (np.floor(phase) % 2).astype(np.float32)  # 0 / 1 bands
        texture = texture * (1.0 - 0.4 * dark[..., None])
    elif kind == 2:
        texture = texture + rng.normal(0, 25, size=(size, size, 1))
    return texture


def _shape_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from ``under`` (the mean colour it covers)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            return colour
    return 255.0 - under  # the complement always contrasts enough


def _free_spot(rng: np.random.Generator, radius: float, size: int,
               placed: Sequence[Tuple[np.ndarray, float]]) -> Optional[np.ndarray]:
    """A centre that keeps a shape of circumradius ``radius`` inside the image and apart from
    the ``placed`` ones (``SHAPE_GAP`` pixels between circumcircles); None after 50 tries."""
    for _ in range(50):
        center = rng.uniform(radius + 1, size - radius - 1, size=2)  # 1 px from the border
        if all(np.linalg.norm(center - c) >= radius + r + SHAPE_GAP for c, r in placed):
            return center
    return None


def render_toy_image(
    split: str, index: int, image_size: int = TOY_IMAGE_SIZE, seed: int = 0
) -> Tuple[np.ndarray, List[Instance], np.ndarray]:
    """Draw image ``index`` of ``split``; it depends only on these arguments.

    Returns:
        image: uint8 [H, W, 3] RGB.
        instances: (category id, visible mask) of the annotated shapes, in drawing order.
        semantic: uint8 [H, W] labels (see the module docstring).
    """
    splits = (*SPLITS, POOL_SPLIT, PROBE_SPLIT)  # appended, so earlier splits draw as before
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    rng = np.random.default_rng([seed, splits.index(split), index])
    size = image_size

    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # index of the shape on top, -1 = none
    categories = []
    placed: List[Tuple[np.ndarray, float]] = []  # (centre, radius) of the shapes drawn
    for i in range(int(rng.integers(1, MAX_SHAPES + 1))):
        category = int(rng.integers(len(CLASS_NAMES))) + 1
        radius = rng.uniform(*RADIUS_RANGE) * size
        center = _free_spot(rng, radius, size, placed)
        if center is None:
            continue
        placed.append((center, radius))
        name = CLASS_NAMES[category - 1]
        polygon = _shape_polygon(name, center, radius, UPRIGHT[name])
        mask = _rasterize(polygon, size)
        colour = _shape_colour(rng, image[mask].mean(axis=0) if mask.any() else image.mean((0, 1)))
        image[mask] = _texture(rng, size, colour)[mask]
        owner[mask] = i
        categories.append(category)
    image += rng.normal(0, rng.uniform(2, 10), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    instances = []
    semantic = np.full((size, size), BACKGROUND_LABEL, dtype=np.uint8)
    min_area = _min_area(size)
    for i, category in enumerate(categories):
        visible = owner == i
        if visible.sum() >= min_area:
            instances.append((category, visible))
            semantic[visible] = category
        else:
            semantic[visible] = IGNORE_LABEL
    return image, instances, semantic


# ----------------------------------------------------------------------------------- writing
def _annotation(mask: np.ndarray, category: int, image_id: int, ann_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],  # [x, y, w, h]
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
    }


def _empty_folder(folder: Path) -> None:
    """Create ``folder``, or remove the images of an earlier dataset from it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()


def _write_split(paths: Dict, split: str, count: int, image_size: int, seed: int) -> None:
    for folder in (paths["image_root"], paths["sem_seg_root"]):
        _empty_folder(folder)
    paths["json_file"].parent.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for index in range(count):
        image, instances, semantic = render_toy_image(split, index, image_size, seed)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(paths["image_root"] / file_name)
        Image.fromarray(semantic).save(paths["sem_seg_root"] / file_name)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for category, mask in instances:
            annotations.append(_annotation(mask, category, image_id, len(annotations) + 1))

    coco = {
        "info": {"description": f"itpn_d2 toy shapes, {split}", "version": str(TOY_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(CLASS_NAMES)
        ],
    }
    paths["json_file"].write_text(json.dumps(coco))


def _write_pool(folder: Path, count: int, image_size: int, seed: int) -> None:
    """The unlabelled pretraining images (no annotations are written for them)."""
    _empty_folder(folder)
    for index in range(count):
        image, _, _ = render_toy_image(POOL_SPLIT, index, image_size, seed)
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def make_toy_dataset(
    root: Optional[PathLike] = None,
    num_train: int = 256,
    num_val: int = 64,
    image_size: int = TOY_IMAGE_SIZE,
    seed: int = 0,
    num_pool: int = 0,
    num_probe: int = 0,
) -> Dict:
    """Write the toy dataset under ``root`` unless an identical one is already there.

    Args:
        root: output folder; ``None`` means :func:`default_toy_root`.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: image side in pixels, a multiple of 32.
        seed: seed of every random choice.
        num_pool: number of unlabelled pretraining images (``images/pool``; 0: none).
        num_probe: number of images of the labelled ``probe`` split (0: none), held out for
            linear probing.

    Returns:
        :func:`toy_paths` of ``root``.
    """
    if image_size < 32 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    if num_train < 1 or num_val < 1 or num_pool < 0 or num_probe < 0:
        raise ValueError(f"need at least one image per labelled split and no negative pool or "
                         f"probe split, got {num_train=} {num_val=} {num_pool=} {num_probe=}")
    paths = toy_paths(root if root is not None else default_toy_root())
    settings = _settings(num_train, num_val, num_pool, image_size, seed, num_probe)
    if _is_complete(paths, settings):
        return paths

    paths["root"].mkdir(parents=True, exist_ok=True)
    paths["meta"].unlink(missing_ok=True)  # an interrupted run must not look complete
    for split, count in (("train", num_train), ("val", num_val), (PROBE_SPLIT, num_probe)):
        if count:
            _write_split(paths[split], split, count, image_size, seed)
    if num_pool:
        _write_pool(paths[POOL_SPLIT], num_pool, image_size, seed)
    meta = {
        **settings,
        "classes": toy_class_names(),
        "background_label": BACKGROUND_LABEL,
        "ignore_label": IGNORE_LABEL,
    }
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def _is_complete(paths: Dict, settings: Dict) -> bool:
    if not paths["meta"].is_file():
        return False
    meta = json.loads(paths["meta"].read_text())
    if any(meta.get(key) != value for key, value in settings.items()):
        return False
    made = SPLITS + ((PROBE_SPLIT,) if settings["num_probe"] else ())
    return all(paths[split]["json_file"].is_file() for split in made)


# ------------------------------------------------------------------------------ detectron2
def _unregister(name: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _missing_files(paths: Dict) -> List[Path]:
    required = [paths["meta"]] + [p for s in SPLITS for p in paths[s].values()]
    return [p for p in required if not p.exists()]


def _missing_error(paths: Dict) -> FileNotFoundError:
    missing = _missing_files(paths)
    return FileNotFoundError(
        f"toy dataset file {missing[0]} is missing; make the dataset with "
        f"`{MAKE_COMMAND} {paths['root']}`"
    )


def _load_split(paths: Dict, split: str, kind: str) -> List[Dict]:
    """The dataset dicts of ``split``; the files are checked here, when the data is read."""
    from detectron2.data.datasets import load_coco_json, load_sem_seg

    if _missing_files(paths):
        raise _missing_error(paths)
    if not paths[split]["json_file"].is_file():  # the optional probe split
        raise FileNotFoundError(f"toy dataset {paths['root']} has no {split} split; make it "
                                f"with `{MAKE_COMMAND} {paths['root']} --num-{split} 768`")
    p = {key: str(path) for key, path in paths[split].items()}
    if kind == "instances":
        return load_coco_json(p["json_file"], p["image_root"], f"itpn_toy_{split}")
    return load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="png")


def _load_train_subset(paths: Dict, kind: str, count: int) -> List[Dict]:
    """The first ``count`` dataset dicts of the train split (by image id)."""
    dicts = sorted(_load_split(paths, "train", kind), key=lambda d: d["file_name"])
    if len(dicts) < count:
        raise ValueError(f"toy dataset {paths['root']} has {len(dicts)} train images, fewer "
                         f"than the {count} of itpn_toy_train_{count}; make it with "
                         f"`{MAKE_COMMAND} {paths['root']} --num-train {count}`")
    return dicts[:count]


def register_toy_datasets(root: Optional[PathLike] = None, lazy: bool = False) -> List[str]:
    """Register the toy dataset under ``root`` with Detectron2; return the dataset names.

    ``itpn_toy_{train,val}`` are COCO instance datasets (evaluator "coco"),
    ``itpn_toy_sem_seg_{train,val}`` semantic segmentation ones (evaluator "sem_seg",
    ``stuff_classes`` = background + shapes, ``ignore_label`` = 255); ``itpn_toy_probe`` and
    ``itpn_toy_sem_seg_probe`` likewise when the probe split was made (``lazy``: always);
    ``itpn_toy_train_<n>`` and ``itpn_toy_sem_seg_train_<n>`` for each n of
    :data:`TRAIN_SUBSETS`, the first n train images (label-scarce fine-tuning).

    Args:
        root: the dataset folder; ``None`` means :func:`default_toy_root`.
        lazy: what loading a toy recipe does (so that Detectron2's own tools find the
            datasets): register only names not registered yet and do not look at the files;
            a missing dataset is then an error when the data is read. Otherwise the files are
            checked now and an earlier registration is replaced.

    Raises:
        FileNotFoundError: (``lazy=False``) the dataset has not been made under ``root``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    paths = toy_paths(root if root is not None else default_toy_root())
    if not lazy and _missing_files(paths):
        raise _missing_error(paths)

    names = []
    for split in (*SPLITS, PROBE_SPLIT):
        split_paths = {key: str(path) for key, path in paths[split].items()}
        instances_name, sem_seg_name = f"itpn_toy_{split}", f"itpn_toy_sem_seg_{split}"
        names += [instances_name, sem_seg_name]
        if lazy and {instances_name, sem_seg_name} <= set(DatasetCatalog.list()):
            continue
        _unregister(instances_name)
        _unregister(sem_seg_name)

        # As register_coco_instances, with a loader that checks the files first.
        DatasetCatalog.register(instances_name, partial(_load_split, paths, split, "instances"))
        MetadataCatalog.get(instances_name).set(
            thing_classes=toy_class_names(),
            json_file=split_paths["json_file"],
            image_root=split_paths["image_root"],
            evaluator_type="coco",
        )
        DatasetCatalog.register(sem_seg_name, partial(_load_split, paths, split, "sem_seg"))
        MetadataCatalog.get(sem_seg_name).set(
            stuff_classes=["background", *CLASS_NAMES],
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            image_root=split_paths["image_root"],
            sem_seg_root=split_paths["sem_seg_root"],
        )
    train = {key: str(path) for key, path in paths["train"].items()}
    for count in TRAIN_SUBSETS:
        instances_name = f"itpn_toy_train_{count}"
        sem_seg_name = f"itpn_toy_sem_seg_train_{count}"
        names += [instances_name, sem_seg_name]
        if lazy and {instances_name, sem_seg_name} <= set(DatasetCatalog.list()):
            continue
        _unregister(instances_name)
        _unregister(sem_seg_name)
        # no json_file: an evaluator of a subset converts its dicts, not the whole split's file
        DatasetCatalog.register(instances_name,
                                partial(_load_train_subset, paths, "instances", count))
        MetadataCatalog.get(instances_name).set(
            thing_classes=toy_class_names(), image_root=train["image_root"],
            evaluator_type="coco")
        DatasetCatalog.register(sem_seg_name, partial(_load_train_subset, paths, "sem_seg", count))
        MetadataCatalog.get(sem_seg_name).set(
            stuff_classes=["background", *CLASS_NAMES], ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg", image_root=train["image_root"],
            sem_seg_root=train["sem_seg_root"])
    return names


def get_parser() -> argparse.ArgumentParser:
    """The flags of ``itpn-make-toy`` (``tools/make_toy_dataset.py`` adds ``--check``)."""
    parser = argparse.ArgumentParser(description="Make the synthetic toy shapes dataset.")
    parser.add_argument("out", nargs="?", type=Path,
                        help=f"output folder (default: ${ROOT_ENV}, else datasets/itpn_toy)")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--num-pool", type=int, default=0,
                        help="unlabelled pretraining images (images/pool)")
    parser.add_argument("--num-probe", type=int, default=0,
                        help="labelled images held out for linear probing (images/probe; "
                             "768 give intervals of about +-2.3 points on object accuracy)")
    parser.add_argument("--image-size", type=int, default=TOY_IMAGE_SIZE,
                        help="a multiple of 32")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_from_args(args: argparse.Namespace) -> Dict:
    """:func:`make_toy_dataset` of the parsed flags, with one-line errors; prints the folder."""
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"output folder {args.out} is a file; choose another folder")
    start = time.perf_counter()
    try:
        paths = make_toy_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                 image_size=args.image_size, seed=args.seed,
                                 num_pool=args.num_pool, num_probe=args.num_probe)
    except ValueError as e:  # sizes and counts, checked by make_toy_dataset
        raise UserError(f"{e} (--image-size, --num-train, --num-val, --num-pool, --num-probe)"
                        ) from None
    print(f"toy dataset ready in {paths['root']} ({time.perf_counter() - start:.1f}s)")
    return paths


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``itpn-make-toy`` / ``python -m itpn_d2.data``; errors give one ``error:`` line."""

    def main() -> int:
        make_from_args(get_parser().parse_args(argv))
        return 0

    return run_cli(main)

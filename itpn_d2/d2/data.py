"""Data helpers for the recipes: one image reader, mappers that use it, DETR-style multi-scale
augmentation and dataset checks."""

from __future__ import annotations

import copy
import difflib
import os
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

from ..data.images import to_rgb
from ..data.toy import MAKE_COMMAND, ROOT_ENV
from ..errors import UserError


class ImageReadError(UserError, OSError):
    """An image file that cannot be decoded (an ``OSError``, so that training skips it as any
    unreadable image)."""


def read_image(file_name: str, format: Optional[str] = "RGB") -> np.ndarray:
    """Detectron2's ``read_image`` with pretraining's decoding (:func:`itpn_d2.data.images.to_rgb`):
    EXIF orientation applied, 16-bit images scaled instead of clipped to white, transparency
    composited over white, palette / grayscale / CMYK converted. Returns ``(H, W, C)`` uint8 in
    ``format`` (``"RGB"``, ``"BGR"``, ``"L"``... as Detectron2's; ``None`` means RGB).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: it is not an image or is truncated (the message names the file).
    """
    if not PathManager.exists(file_name):
        raise FileNotFoundError(f"image file {file_name} does not exist")
    try:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            rgb = to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {file_name}: {e}") from e
    return np.asarray(rgb) if format in (None, "RGB") else utils.convert_PIL_to_numpy(rgb, format)


class ImageDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` for detection with images read by :func:`read_image`, so
    that fine-tuning and inference see a file as pretraining does. Takes ``DatasetMapper``'s
    arguments; precomputed proposals and ``sem_seg_file_name`` records are not supported
    (semantic segmentation has :class:`~itpn_d2.d2.semseg_data.SemSegDatasetMapper`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proposal_topk is not None:
            raise ValueError("ImageDatasetMapper does not load precomputed proposals; use "
                             "Detectron2's DatasetMapper for them")

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
        elif "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict


class RandomChoice(T.Augmentation):
    """Apply one of several augmentation sequences, picked at random per image.

    The published detection recipe (after DETR) picks, with equal chance, either a multi-scale
    resize, or a resize + random crop + multi-scale resize.

    Args:
        choices: a list of augmentation sequences (each a list of ``Augmentation``).
        probs: probability of each choice (``None``: uniform).
    """

    def __init__(self, choices: Sequence[Sequence[T.Augmentation]],
                 probs: Optional[Sequence[float]] = None):
        super().__init__()
        if not choices:
            raise ValueError("RandomChoice needs at least one choice")
        if probs is not None and (len(probs) != len(choices) or abs(sum(probs) - 1) > 1e-6):
            raise ValueError(f"probs {probs} must have one entry per choice and sum to 1")
        self.choices = [T.AugmentationList(list(c)) for c in choices]
        self.probs = None if probs is None else list(probs)

    def __call__(self, aug_input) -> T.Transform:
        index = np.random.choice(len(self.choices), p=self.probs)
        return self.choices[index](aug_input)

    def __repr__(self) -> str:
        return f"RandomChoice({self.choices})"


class BitmaskDatasetMapper(ImageDatasetMapper):
    """:class:`ImageDatasetMapper` that rasterises polygon masks before augmenting (when
    ``instance_mask_format="bitmask"``), as the published pipeline does (mmdetection's
    ``poly2mask``). Augmentations then crop and resize pixel masks, which needs no polygon
    clipping library.
    """

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        if self.use_instance_mask and self.instance_mask_format == "bitmask":
            import pycocotools.mask as mask_util

            h, w = dataset_dict["height"], dataset_dict["width"]
            for anno in dataset_dict.get("annotations", []):
                segm = anno.get("segmentation")
                if isinstance(segm, list) and segm:  # polygons -> one compressed RLE
                    anno["segmentation"] = mask_util.merge(mask_util.frPyObjects(segm, h, w))
        super()._transform_annotations(dataset_dict, transforms, image_shape)


class DatasetError(UserError, KeyError):
    """A dataset that is not registered or whose files are missing."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _names(names: Union[str, Iterable[str]]) -> List[str]:
    return [names] if isinstance(names, str) else list(names)


def check_datasets(names: Union[str, Iterable[str]]) -> None:
    """Raise one :class:`DatasetError` for datasets that are unregistered or miss their files.

    Checks the ``json_file`` / ``image_root`` / ``sem_seg_root`` that Detectron2's metadata
    records for the dataset (builtin COCO datasets live under ``$DETECTRON2_DATASETS``).
    """
    registered = DatasetCatalog.list()
    problems = []
    for name in _names(names):
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            if name.startswith("itpn_toy"):
                hint += (f" (toy datasets: make them with {MAKE_COMMAND}; the train tool "
                         f"registers them from ${ROOT_ENV})")
            problems.append(f"dataset {name!r} is not registered{hint}")
            continue
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "image_root", "sem_seg_root"):
            path = getattr(meta, key, None) if key in meta.as_dict() else None
            if path and not os.path.exists(path):
                where = ""
                if name.startswith("coco_"):
                    where = (f" (Detectron2 resolves builtin COCO datasets under "
                             f"$DETECTRON2_DATASETS="
                             f"{os.environ.get('DETECTRON2_DATASETS', 'datasets')!r})")
                problems.append(f"dataset {name!r}: {key} {path} does not exist{where}")
    if problems:
        raise DatasetError("\n".join(problems))


def config_dataset_names(cfg, splits: Sequence[str] = ("train", "test")) -> List[str]:
    """Dataset names that a LazyConfig's ``dataloader.<split>.dataset.names`` refer to."""
    from omegaconf import OmegaConf

    names: List[str] = []
    for split in splits:
        value = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        if value is not None:
            names += _names(value)
    return names


def prepare_datasets(cfg, splits: Sequence[str] = ("train", "test")) -> List[str]:
    """Register the toy datasets if ``cfg`` uses them (from ``$ITPN_TOY_ROOT``), then
    :func:`check_datasets` every dataset of ``splits``; return their names."""
    names = config_dataset_names(cfg, splits)
    if any(n.startswith("itpn_toy") for n in names):
        from ..data.toy import register_toy_datasets

        try:
            register_toy_datasets()
        except FileNotFoundError as e:
            raise DatasetError(str(e)) from None
    check_datasets(names)
    return names

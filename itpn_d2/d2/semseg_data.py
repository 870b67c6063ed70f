"""Data for semantic segmentation: checked label reading, a validating mapper, augmentations.

Labels are single-channel PNGs (``L``/``P``/``I`` modes) holding class ids ``0..K-1`` and the
ignore value (255). Everything that reads them goes through :func:`read_label_png`, which
works under numpy 2 and names the file in every error; :func:`check_label` checks values.

EXIF orientation: Detectron2's ``read_image`` turns an image upright by its EXIF orientation
tag, but a label PNG carries no such tag. A label is taken to be drawn on its image's *stored*
pixel grid (as converted datasets are made), so :func:`align_label` applies the image's
orientation to it too; a label that already has the size of the upright image (and not of the
stored one) is taken as upright. Any other size is refused.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

import detectron2.data.transforms as T
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

from ..data.images import IGNORE_LABEL
from ..errors import UserError
from .data import read_image

__all__ = ["LabelError", "SemSegDatasetMapper", "align_label", "check_label", "exif_orientation",
           "read_label_png", "semseg_train_augmentations"]

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the PIL transpose that makes the image upright (as Detectron2's
# read_image does); orientations 5-8 swap width and height.
_UPRIGHT = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
            5: Image.TRANSPOSE, 6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}


class LabelError(UserError, ValueError):
    """A semantic segmentation label file that does not fit its image or the classes."""


def read_label_png(path: str, dtype=np.uint8) -> np.ndarray:
    """Read a label image as a 2-D integer array (numpy 2 safe: no ``copy=False``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LabelError: the file is not a single-channel image.
    """
    if not PathManager.exists(path):
        raise FileNotFoundError(f"semantic segmentation label file {path} does not exist")
    with PathManager.open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise LabelError(f"label file {path} has image mode {image.mode!r}; labels must be "
                         f"single-channel (L, P or I) PNGs of class ids")
    label = np.asarray(image)
    return label.astype(dtype) if dtype is not None else label


def exif_orientation(path: str) -> int:
    """The EXIF orientation tag of an image file (1, upright, when it has none)."""
    try:
        with PathManager.open(path, "rb") as f, Image.open(f) as image:
            return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF: read_image ignores it too
        return 1


def align_label(label: np.ndarray, orientation: int, image_hw: Tuple[int, int],
                label_path: str, image_path: str) -> np.ndarray:
    """``label`` in the orientation of its image as ``read_image`` returns it (``image_hw``).

    Raises:
        LabelError: the label fits neither the stored nor the upright image.
    """
    method = _UPRIGHT.get(orientation)
    stored_hw = image_hw[::-1] if orientation in (5, 6, 7, 8) else image_hw
    if method is not None and label.shape == tuple(stored_hw):
        return np.asarray(Image.fromarray(label).transpose(method))
    if label.shape == tuple(image_hw):
        return label
    rotated = f" (EXIF orientation {orientation}: stored {stored_hw[1]}x{stored_hw[0]})" \
        if method is not None else ""
    raise LabelError(f"label file {label_path} is {label.shape[1]}x{label.shape[0]} but its "
                     f"image {image_path} is {image_hw[1]}x{image_hw[0]}{rotated} (width x "
                     f"height)")


def check_label(label: np.ndarray, num_classes: int, ignore_value: int, path: str) -> None:
    """Raise :class:`LabelError` naming ``path`` if ``label`` holds values other than
    ``0..num_classes-1`` and ``ignore_value``."""
    bad = (label >= num_classes) & (label != ignore_value) | (label < 0)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise LabelError(
            f"label file {path} has values {shown} outside the classes 0..{num_classes - 1} "
            f"and the ignore value {ignore_value} (raw ADE20K annotations must be converted with "
            f"itpn-prepare-ade20k)")


class SemSegDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` for semantic segmentation, with input checks.

    Reads the image (``image_format``) and, in training, its label (:func:`read_label_png`),
    checks that both exist, that their sizes match and that the labels are valid class ids,
    then applies the augmentations to both. Test-time outputs carry no label (evaluators read
    the label files themselves).

    Args:
        is_train: training (read + check labels) or inference.
        augmentations: Detectron2 augmentations (see :func:`semseg_train_augmentations`).
        image_format: image channel order (``"RGB"`` for iTPN).
        num_classes: number of classes (labels must be below it, or ``ignore_value``).
        ignore_value: label value ignored by the loss.
    """

    def __init__(self, is_train: bool, *, augmentations: List, image_format: str,
                 num_classes: int, ignore_value: int = IGNORE_LABEL):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)
        self.num_classes = num_classes
        self.ignore_value = ignore_value

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image_path = dataset_dict["file_name"]
        if not PathManager.exists(image_path):
            raise FileNotFoundError(f"image file {image_path} does not exist")
        image = read_image(image_path, format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        label_path = dataset_dict.pop("sem_seg_file_name", None)
        label = None
        if self.is_train:
            if label_path is None:
                raise KeyError(f"dataset record of {image_path} has no 'sem_seg_file_name'; "
                               f"is this a semantic segmentation dataset?")
            # at the file's own bit depth: a 16-bit value must fail the check, not wrap
            label = align_label(read_label_png(label_path, dtype=None),
                                exif_orientation(image_path), image.shape[:2], label_path,
                                image_path)
            check_label(label, self.num_classes, self.ignore_value, label_path)
            if max(self.num_classes - 1, self.ignore_value) <= 255:
                label = label.astype(np.uint8)

        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        dataset_dict.pop("annotations", None)
        return dataset_dict


def semseg_train_augmentations(crop_size: int = 512, short_edge: int = 512,
                               scale_range: Tuple[float, float] = (0.5, 2.0),
                               max_long_edge: int = 2048, cat_max_ratio: float = 0.75,
                               ignore_value: int = IGNORE_LABEL, flip: bool = True,
                               color_jitter: bool = True) -> List[T.Augmentation]:
    """The mmsegmentation ADE20K training pipeline, in Detectron2 augmentations.

    Resize the shorter side to ``short_edge * s`` (``s`` uniform in ``scale_range``; longer side
    at most ``max_long_edge * max(scale_range)``), crop ``crop_size`` (retried up to 10 times
    so that no class but ``ignore_value`` covers more than ``cat_max_ratio``; images smaller
    than the crop are padded with the ignore label by the model's batching), flip horizontally,
    and jitter brightness, contrast and saturation (Detectron2's versions of the photometric
    distortion; mmsegmentation's hue jitter needs OpenCV and is left out).
    """
    lo, hi = (int(round(short_edge * s)) for s in scale_range)
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge((lo, hi), max_size=int(max_long_edge * max(scale_range)),
                             sample_style="range"),
        T.RandomCrop_CategoryAreaConstraint("absolute", (crop_size, crop_size),
                                            single_category_max_area=cat_max_ratio,
                                            ignored_category=ignore_value),
    ]
    if flip:
        augs.append(T.RandomFlip(horizontal=True))
    if color_jitter:
        augs += [T.RandomApply(T.RandomBrightness(0.875, 1.125), prob=0.5),
                 T.RandomApply(T.RandomContrast(0.5, 1.5), prob=0.5),
                 T.RandomApply(T.RandomSaturation(0.5, 1.5), prob=0.5)]
    return augs


"""Data helpers for the recipes: DETR-style multi-scale augmentation and dataset checks."""

from __future__ import annotations

import difflib
import os
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

from ..data.toy import MAKE_COMMAND, ROOT_ENV
from ..errors import UserError


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


class BitmaskDatasetMapper(DatasetMapper):
    """``DatasetMapper`` that rasterises polygon masks before augmenting (when
    ``instance_mask_format="bitmask"``), as the published pipeline does (mmdetection's
    ``poly2mask``). Augmentations then crop and resize pixel masks, which needs no polygon
    clipping library. Takes the same arguments as ``DatasetMapper``.
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

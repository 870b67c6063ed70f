"""Pretraining data: a folder of images, deterministic augmentation, a resumable sampler.

* :func:`find_images`: every image file under a folder, recursively, so both an ImageFolder tree
  (``root/<class>/<image>``; ``root/train`` is used when it exists, as in the ImageNet layout)
  and a flat folder of images work. Labels are not used.
* :class:`PretrainImages`: MAE augmentation (RandomResizedCrop with scale (0.2, 1.0), horizontal
  flip). Each sample's random choices come from a seed handed over by the sampler, never from
  a global or per-worker random state, so a batch is the same whatever the number of workers
  and whether or not the run was resumed in the middle of an epoch. Images are returned as
  uint8 ``(3, S, S)`` tensors; normalisation happens on the device (see :func:`normalize`).
  Files are decoded by :func:`itpn_d2.data.images.load_rgb_image` (EXIF orientation applied,
  16-bit, transparent, palette and CMYK images converted to full-range 8-bit RGB).
  An unreadable file is skipped with a :class:`UnreadableImageWarning` (the next readable image
  takes its place) and counted: each sample also returns how many unreadable files it skipped,
  so the training loop can stop when too many fail.
* :class:`ResumableSampler`: a :class:`~torch.utils.data.DistributedSampler` whose order and
  per-sample seeds follow ``(seed, epoch)`` and which can start after the samples an
  interrupted run already consumed.
"""

from __future__ import annotations

import functools
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from itpn_d2.checkpoint import IMAGENET_MEAN as MEAN_255, IMAGENET_STD as STD_255
from itpn_d2.data.images import load_rgb_image
from itpn_d2.errors import UserError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# ImageNet statistics on the 0-1 scale, RGB (itpn_d2.checkpoint holds them on the 0-255 scale).
IMAGENET_MEAN = tuple(m / 255 for m in MEAN_255)  # (0.485, 0.456, 0.406)
IMAGENET_STD = tuple(s / 255 for s in STD_255)  # (0.229, 0.224, 0.225)
# Consecutive unreadable files after which one sample gives up (the data is likely broken).
MAX_CONSECUTIVE_BAD = 20

PathLike = Union[str, os.PathLike]


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


class DataError(UserError, ValueError):
    """The data folder cannot be used for training (missing, empty, too many bad images)."""


def find_images(root: PathLike) -> Tuple[Path, List[str]]:
    """Image files under ``root`` (or ``root/train`` if it exists), sorted, as strings.

    Raises :class:`DataError` when the folder is missing or holds no image files.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data_path {root} is not a folder")
    if (root / "train").is_dir():
        root = root / "train"
    files: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames
                     if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {root}")
    files.sort()
    return root, files


def random_resized_crop_params(rng: random.Random, width: int, height: int,
                               scale: Tuple[float, float] = (0.2, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3)
                               ) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Crop(NamedTuple):
    """A sample's augmentation: crop box ``(top, left, h, w)`` in pixels, then a flip."""

    top: int
    left: int
    h: int
    w: int
    flip: bool


def sample_crop(seed: int, width: int, height: int, scale: Tuple[float, float] = (0.2, 1.0),
                hflip: bool = True) -> Crop:
    """The augmentation of one sample from its seed and its (upright) image size: the one
    sampler of the PIL path (:class:`PretrainImages`) and the GPU path (``pretrain.gpu_data``),
    so both give the same boxes under one seed."""
    rng = random.Random(seed)
    top, left, h, w = random_resized_crop_params(rng, width, height, scale)
    return Crop(top, left, h, w, hflip and rng.random() < 0.5)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and take the central square."""
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    return TF.center_crop(img, [size, size])


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(img)  # [3, H, W] uint8


@functools.lru_cache(maxsize=8)
def _stats(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean / std ``(1, 3, 1, 1)`` on ``device``, copied there once (no per-step
    host-to-device copy, which would synchronise a CUDA stream)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(device)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float, ImageNet-normalised (on whatever device it is)."""
    mean, std = _stats(images.device)
    return (images.float() / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` on the 0-1 scale (not clamped)."""
    mean, std = _stats(images.device)
    return images.float() * std + mean


class PretrainImages(Dataset):
    """Images of a folder with MAE augmentation (see the module docstring).

    Items are ``(index, seed)`` pairs from :class:`ResumableSampler` (a plain ``index`` uses
    ``seed = index``). Each sample is ``(image uint8 [3, S, S], skipped_unreadable_files)``.

    Args:
        root: a folder of images or an ImageFolder tree (see :func:`find_images`).
        input_size: output side in pixels.
        scale: area range of RandomResizedCrop.
        hflip: random horizontal flip.
        cache: keep every image decoded after its first read (decoding is about 60% of the
            CPU time of a toy item).
    """

    def __init__(self, root: PathLike, input_size: int, scale: Tuple[float, float] = (0.2, 1.0),
                 hflip: bool = True, cache: bool = False):
        self.root, files = find_images(root)
        # A numpy array of strings, not a list: forked workers then share it without
        # copy-on-access (reference counts would touch every list element's page).
        self.files = np.array(files)
        self.input_size = input_size
        self.scale = scale
        self.hflip = hflip
        self.cache: Optional[Dict[int, Image.Image]] = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int, read: Callable[[str], Any] = load_rgb_image) -> Tuple[Any, int]:
        """``read(path)`` of the image at ``index``, or of the next readable one; also the
        number of unreadable images skipped on the way."""
        bad = []
        for k in range(MAX_CONSECUTIVE_BAD):
            path = str(self.files[(index + k) % len(self.files)])
            try:
                return read(path), len(bad)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}",
                              UnreadableImageWarning, stacklevel=2)
                bad.append(path)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images under {self.root} "
                        f"(first: {bad[0]}); is this an image folder?")

    def _cached(self, index: int) -> Tuple[Image.Image, int]:
        if self.cache is None:
            return self._load(index)
        img = self.cache.get(index)
        if img is not None:
            return img, 0
        img, bad = self._load(index)
        if not bad:  # a skipped file is read again next time (and warned about)
            self.cache[index] = img
        return img, bad

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        img, bad = self._cached(int(index))
        top, left, h, w, flip = sample_crop(int(seed), img.width, img.height, self.scale,
                                            self.hflip)
        img = TF.resized_crop(img, top, left, h, w, [self.input_size, self.input_size],
                              interpolation=InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        return to_uint8_tensor(img), bad

    def fixed_batch(self, count: int) -> torch.Tensor:
        """The first ``count`` readable images, center-cropped: uint8 ``(count, 3, S, S)``."""
        out, index = [], 0
        while len(out) < min(count, len(self)) and index < len(self):
            img, bad = self._load(index)
            out.append(to_uint8_tensor(center_crop(img, self.input_size)))
            index += 1 + bad
        return torch.stack(out)


class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` yielding ``(index, augmentation seed)`` pairs.

    The shuffled order and the per-position seeds are drawn from ``seed + epoch`` only, padded
    to a multiple of ``num_replicas`` and split by rank as DistributedSampler does.
    ``set_epoch(epoch, skip)`` starts the epoch after its first ``skip`` samples of this rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"cannot skip {skip} of {self.num_samples} samples")
        self.skip = skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        n = len(self.dataset)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.total_size > n:  # pad by repeating the start, as DistributedSampler does
            order = order.repeat(math.ceil(self.total_size / n))[:self.total_size]
        seeds = torch.randint(0, 2 ** 62, (self.total_size,), generator=g)
        order = order[self.rank:self.total_size:self.num_replicas].tolist()
        seeds = seeds[self.rank:self.total_size:self.num_replicas].tolist()
        return iter(list(zip(order, seeds))[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def default_data_root() -> Path:
    """The toy dataset's training images, written first if needed (so a fresh machine works)."""
    from itpn_d2.data.toy import make_toy_dataset

    return Path(make_toy_dataset()["train"]["image_root"])


def build_dataset(data_path: Optional[PathLike], input_size: int,
                  cache: bool = False) -> PretrainImages:
    return PretrainImages(data_path if data_path is not None else default_data_root(), input_size,
                          cache=cache)

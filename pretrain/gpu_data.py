"""Pretraining data decoded on the GPU (``pretrain/main.py --decode gpu``).

The PIL path (:class:`pretrain.data.PretrainImages`) decodes, crops and resizes in loader
workers: about 4 ms of CPU per ImageNet-sized JPEG, i.e. ~15 cores per GPU at 3,600 img/s. Here
the workers only read file bytes and parse the JPEG header (size, colour mode, EXIF
orientation: microseconds); the training process decodes each batch with one
``torchvision.io.decode_jpeg(list_of_bytes, device="cuda")`` call (nvjpeg; CUDA cannot run in
forked workers) and orients, crops, resizes (bicubic, antialiased), flips on the device.

* The crop box and flip of every sample come from :func:`pretrain.data.sample_crop` with the
  sampler's seed and the upright image size, exactly as in the PIL path: under one seed both
  paths crop the same boxes.
* Files the GPU decoder cannot take (CMYK or grayscale JPEGs, PNGs named ``.JPEG``, as ImageNet
  has) are decoded by PIL in the worker and counted (:attr:`GPUDecoder.cpu_fallbacks`).
* EXIF orientation: the tag is read from the header in the worker and applied on the device as
  a flip / transpose, giving the orientation of ``PIL.ImageOps.exif_transpose``.
* torchvision >= 0.29 deprecates its decoders (successor: TorchCodec's
  ``torchcodec.decoders.decode_jpeg`` from torchcodec 0.16); the warning is filtered around
  the calls here only, so logs stay clean.

Everything device-side also runs with ``device="cpu"`` (the CPU tests do that).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from itpn_d2.data.images import to_rgb
from itpn_d2.errors import UserError

from .data import Crop, DataError, PathLike, PretrainImages, sample_crop, to_uint8_tensor

EXIF_ORIENTATION = 0x0112
# The start of torchvision 0.29's DeprecationWarning for its image decoders.
TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
DECODE_CHOICES = ("cpu", "gpu")


class DecodeDeviceError(UserError, ValueError):
    """``--decode gpu`` without a CUDA device."""


def check_decode_device(decode: str, device: torch.device) -> None:
    if decode == "gpu" and device.type != "cuda":
        raise DecodeDeviceError(f"--decode gpu needs a CUDA device, got {device}; use "
                                f"--decode cpu (the default) on this machine")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` ``[C, H, W]`` as ``PIL.ImageOps.exif_transpose`` turns an image with this EXIF
    orientation (1-8; anything else leaves it unchanged)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)  # 90 degrees clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)  # 90 degrees counter-clockwise
    return image


@dataclass
class EncodedBatch:
    """A batch as loader workers hand it over: file bytes of the JPEGs the GPU decodes (one
    flat tensor, sliced by ``offsets``), images PIL already decoded (``decoded``, by position),
    and each sample's EXIF orientation, crop and path."""

    data: torch.Tensor  # uint8 [total bytes]
    offsets: List[int]  # len = batch + 1; sample i's bytes are data[offsets[i]:offsets[i + 1]]
    orientations: List[int]
    crops: List[Crop]
    paths: List[str]
    decoded: Dict[int, torch.Tensor] = field(default_factory=dict)  # uint8 [3, H, W], upright

    def __len__(self) -> int:
        return len(self.crops)


@dataclass
class EncodedSample:
    """One file as a worker reads it: the JPEG bytes for the GPU, or (files nvjpeg cannot
    take) the image PIL decoded, upright."""

    data: bytes  # empty when ``decoded`` holds the image
    orientation: int
    crop: Crop
    path: str
    decoded: Optional[torch.Tensor] = None


def gpu_decodable(img: Image.Image) -> bool:
    """nvjpeg takes baseline / progressive YCbCr JPEGs; CMYK, grayscale and non-JPEG files
    (PNGs named .JPEG) go to PIL."""
    return img.format == "JPEG" and img.mode == "RGB"


def read_sample(path: str, seed: int, scale: Tuple[float, float], hflip: bool
                ) -> EncodedSample:
    """The bytes, orientation and crop of one file (the worker's share of the GPU path)."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:  # parses the header only
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
        if gpu_decodable(img):
            w, h = img.size
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            return EncodedSample(data, orientation, sample_crop(seed, w, h, scale, hflip), path)
        upright = to_rgb(img)
    return EncodedSample(b"", 1, sample_crop(seed, upright.width, upright.height, scale, hflip),
                         path, to_uint8_tensor(upright))


class EncodedImages(PretrainImages):
    """:class:`PretrainImages` whose samples are :class:`EncodedSample` (file bytes and
    crop), for :class:`GPUDecoder`; batch them with :func:`collate_encoded`."""

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[EncodedSample, int]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        return self._load(int(index),
                          lambda path: read_sample(path, int(seed), self.scale, self.hflip))


def collate_encoded(samples: Sequence[Tuple[EncodedSample, int]]
                    ) -> Tuple[EncodedBatch, torch.Tensor]:
    """One flat byte tensor per batch (one shared-memory block from a worker, not one per
    image); ``bad`` as the PIL path's default collation gives it."""
    offsets = [0]
    for s, _ in samples:
        offsets.append(offsets[-1] + len(s.data))
    data = torch.empty(offsets[-1], dtype=torch.uint8)  # owns its storage: shareable
    flat = data.numpy()
    for (s, _), a, b in zip(samples, offsets[:-1], offsets[1:]):
        flat[a:b] = np.frombuffer(s.data, dtype=np.uint8)
    batch = EncodedBatch(data, offsets, [s.orientation for s, _ in samples],
                         [s.crop for s, _ in samples], [s.path for s, _ in samples],
                         {i: s.decoded for i, (s, _) in enumerate(samples)
                          if s.decoded is not None})
    return batch, torch.tensor([b for _, b in samples])


def decode_jpegs(datas: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` of a list of byte tensors to RGB on ``device``, without
    torchvision's deprecation warning."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TV_DEPRECATION, category=DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def crop_resize(images: Sequence[torch.Tensor], crops: Sequence[Crop], size: int
                ) -> torch.Tensor:
    """Crop, resize to ``size`` (bicubic, antialiased as PIL does) and flip each upright image
    ``[3, H, W]``: uint8 ``[B, 3, size, size]`` on the images' device. Crop boxes are Python
    ints, so no step waits for the device."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=images[0].device)
    for i, (image, c) in enumerate(zip(images, crops)):
        patch = image[None, :, c.top:c.top + c.h, c.left:c.left + c.w].float()
        patch = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=True)
        if c.flip:
            patch = patch.flip(-1)
        out[i] = patch[0].round_().clamp_(0, 255)
    return out


class GPUDecoder:
    """Turns an :class:`EncodedBatch` into uint8 ``[B, 3, S, S]`` images on ``device``.

    Args:
        device: where to decode (``cuda``; ``cpu`` decodes with torchvision on the CPU).
        input_size: output side in pixels.
    """

    def __init__(self, device: torch.device, input_size: int):
        self.device = torch.device(device)
        self.input_size = input_size
        self.images = 0
        self.cpu_fallbacks = 0  # decoded by PIL: not decodable by nvjpeg, or nvjpeg failed

    def _decode_one(self, data: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return decode_jpegs([data], self.device)[0]
        except RuntimeError:
            return None

    def _decode_pil(self, data: torch.Tensor, path: str) -> torch.Tensor:
        self.cpu_fallbacks += 1
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return to_uint8_tensor(to_rgb(img)).to(self.device)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode {path} ({type(e).__name__}: {e}): re-encode or "
                            f"remove the file, or train with --decode cpu (which skips it)")

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        images: List[Optional[torch.Tensor]] = [None] * len(batch)
        for i, image in batch.decoded.items():  # decoded by PIL in the worker, upright
            images[i] = image.to(self.device, non_blocking=True)
        self.cpu_fallbacks += len(batch.decoded)
        gpu = [i for i in range(len(batch)) if i not in batch.decoded]
        datas = [batch.data[batch.offsets[i]:batch.offsets[i + 1]] for i in gpu]
        try:
            decoded: List[Optional[torch.Tensor]] = (decode_jpegs(datas, self.device) if datas
                                                     else [])
        except RuntimeError:  # one bad file fails the whole call: decode one by one
            decoded = [self._decode_one(d) for d in datas]
        for i, data, image in zip(gpu, datas, decoded):
            images[i] = (self._decode_pil(data, batch.paths[i]) if image is None
                         else orient(image, batch.orientations[i]))
        self.images += len(batch)
        return crop_resize(images, batch.crops, self.input_size)


def build_encoded_dataset(data_path: Optional[PathLike], input_size: int) -> EncodedImages:
    from .data import default_data_root

    return EncodedImages(data_path if data_path is not None else default_data_root(), input_size)

"""Decoding an image file to 8-bit RGB the same way everywhere (pretraining, tools, datasets).

:func:`load_rgb_image` applies the EXIF orientation (cameras store portrait photos as rotated
landscape pixels plus a tag) and converts every Pillow mode to RGB uint8 with its full range:
16-bit and 32-bit integer images are scaled (a plain ``convert("RGB")`` clips them, so a 16-bit
PNG turns white), images with transparency are composited over white (``convert`` would keep
whatever colour the transparent pixels happen to have), palette, grayscale and CMYK images are
converted as usual. Imports no detectron2.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# The label value that no loss or metric counts in semantic label maps (Detectron2's
# ``ignore_label`` convention): toy labels, ADE20K conversion, the heads, mapper and recipes.
IGNORE_LABEL = 255
# Background under transparent pixels (RGB, 0-255).
TRANSPARENT_BACKGROUND = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # scaled from the 16-bit range


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright (EXIF orientation applied) as an 8-bit RGB image.

    Integer modes wider than 8 bits (``I;16*`` and ``I``, which is what Pillow makes of 16-bit
    grayscale PNG and TIFF files) are read as 16-bit (0-65535 maps to 0-255); float images
    (``F``) as 0-1 when their maximum is at most 1, else as 0-255.
    """
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _WIDE_INT_MODES or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255
        gray = np.nan_to_num(values).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Decode ``path`` with :func:`to_rgb` (fully, so a truncated file fails here).

    Raises what Pillow raises for unreadable files (``OSError``, ``ValueError``,
    ``Image.DecompressionBombError``); callers decide whether to skip them.
    """
    with Image.open(path) as img:
        return to_rgb(img)


__all__ = ["load_rgb_image", "to_rgb", "TRANSPARENT_BACKGROUND"]

"""Reconstruction grids: one row per image, columns original / masked / reconstruction.

Masked patches show the model's prediction (:meth:`PretrainModel.reconstruct`: under norm_pix,
with the true patch's mean and standard deviation put back, the usual MAE visualisation; a model
pre-trained with ``--norm_pix_loss off`` predicts the pixels themselves); visible patches are
shown as they are, masked patches as grey in the middle column.

``itpn-visualize-reconstruction CHECKPOINT IMAGE... --out grid.png`` (:func:`cli`, also
``tools/visualize_reconstruction.py``) draws the grid of a pretraining checkpoint: each image is
resized (shorter side) and center-cropped to the checkpoint's input size, the mask drawn from
``--seed``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image

from itpn_d2.data.images import load_rgb_image
from itpn_d2.errors import UserError, disk_full_message, run_cli
from itpn_d2.modeling.hivit import PATCH_SIZE

from .config import num_visible
from .data import DataError, center_crop, denormalize, normalize, to_uint8_tensor
from .export import load_pretrain_model
from .flags import device_type, number_type
from .models import PretrainModel, patchify, random_masking, unpatchify

GAP = 2  # pixels of white between tiles


@torch.no_grad()
def reconstruction_grid(model: PretrainModel, images: torch.Tensor, mask_ratio: float,
                        seed: int = 0) -> np.ndarray:
    """``images``: uint8 ``(B, 3, H, W)`` on the model's device -> uint8 ``(rows, cols, 3)``.

    The mask is drawn from its own generator seeded by ``seed``: no global random state is used.
    """
    x = normalize(images)
    B, _, H, W = x.shape
    grid = (H // PATCH_SIZE, W // PATCH_SIZE)
    masks = random_masking(B, grid[0] * grid[1], mask_ratio,
                           torch.Generator().manual_seed(seed), x.device)
    pred = model.reconstruct(x, masks)  # [B, N, 768] in the space of x
    target = patchify(x)
    m = masks.mask[:, :, None]
    recon = unpatchify(torch.where(m > 0, pred, target), grid)
    original = denormalize(x).clamp(0, 1)
    pixel_mask = unpatchify(m.expand_as(target), grid)  # 1 on masked pixels
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    tiles = torch.stack([original, masked, denormalize(recon).clamp(0, 1)], dim=1)  # [B,3,3,H,W]
    canvas = torch.ones(3, B * (H + GAP) - GAP, 3 * (W + GAP) - GAP, device=x.device)
    for r in range(B):
        for c in range(3):
            top, left = r * (H + GAP), c * (W + GAP)
            canvas[:, top:top + H, left:left + W] = tiles[r, c]
    return (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


def save_image(array: np.ndarray, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def load_image(path: Union[str, Path], size: int) -> torch.Tensor:
    """``path`` resized and center-cropped to ``size``: uint8 ``(3, size, size)``."""
    try:
        return to_uint8_tensor(center_crop(load_rgb_image(path), size))
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for unreadable files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Original / masked / reconstruction grid of a "
                                            "pretraining checkpoint on some images.")
    p.add_argument("checkpoint", help="pretraining checkpoint (pretrain/main.py)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="reconstruction.png", help="output PNG")
    p.add_argument("--mask_ratio", type=number_type(float, 0, 1, low_open=True), default=None,
                   help="default: the checkpoint's training mask ratio")
    p.add_argument("--seed", type=number_type(int, 0), default=0, help="seed of the random mask")
    p.add_argument("--device", type=device_type, default="cpu")
    args = p.parse_args(argv)
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name, e.g. "
                        f"{os.path.join(args.out, 'reconstruction.png')}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available; use --device cpu")
    model, train_args = load_pretrain_model(args.checkpoint)
    size = train_args["input_size"]
    batch = torch.stack([load_image(f, size) for f in args.images])
    model.to(args.device)
    ratio = args.mask_ratio if args.mask_ratio is not None else train_args["mask_ratio"]
    try:
        num_visible((size // PATCH_SIZE) ** 2, ratio)
    except ValueError as e:
        raise UserError(f"--mask_ratio {ratio:g} at input size {size}: {e}") from None
    grid = reconstruction_grid(model, batch.to(args.device), ratio, seed=args.seed)
    try:
        print(f"wrote {save_image(grid, args.out)}")
    except OSError as e:
        if disk_full_message(e):
            raise
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    except ValueError as e:  # Pillow: unknown file extension
        raise UserError(f"cannot write --out {args.out}: {e}; use a .png file name") from None
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    """The command line; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: main(argv))

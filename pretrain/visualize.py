"""Reconstruction grids: one row per image, columns original / masked / reconstruction.

The decoder predicts per-patch normalised pixels (norm_pix), so a predicted patch is shown with
the mean and standard deviation of the true patch put back (the usual MAE visualisation);
visible patches are shown as they are, masked patches as grey in the middle column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .data import denormalize, normalize
from .models import PATCH_SIZE, PretrainModel, patchify, random_masking, unpatchify

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
    pred = model.reconstruct(x, masks).float()  # [B, N, 768] normalised per patch
    target = patchify(x)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    m = masks.mask[:, :, None]
    recon = unpatchify(torch.where(m > 0, pred * std + mean, target), grid)
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

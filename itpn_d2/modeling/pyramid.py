"""The integral feature pyramid: built in pretraining, reused verbatim as the detection neck.

Top-down from stride 16: each step splits every sub-token into a 2x2 grid (``PatchSplit``),
adds a linear lateral from the backbone stage at the new stride, and refines with ``fpn_depth``
MLP blocks; one MLP output block per level. Everything is per token, so the pyramid runs on
visible tokens only (masked pretraining) or on the whole image (downstream) alike.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .features import stage_channels
from .hivit import HiViTFeatures
from .layers import MlpBlock, PatchSplit, init_weights


class IntegralPyramid(nn.Module):
    """Feature pyramid over HiViT stages at strides 4, 8 and 16.

    Args:
        embed_dim: channels of the backbone's stride-16 stage (stride 8: half, stride 4: a quarter).
        fpn_dim: channels of every pyramid level.
        fpn_depth: MLP blocks after each top-down fusion.
        mlp_ratio: MLP ratio of the pyramid blocks.
    """

    def __init__(self, embed_dim: int = 512, fpn_dim: int = 256, fpn_depth: int = 2,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.fpn_dim = fpn_dim
        c4, c8, c16 = stage_channels(embed_dim)
        self.lateral16 = nn.Linear(c16, fpn_dim) if c16 != fpn_dim else nn.Identity()
        self.split16to8 = PatchSplit(c16, fpn_dim)
        self.lateral8 = nn.Linear(c8, fpn_dim, bias=False)
        self.fuse8 = nn.Sequential(*(MlpBlock(fpn_dim, mlp_ratio) for _ in range(fpn_depth)))
        self.split8to4 = PatchSplit(fpn_dim, fpn_dim)
        self.lateral4 = nn.Linear(c4, fpn_dim, bias=False)
        self.fuse4 = nn.Sequential(*(MlpBlock(fpn_dim, mlp_ratio) for _ in range(fpn_depth)))
        self.out16 = MlpBlock(fpn_dim, mlp_ratio)
        self.out8 = MlpBlock(fpn_dim, mlp_ratio)
        self.out4 = MlpBlock(fpn_dim, mlp_ratio)
        self.apply(init_weights)

    def forward(self, feats: HiViTFeatures) -> List[torch.Tensor]:
        """Levels ``[s4, s8, s16]`` in token layout ``(B, N, h, w, fpn_dim)``, h = w = 4, 2, 1."""
        s16 = feats.s16[:, :, None, None, :]  # [B, N, 1, 1, C]
        p8 = self.fuse8(self.split16to8(s16) + self.lateral8(feats.s8))
        p4 = self.fuse4(self.split8to4(p8) + self.lateral4(feats.s4))
        return [self.out4(p4), self.out8(p8), self.out16(self.lateral16(s16))]

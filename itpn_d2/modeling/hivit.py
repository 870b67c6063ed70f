"""HiViT: hierarchical ViT whose early stages are MLP-only, so masked tokens can be dropped.

Stride 4: patch embedding + ``mlp_depth`` MLP blocks at ``embed_dim/4`` channels;
stride 8: merge + ``mlp_depth`` MLP blocks at ``embed_dim/2``; stride 16: merge, absolute
position embedding, ``depth`` global attention blocks at ``embed_dim``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from torch.utils.checkpoint import checkpoint

from .features import stage_channels
from .layers import (AttentionBlock, MlpBlock, PatchEmbed, PatchMerge, check_image_size,
                     gather_tokens, init_weights, relative_position_index, resize_pos_embed,
                     sincos_pos_embed_2d)

PATCH_SIZE = 16


class HiViTFeatures(NamedTuple):
    """Backbone outputs in token layout (see ``layers``), for all or only the visible tokens.

    ``s4``: ``(B, N, 4, 4, C/4)``, ``s8``: ``(B, N, 2, 2, C/2)``, ``s16``: ``(B, N, C)``;
    ``grid``: ``(Hp, Wp)`` token grid of the full image.
    """

    s4: torch.Tensor
    s8: torch.Tensor
    s16: torch.Tensor
    grid: Tuple[int, int]


class HiViT(nn.Module):
    """HiViT backbone.

    Args:
        img_size: pretraining image size (int or (H, W)); sets the trained position grids.
            Any other size that is a multiple of 16 runs, with resized position tables.
        in_chans: input channels.
        embed_dim: channels of the stride-16 stage (stride 8: half, stride 4: a quarter).
        mlp_depth: MLP blocks in each of the stride-4 and stride-8 stages.
        depth: attention blocks at stride 16.
        num_heads: attention heads.
        bridge_mlp_ratio: MLP ratio of the early (MLP-only) stages.
        mlp_ratio: MLP ratio of the attention blocks.
        qkv_bias: bias on the fused QKV projections.
        abs_pos_embed: learn an absolute position embedding (initialised 2D sin-cos).
        rpe: learn a relative position bias per attention block.
        layer_scale_init: initial residual scale per block (``None`` disables layer scale).
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value.
        use_checkpoint: gradient checkpointing of every block (saves memory in training).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3,
                 embed_dim: int = 512, mlp_depth: int = 3, depth: int = 24, num_heads: int = 8,
                 bridge_mlp_ratio: float = 3.0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 abs_pos_embed: bool = True, rpe: bool = False,
                 layer_scale_init: Optional[float] = None, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        img_size = to_2tuple(img_size)
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
        if img_size[0] % PATCH_SIZE or img_size[1] % PATCH_SIZE:
            raise ValueError(f"img_size {img_size} is not a multiple of {PATCH_SIZE}")
        self.img_size = img_size
        self.pretrain_grid = (img_size[0] // PATCH_SIZE, img_size[1] // PATCH_SIZE)
        self.embed_dim = embed_dim
        self.dims = stage_channels(embed_dim)  # strides 4, 8, 16
        self.use_checkpoint = use_checkpoint
        self.rpe = rpe

        n_blocks = 2 * mlp_depth + depth
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        c4, c8, c16 = self.dims
        self.patch_embed = PatchEmbed(in_chans, c4, PATCH_SIZE)
        self.stage4 = nn.ModuleList(
            MlpBlock(c4, bridge_mlp_ratio, dpr[i], layer_scale_init) for i in range(mlp_depth))
        self.merge4to8 = PatchMerge(c4)
        self.stage8 = nn.ModuleList(
            MlpBlock(c8, bridge_mlp_ratio, dpr[mlp_depth + i], layer_scale_init)
            for i in range(mlp_depth))
        self.merge8to16 = PatchMerge(c8)
        if abs_pos_embed:
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(c16, self.pretrain_grid)[None])
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(
            AttentionBlock(c16, num_heads, mlp_ratio, qkv_bias,
                           rel_pos_grid=self.pretrain_grid if rpe else None,
                           drop_path=dpr[2 * mlp_depth + i], layer_scale_init=layer_scale_init)
            for i in range(depth))
        self.apply(init_weights)

    @property
    def num_layers(self) -> int:
        """Layer ids for layer-wise LR decay: 0 = embedding, one per block, merges included."""
        return len(self.stage4) + len(self.stage8) + len(self.blocks) + 3

    def _run(self, block: nn.Module, *args):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor] = None
                ) -> HiViTFeatures:
        """Stage outputs for ``images`` ``(B, C, H, W)``, H and W multiples of 16.

        With ``ids_keep`` ``(B, K)`` (indices of visible tokens, row-major over the
        ``H/16 x W/16`` grid) only those tokens are computed, in ``ids_keep`` order.
        """
        check_image_size(images, PATCH_SIZE)
        B, _, H, W = images.shape
        grid = (H // PATCH_SIZE, W // PATCH_SIZE)
        if ids_keep is not None and (ids_keep.dim() != 2 or ids_keep.shape[0] != B):
            raise ValueError(f"ids_keep must have shape (B={B}, K), got {tuple(ids_keep.shape)}")

        x = self.patch_embed(images, ids_keep)  # [B, N, 4, 4, C/4]
        for blk in self.stage4:
            x = self._run(blk, x)
        s4 = x
        x = self.merge4to8(x)  # [B, N, 2, 2, C/2]
        for blk in self.stage8:
            x = self._run(blk, x)
        s8 = x
        x = self.merge8to16(x).flatten(1, 3)  # [B, N, C]

        if self.pos_embed is not None:
            pos = resize_pos_embed(self.pos_embed, self.pretrain_grid, grid)
            x = x + (pos if ids_keep is None else gather_tokens(pos.expand(B, -1, -1), ids_keep))

        rel_index = None
        if self.rpe:
            rel_index = relative_position_index(grid, images.device)  # [N, N]
            if ids_keep is not None:  # [B, K, K]
                rel_index = rel_index[ids_keep[:, :, None], ids_keep[:, None, :]]
        for blk in self.blocks:
            x = self._run(blk, x, rel_index, grid)
        return HiViTFeatures(s4, s8, x, grid)

    def no_weight_decay_names(self) -> List[str]:
        names = ["pos_embed"] if self.pos_embed is not None else []
        return names + [n for n, _ in self.named_parameters() if "rel_pos_table" in n]


def hivit_layer_id(name: str, num_mlp_blocks: int, num_layers: int) -> int:
    """Layer id of a parameter name relative to the HiViT module (``patch_embed.proj.weight``...).

    0: patch embedding; 1..m: stride-4 blocks; m+1: first merge; then stride-8 blocks, the second
    merge (2m+2) and the attention blocks; ``pos_embed`` joins the first attention block, whose
    input it shapes. Anything else (pyramid, heads) gets ``num_layers``, i.e. no decay.
    """
    m = num_mlp_blocks
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return 0
    if parts[0] == "stage4":
        return 1 + int(parts[1])
    if parts[0] == "merge4to8":
        return m + 1
    if parts[0] == "stage8":
        return m + 2 + int(parts[1])
    if parts[0] == "merge8to16":
        return 2 * m + 2
    if parts[0] == "pos_embed":
        return 2 * m + 3
    if parts[0] == "blocks":
        return 2 * m + 3 + int(parts[1])
    return num_layers

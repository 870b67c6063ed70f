"""Building blocks shared by the HiViT backbone, the integral pyramid and the pretraining heads.

Token layout: early HiViT stages keep every 16x16 image token together with its sub-grid,
``(B, N, h, w, C)`` with ``N`` tokens in row-major order and ``h = w = 4, 2, 1`` at strides
4, 8, 16. Every op before the attention blocks is per token, so dropping masked tokens
(``ids_keep``) before the network gives exactly the per-token outputs of the full image.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp

# The published models use LayerNorm with eps 1e-6 everywhere.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _layer_scale(dim: int, init: Optional[float]) -> nn.Module:
    return LayerScale(dim, init_values=init) if init is not None else nn.Identity()


class MlpBlock(nn.Module):
    """Pre-norm residual MLP block (no token mixing), usable on any token layout ``(..., C)``.

    Args:
        dim: channels.
        mlp_ratio: hidden width / ``dim``.
        drop_path: stochastic depth rate of the residual branch.
        layer_scale_init: initial value of a per-channel residual scale; ``None`` disables it.
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0,
                 layer_scale_init: Optional[float] = None):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mlp(self.norm(x))))


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused QKV).

    Args:
        dim: channels.
        num_heads: attention heads.
        qkv_bias: bias on the fused QKV projection.
        rel_pos_grid: ``(Gh, Gw)`` token grid of pretraining when a relative position bias table
            is learned (shape ``((2Gh-1)(2Gw-1), heads)``); ``None`` for no relative bias.
        attn_drop: dropout on attention weights (training only).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 rel_pos_grid: Optional[Tuple[int, int]] = None, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = rel_pos_grid
        if rel_pos_grid is not None:
            gh, gw = rel_pos_grid
            self.rel_pos_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads))
            nn.init.trunc_normal_(self.rel_pos_table, std=0.02)
        else:
            self.rel_pos_table = None

    def relative_bias(self, rel_index: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Bias ``(heads, *rel_index.shape)`` for the flat offsets ``rel_index`` on ``grid``."""
        gh, gw = self.rel_pos_grid
        hp, wp = grid
        # Resample the table of offsets to the range of offsets of ``grid`` (bicubic, per head).
        # Always, also on the pretraining grid (where bicubic resampling returns the table
        # unchanged): a Python "same grid" branch would be baked into traces and exports.
        table = self.rel_pos_table.t().reshape(1, self.num_heads, 2 * gh - 1, 2 * gw - 1)
        table = F.interpolate(table, size=(2 * hp - 1, 2 * wp - 1), mode="bicubic",
                              align_corners=False)
        return table.reshape(self.num_heads, -1).t()[rel_index].movedim(-1, 0)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, N, C]; attn_bias: broadcastable to [B, heads, N, N]
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with optional layer scale.

    Args:
        dim, num_heads, qkv_bias, rel_pos_grid, attn_drop: see :class:`Attention`.
        mlp_ratio, drop_path, layer_scale_init: see :class:`MlpBlock`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 rel_pos_grid: Optional[Tuple[int, int]] = None, drop_path: float = 0.0,
                 layer_scale_init: Optional[float] = None, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_grid, attn_drop)
        self.ls1 = _layer_scale(dim, layer_scale_init)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rel_index: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        bias = None
        if self.attn.rel_pos_table is not None:
            bias = self.attn.relative_bias(rel_index, grid)  # [heads, N, N] or [heads, B, K, K]
            if bias.dim() == 4:
                bias = bias.transpose(0, 1)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), bias)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """4x4/stride-4 convolution that keeps each 16x16 token's 4x4 sub-grid: ``(B, N, 4, 4, C)``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 16, inner: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.inner = inner
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size // inner,
                              stride=patch_size // inner)
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, _, H, W = x.shape
        hp, wp, s = H // self.patch_size, W // self.patch_size, self.inner
        x = self.proj(x)  # [B, C, H/4, W/4]
        x = x.reshape(B, -1, hp, s, wp, s).permute(0, 2, 4, 3, 5, 1).reshape(B, hp * wp, s, s, -1)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        return self.norm(x)


class PatchMerge(nn.Module):
    """2x2 sub-token merge within each token: ``(B, N, h, w, C) -> (B, N, h/2, w/2, 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm(dim * 4)
        self.proj = nn.Linear(dim * 4, dim * 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, h, w, C = x.shape
        # Concatenation order (dy, dx) = (0,0), (1,0), (0,1), (1,1): the published layout.
        x = x.reshape(B, N, h // 2, 2, w // 2, 2, C).permute(0, 1, 2, 4, 5, 3, 6)
        return self.proj(self.norm(x.reshape(B, N, h // 2, w // 2, 4 * C)))


class PatchSplit(nn.Module):
    """Inverse of a merge: each sub-token becomes a 2x2 grid, ``(B, N, h, w, C) -> (.., 2h, 2w, D)``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.norm = LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim * 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, h, w, _ = x.shape
        x = self.proj(self.norm(x)).reshape(B, N, h, w, 2, 2, self.out_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, N, 2 * h, 2 * w, self.out_dim)


# --------------------------------------------------------------------------- helpers


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens ``ids`` ``[B, K]`` along dim 1 of ``x`` ``[B, N, ...]``."""
    index = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def tokens_to_map(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Token layout ``(B, Hp*Wp, h, w, C)`` or ``(B, Hp*Wp, C)`` -> NCHW ``(B, C, Hp*h, Wp*w)``."""
    hp, wp = grid
    if x.dim() == 3:
        x = x[:, :, None, None, :]
    B, _, h, w, C = x.shape
    return x.reshape(B, hp, wp, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, hp * h, wp * w)


def map_to_tokens(x: torch.Tensor, sub: int) -> torch.Tensor:
    """NCHW ``(B, C, Hp*s, Wp*s)`` -> token layout ``(B, Hp*Wp, s, s, C)``; inverse of the above."""
    B, C, H, W = x.shape
    hp, wp = H // sub, W // sub
    return x.reshape(B, C, hp, sub, wp, sub).permute(0, 2, 4, 3, 5, 1).reshape(B, hp * wp, sub, sub, C)


def sincos_pos_embed_2d(dim: int, grid: Tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position table ``(Gh*Gw, dim)`` (MAE convention: first half encodes x)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                            torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def encode(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(xs), encode(ys)], dim=1).float()


def relative_position_index(grid: Tuple[int, int], device=None) -> torch.Tensor:
    """Flat index ``(N, N)`` into a ``(2Hp-1) x (2Wp-1)`` table of offsets for a token grid."""
    hp, wp = grid
    ys, xs = torch.meshgrid(torch.arange(hp, device=device), torch.arange(wp, device=device),
                            indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + hp - 1
    dx = xs[:, None] - xs[None, :] + wp - 1
    return dy * (2 * wp - 1) + dx


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: Tuple[int, int],
                     dst_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a position table ``(1, Gh*Gw, C)`` to the grid ``dst_grid``.

    There is no "same grid" shortcut: on ``src_grid`` itself bicubic resampling (align_corners
    False, scale 1) returns the table bit for bit, and a Python branch on the grid would be
    baked into ``torch.jit.trace`` / ONNX graphs and become a guard of ``torch.export``.
    """
    C = pos_embed.shape[-1]
    x = pos_embed.reshape(1, *src_grid, C).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    return x.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, C)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear layers, unit LayerNorms, Xavier patch projection (MAE practice)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_image_size(images: torch.Tensor, multiple: int = 16) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % multiple or W % multiple:
        raise ValueError(
            f"image size {H}x{W} is not a multiple of {multiple}; pad or resize the input "
            f"(the Detectron2 backbone pads automatically)")


__all__ = [
    "MlpBlock", "Attention", "AttentionBlock", "PatchEmbed", "PatchMerge", "PatchSplit",
    "gather_tokens", "tokens_to_map", "map_to_tokens", "sincos_pos_embed_2d",
    "relative_position_index", "resize_pos_embed", "init_weights", "check_image_size",
]

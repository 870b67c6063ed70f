"""The pretraining model: masked image modeling (pixels) + masked feature modeling (teachers).

Masking drops tokens: ``ids_keep`` goes through every stage of HiViT and the integral pyramid, so
only visible tokens are computed (MAE style, no mask tokens in the encoder).

MIM (:class:`PixelDecoder`): each pyramid level is mapped per sub-token by LayerNorm + Linear to
``dim``, ``dim/4`` and ``dim/16`` channels at strides 16, 8 and 4, and each token's 1x1, 2x2 and
4x4 sub-grid is folded into its channels, so the three levels give ``dim`` channels per 16x16
token and are summed. A mask token fills the masked positions, fixed 2D sin-cos positions are
added, then transformer blocks, a norm and a linear layer predict the token's 16x16x3 pixels.
The target is normalised per patch (norm_pix, unless ``norm_pix_loss=False``: the pixels
themselves); the loss is the mean squared error over masked patches only. With
``pyramid=False`` (the HiViT + MAE baseline) the decoder reads the backbone's stride-16 output
only.

MFM (:class:`FeatureHead`, one per pyramid level): the level's sub-grid is folded into each
token's channels, LayerNorm + Linear map it to the head width, mask tokens fill the masked
positions, sin-cos positions are added and one attention block over the whole token grid carries
information to the masked positions; a linear layer predicts, at masked tokens only, the
teacher's features of every sub-token. Targets are the teacher's features layer-normalised per
sub-token (no affine). Loss (``mfm_loss``): ``smooth_l1`` (default, beta 1, as the published
CLIP distillation) or ``cosine`` (1 - cosine similarity per sub-token), averaged over masked
sub-tokens; the MFM loss is the mean over the three levels and the total loss is
``mim + mfm_weight * mfm``.

Teachers (run on the full, unmasked image, without autograd, in eval mode):

* ``ema`` (:class:`EMATeacher`): a momentum copy of the student's HiViT backbone; its stage outputs
  at strides 4, 8 and 16 (``C/4``, ``C/2``, ``C`` channels) are the targets of the pyramid levels
  of the same stride. Updated by :meth:`EMATeacher.update` after every optimizer step.
* ``clip`` (:class:`ClipTeacher`): a frozen open_clip ``VisionTransformer`` loaded from a local
  file. The image is resized to the teacher's ``image_size`` and renormalised to its mean/std.
  Targets are the patch tokens of the last transformer block after ``ln_post`` and before the
  projection (``width`` channels, e.g. 768 for ViT-B-16; the class token is dropped), reshaped to
  the teacher's grid and resampled bilinearly to each level's grid (H/4, H/8, H/16).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from itpn_d2.checkpoint import CheckpointError, load_torch_file
from itpn_d2.errors import UserError
from itpn_d2.modeling import ITPN, HiViT, build_itpn, map_to_tokens
from itpn_d2.modeling.itpn import DECODER_SIZES, DecoderSize  # noqa: F401  (re-exported)
from itpn_d2.modeling.hivit import PATCH_SIZE
from itpn_d2.modeling.layers import (AttentionBlock, LayerNorm, gather_tokens, init_weights,
                                     sincos_pos_embed_2d)

from .config import MFM_LOSSES, MFM_MODES, PretrainConfig, num_visible, validate
from .data import denormalize
from .flags import SettingsError

LEVEL_SUBS = (4, 2, 1)  # sub-grid side of each pyramid level, strides 4, 8, 16


class TeacherError(UserError, ValueError):
    """The requested teacher cannot be built (missing or unusable weights, unknown model)."""


# --------------------------------------------------------------------------- masking


class Masks(NamedTuple):
    """Random masking of an ``Hp x Wp`` token grid.

    ``ids_keep`` ``(B, K)`` and ``ids_mask`` ``(B, M)``: sorted token indices (row-major),
    ``mask`` ``(B, N)``: 1.0 at masked tokens.
    """

    ids_keep: torch.Tensor
    ids_mask: torch.Tensor
    mask: torch.Tensor


def random_masking(batch: int, num_tokens: int, mask_ratio: float,
                   generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> Masks:
    """MAE masking: per-sample uniform noise, the lowest ``K`` tokens stay visible.

    The noise is drawn on the CPU from ``generator`` (so that its state can be saved and
    restored exactly) and the indices are then moved to ``device``.
    """
    keep = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep].sort(dim=1).values
    ids_mask = ids_shuffle[:, keep:].sort(dim=1).values
    mask = torch.zeros(batch, num_tokens).scatter_(1, ids_mask, 1.0)
    if device is not None and torch.device(device).type != "cpu":
        return Masks(*(t.pin_memory().to(device, non_blocking=True)
                       for t in (ids_keep, ids_mask, mask)))
    return Masks(ids_keep, ids_mask, mask)


# --------------------------------------------------------------------------- helpers


class SinCosPos(nn.Module):
    """Fixed 2D sin-cos positions ``(1, N, dim)``: a (non-persistent) buffer for the training
    grid, computed on the fly for any other grid."""

    def __init__(self, dim: int, grid: Tuple[int, int]):
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.register_buffer("table", sincos_pos_embed_2d(dim, self.grid)[None], persistent=False)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``x + positions`` for ``x`` ``(B, Gh*Gw, dim)``."""
        table = self.table
        if tuple(grid) != self.grid:
            table = sincos_pos_embed_2d(self.dim, tuple(grid)).to(x.device)[None]
        return x + table.to(x.dtype)


def scatter_visible(x_vis: torch.Tensor, ids_keep: torch.Tensor, mask_token: torch.Tensor,
                    num_tokens: int) -> torch.Tensor:
    """Visible tokens ``(B, K, D)`` back on the full grid ``(B, N, D)``, mask token elsewhere."""
    B, _, D = x_vis.shape
    full = mask_token.to(x_vis.dtype).expand(B, num_tokens, D)
    return full.scatter(1, ids_keep[:, :, None].expand(-1, -1, D), x_vis)


def patchify(images: torch.Tensor, patch: int = PATCH_SIZE) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, N, patch*patch*3)``, pixels in (row, column, channel) order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x: torch.Tensor, grid: Tuple[int, int], patch: int = PATCH_SIZE) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B = x.shape[0]
    hp, wp = grid
    x = x.reshape(B, hp, wp, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, -1, hp * patch, wp * patch)


def patch_mean_std(patches: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each patch's ``(..., P)`` mean and standard deviation (unbiased variance + ``eps``)."""
    return (patches.mean(dim=-1, keepdim=True),
            (patches.var(dim=-1, keepdim=True) + eps).sqrt())


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each patch ``(..., P)`` to zero mean and unit variance (MAE's norm_pix)."""
    mean, std = patch_mean_std(target, eps)
    return (target - mean) / std


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """MFM loss between predictions and (layer-normalised) targets ``(..., T)``."""
    pred = pred.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown MFM loss {kind!r}; choose from {MFM_LOSSES}")


# --------------------------------------------------------------------------- decoders


class FoldedEmbed(nn.Module):
    """LayerNorm + Linear per sub-token, then the ``s x s`` sub-grid folded into channels.

    ``(B, K, s, s, C)`` (or ``(B, K, C)`` when ``s == 1``) -> ``(B, K, dim)``.
    """

    def __init__(self, in_dim: int, sub: int, dim: int):
        super().__init__()
        if dim % (sub * sub):
            raise ValueError(f"width {dim} is not divisible by the {sub}x{sub} sub-grid")
        self.norm = LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim // (sub * sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x[:, :, None, None, :]
        return self.proj(self.norm(x)).flatten(2)


class PixelDecoder(nn.Module):
    """MAE-style pixel decoder over the summed, folded levels (see the module docstring).

    Args:
        levels: ``(channels, sub-grid side)`` of each input level, e.g.
            ``[(256, 4), (256, 2), (256, 1)]`` for a pyramid or ``[(512, 1)]`` for the backbone.
        dim, depth, num_heads: decoder width, blocks and attention heads.
        grid: token grid of training (its position table is precomputed).
        patch_size, in_chans: predicted patch (16x16x3).
        mlp_ratio: MLP ratio of the decoder blocks.
    """

    def __init__(self, levels: Sequence[Tuple[int, int]], dim: int = 512, depth: int = 8,
                 num_heads: int = 16, grid: Tuple[int, int] = (14, 14),
                 patch_size: int = PATCH_SIZE, in_chans: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim = dim
        self.embeds = nn.ModuleList(FoldedEmbed(c, s, dim) for c, s in levels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = SinCosPos(dim, grid)
        self.blocks = nn.ModuleList(AttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, levels: Sequence[torch.Tensor], ids_keep: torch.Tensor,
                grid: Tuple[int, int], ids_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised pixels ``(B, N, 768)``, or ``(B, M, 768)`` at ``ids_out`` only."""
        x = sum(embed(level) for embed, level in zip(self.embeds, levels))  # [B, K, dim]
        x = self.pos(scatter_visible(x, ids_keep, self.mask_token, grid[0] * grid[1]), grid)
        for blk in self.blocks:
            x = blk(x)
        if ids_out is not None:
            x = gather_tokens(x, ids_out)
        return self.pred(self.norm(x))


class FeatureHead(nn.Module):
    """Light MFM decoder of one level: predicts teacher features at masked tokens.

    Args:
        in_dim: channels of the level.
        sub: side of the level's sub-grid per 16x16 token (4, 2, 1 at strides 4, 8, 16).
        dim, num_heads: head width and attention heads.
        target_dim: channels of the teacher's features.
        depth: attention blocks over the token grid.
        grid: token grid of training (its position table is precomputed).
        mlp_ratio: MLP ratio of the blocks.
    """

    def __init__(self, in_dim: int, sub: int, dim: int, num_heads: int, target_dim: int,
                 depth: int = 1, grid: Tuple[int, int] = (14, 14), mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.sub, self.target_dim = dim, sub, target_dim
        self.norm_in = LayerNorm(in_dim)
        self.embed = nn.Linear(in_dim * sub * sub, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = SinCosPos(dim, grid)
        self.blocks = nn.ModuleList(AttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, sub * sub * target_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, level: torch.Tensor, ids_keep: torch.Tensor, ids_mask: torch.Tensor,
                grid: Tuple[int, int]) -> torch.Tensor:
        """``level`` ``(B, K, s, s, C)`` -> predictions ``(B, M, s, s, target_dim)``."""
        B, M = ids_mask.shape
        x = self.embed(self.norm_in(level).flatten(2))  # [B, K, dim]
        x = self.pos(scatter_visible(x, ids_keep, self.mask_token, grid[0] * grid[1]), grid)
        for blk in self.blocks:
            x = blk(x)
        x = self.pred(self.norm(gather_tokens(x, ids_mask)))
        return x.reshape(B, M, self.sub, self.sub, self.target_dim)


# --------------------------------------------------------------------------- teachers


def _layer_norm_targets(tokens: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
    """Masked tokens of ``(B, N, s, s, T)``, layer-normalised over ``T`` (float32)."""
    t = gather_tokens(tokens, ids_mask).float()
    return F.layer_norm(t, t.shape[-1:])


class EMATeacher(nn.Module):
    """Momentum copy of the student's HiViT backbone; never trained by gradients.

    Args:
        backbone: the student's backbone, deep-copied at construction.
    """

    def __init__(self, backbone: HiViT):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.backbone.use_checkpoint = False
        self.target_dims = tuple(backbone.dims)  # strides 4, 8, 16
        self.train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # always in eval mode (no drop path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, ids_mask: torch.Tensor) -> List[torch.Tensor]:
        """Targets ``[(B, M, 4, 4, C/4), (B, M, 2, 2, C/2), (B, M, 1, 1, C)]``."""
        feats = self.backbone(images)
        s16 = feats.s16[:, :, None, None, :]
        return [_layer_norm_targets(t, ids_mask) for t in (feats.s4, feats.s8, s16)]

    @torch.no_grad()
    def update(self, student: HiViT, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` for every tensor."""
        t_params = list(self.backbone.parameters())
        s_params = [p.detach() for p in student.parameters()]
        if len(t_params) != len(s_params):
            raise RuntimeError("EMA teacher and student backbone have different parameters")
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        for tb, sb in zip(self.backbone.buffers(), student.buffers()):
            tb.copy_(sb)


def ema_momentum(step: int, total_steps: int, start: float) -> float:
    """Cosine schedule of the EMA momentum from ``start`` (step 0) to 1.0 (last step)."""
    if total_steps <= 0:
        return start
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - start) * (math.cos(math.pi * progress) + 1) / 2


def _unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TeacherError(f"teacher checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(k.startswith("visual.") for k in sd):  # a whole CLIP model: keep the image tower
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


class _DropLogRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class ClipTeacher(nn.Module):
    """Frozen open_clip image encoder (``VisionTransformer``) with weights from a local file.

    Args:
        name: open_clip model name (``open_clip.list_models()``), e.g. ``ViT-B-16``.
        checkpoint: local file with the weights of the whole CLIP model or of its image tower
            (``visual.*`` keys are taken from a whole model). Nothing is ever downloaded.
    """

    def __init__(self, name: str, checkpoint: Optional[str]):
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if checkpoint is None:
            raise TeacherError(
                f"--mfm clip needs --teacher_checkpoint FILE: local weights of the open_clip "
                f"model {name!r} (nothing is downloaded)")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher checkpoint not found: {path}")
        if name not in open_clip.list_models():
            raise TeacherError(f"unknown open_clip model {name!r} (--teacher); see "
                               f"open_clip.list_models(), e.g. ViT-B-16")
        quiet = _DropLogRecords("No pretrained weights loaded")  # they are loaded below
        logging.getLogger().addFilter(quiet)
        try:
            clip = open_clip.create_model(name, pretrained=None, load_weights=False,
                                          pretrained_image=False, pretrained_text=False)
        except Exception as e:  # open_clip raises assorted types for configs it cannot build
            raise TeacherError(f"cannot build open_clip model {name!r}: {e}") from e
        finally:
            logging.getLogger().removeFilter(quiet)
        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise TeacherError(f"open_clip model {name!r} has a {type(visual).__name__} image "
                               f"tower; the CLIP teacher needs a plain VisionTransformer")
        try:
            obj = load_torch_file(path)
        except CheckpointError as e:
            raise TeacherError(f"cannot read teacher checkpoint (--teacher_checkpoint): "
                               f"{e}") from None
        sd = _unwrap_state_dict(obj)
        expected = visual.state_dict()
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                      if k in sd and tuple(getattr(sd[k], "shape", ())) != tuple(v.shape)]
        if missing or unexpected or mismatched:
            parts = [f"{title} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for title, keys in
                     (("missing", missing), ("unexpected", unexpected),
                      ("shape mismatch", mismatched)) if keys]
            raise TeacherError(
                f"teacher checkpoint {path} does not fit open_clip {name!r} ({', '.join(parts)}): "
                f"it holds another model; pass --teacher with the open_clip model it was saved "
                f"from, or a --teacher_checkpoint of {name!r}")
        visual.load_state_dict(sd)
        self.visual = visual.requires_grad_(False)
        self.name = name
        self.image_size = tuple(visual.image_size)
        self.width = visual.transformer.width
        pre = open_clip.get_model_config(name).get("preprocess_cfg", {})
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.target_dims = (self.width,) * 3
        self.train(False)

    def train(self, mode: bool = True) -> "ClipTeacher":
        return super().train(False)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> CLIP patch tokens ``(B, width, Gh, Gw)``."""
        x = denormalize(images)  # 0-1 RGB
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        out = self.visual.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                                intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"][-1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, ids_mask: torch.Tensor) -> List[torch.Tensor]:
        """Targets ``[(B, M, 4, 4, W), (B, M, 2, 2, W), (B, M, 1, 1, W)]``."""
        tokens = self.tokens(images)
        H, W = images.shape[-2:]
        targets = []
        for sub in LEVEL_SUBS:
            size = (H // PATCH_SIZE * sub, W // PATCH_SIZE * sub)
            t = tokens
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            targets.append(_layer_norm_targets(map_to_tokens(t, sub), ids_mask))
        return targets


# --------------------------------------------------------------------------- model


class PretrainOutput(NamedTuple):
    loss: torch.Tensor
    mim: torch.Tensor  # detached
    mfm: torch.Tensor  # detached (zero without MFM)


class PretrainModel(nn.Module):
    """iTPN encoder + pixel decoder + MFM heads + teacher.

    Args:
        encoder: the iTPN (``build_itpn(...)``); its state dict is the checkpoint's ``model``.
        decoder_dim, decoder_depth, decoder_heads: pixel decoder size.
        teacher: ``None`` (MIM only), an :class:`EMATeacher` or a :class:`ClipTeacher`.
        mfm_dim, mfm_heads: MFM head width and attention heads.
        mfm_weight: weight of the MFM loss.
        mfm_loss: ``smooth_l1`` or ``cosine``.
        norm_pix_loss: MIM predicts each patch normalised to zero mean and unit variance
            (MAE's norm_pix_loss); ``False``: its pixels.
    """

    def __init__(self, encoder: ITPN, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 teacher: Optional[nn.Module] = None, mfm_dim: int = 256, mfm_heads: int = 8,
                 mfm_weight: float = 1.0, mfm_loss: str = "smooth_l1",
                 norm_pix_loss: bool = True):
        super().__init__()
        if mfm_loss not in MFM_LOSSES:
            raise ValueError(f"unknown MFM loss {mfm_loss!r}; choose from {MFM_LOSSES}")
        self.encoder = encoder
        self.has_pyramid = encoder.pyramid is not None
        if self.has_pyramid:
            levels = [(encoder.fpn_dim, s) for s in LEVEL_SUBS]
        else:
            levels = [(encoder.backbone.embed_dim, 1)]
        grid = encoder.backbone.pretrain_grid
        self.decoder = PixelDecoder(levels, decoder_dim, decoder_depth, decoder_heads, grid)
        if teacher is not None and not self.has_pyramid:
            raise ValueError("masked feature modeling supervises pyramid levels; "
                             "a model without pyramid takes no teacher")
        self.teacher = teacher
        self.mfm_heads = nn.ModuleList()
        if teacher is not None:
            self.mfm_heads.extend(
                FeatureHead(encoder.fpn_dim, s, mfm_dim, mfm_heads, t, grid=grid)
                for s, t in zip(LEVEL_SUBS, teacher.target_dims))
        self.mfm_weight = mfm_weight
        self.mfm_loss = mfm_loss
        self.norm_pix_loss = norm_pix_loss

    def forward(self, images: torch.Tensor, masks: Masks) -> PretrainOutput:
        """Loss for ImageNet-normalised ``images`` ``(B, 3, H, W)`` under ``masks``."""
        feats, levels = self.encoder.forward_stages_and_levels(images, masks.ids_keep)
        dec_in = levels if self.has_pyramid else [feats.s16]
        pred = self.decoder(dec_in, masks.ids_keep, feats.grid, ids_out=masks.ids_mask)
        target = gather_tokens(patchify(images), masks.ids_mask)
        if self.norm_pix_loss:
            target = norm_pix(target)
        mim = F.mse_loss(pred.float(), target)
        loss = mim
        mfm = torch.zeros((), device=images.device)
        if self.teacher is not None:
            targets = self.teacher(images, masks.ids_mask)
            per_level = [
                feature_loss(head(level, masks.ids_keep, masks.ids_mask, feats.grid), t,
                             self.mfm_loss)
                for head, level, t in zip(self.mfm_heads, levels, targets)]
            mfm = torch.stack(per_level).mean()
            loss = loss + self.mfm_weight * mfm
        return PretrainOutput(loss, mim.detach(), mfm.detach())

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: Masks) -> torch.Tensor:
        """Predicted pixels of every patch ``(B, N, 768)``, in the space of ``images``. Under
        norm_pix the predictions are per-patch normalised: each is put back with its true
        patch's mean and standard deviation (MAE's visualisation; it shows the shapes the
        model predicts inside a patch, not the patch's colour or contrast)."""
        feats, levels = self.encoder.forward_stages_and_levels(images, masks.ids_keep)
        dec_in = levels if self.has_pyramid else [feats.s16]
        pred = self.decoder(dec_in, masks.ids_keep, feats.grid).float()
        if not self.norm_pix_loss:
            return pred
        mean, std = patch_mean_std(patchify(images))
        return pred * std + mean

    def no_weight_decay_names(self) -> List[str]:
        """Position embeddings, relative position tables, layer scales and mask tokens."""
        names = ["encoder." + n for n in self.encoder.no_weight_decay_names()]
        return names + [n for n, _ in self.named_parameters() if n.endswith("mask_token")]

    def teacher_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """State to checkpoint: the EMA backbone; ``None`` for a frozen (file-loaded) teacher."""
        if isinstance(self.teacher, EMATeacher):
            return self.teacher.backbone.state_dict()
        return None


# --------------------------------------------------------------------------- builder


def encoder_overrides(config: PretrainConfig) -> Dict[str, Any]:
    """``build_itpn`` overrides recorded in checkpoints for the pretraining settings."""
    out: Dict[str, Any] = {"img_size": config.input_size, "rpe": bool(config.rpe)}
    if config.pyramid:
        out["fpn_depth"] = config.fpn_depth
    else:
        out["pyramid"] = False
    if config.layer_scale_init is not None:
        out["layer_scale_init"] = config.layer_scale_init
    if config.drop_path > 0:
        out["drop_path_rate"] = config.drop_path
    return out


def decoder_size(config: PretrainConfig) -> DecoderSize:
    """The model's default decoder size with any ``decoder_*`` / ``mfm_dim`` override applied."""
    changes = {k: v for k, v in (("dim", config.decoder_dim), ("depth", config.decoder_depth),
                                 ("heads", config.decoder_heads), ("mfm_dim", config.mfm_dim))
               if v is not None}
    return DECODER_SIZES[config.model]._replace(**changes)


def build_teacher(mfm: str, encoder: ITPN, teacher: str = "ViT-B-16",
                  teacher_checkpoint: Optional[str] = None) -> Optional[nn.Module]:
    """The MFM teacher of ``--mfm`` (``none``: no teacher) for ``encoder``."""
    if mfm == "none":
        return None
    if mfm == "ema":
        return EMATeacher(encoder.backbone)
    if mfm == "clip":
        return ClipTeacher(teacher, teacher_checkpoint)
    raise SettingsError(f"unknown --mfm {mfm!r}; choose from {MFM_MODES}")


def build_pretrain_model(config: Union[PretrainConfig, Mapping[str, Any]]) -> PretrainModel:
    """The pretraining model of ``config`` (a mapping, e.g. a checkpoint's ``args``, is read
    through :meth:`PretrainConfig.from_dict`)."""
    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.from_dict(config)
    validate(config)
    encoder = build_itpn(config.model, **encoder_overrides(config))
    size = decoder_size(config)
    teacher = build_teacher(config.mfm, encoder, config.teacher, config.teacher_checkpoint)
    try:
        return PretrainModel(encoder, size.dim, size.depth, size.heads, teacher, size.mfm_dim,
                             size.mfm_heads, config.mfm_weight, config.mfm_loss,
                             config.norm_pix_loss)
    except (ValueError, AssertionError) as e:  # widths that do not divide (decoder heads, MFM)
        raise SettingsError(f"the decoder / MFM head sizes do not fit together: {e} "
                            f"(--decoder_dim, --decoder_heads, --mfm_dim)") from e

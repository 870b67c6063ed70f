"""Detectron2 backbone: the shared iTPN model, with its pre-trained pyramid as the neck.

The wrapper only adapts: the pyramid levels at strides 4, 8 and 16 *are* the pre-trained
integral pyramid (no lateral or output convolutions are added), and the two coarser levels
used by RPN are parameter-free 2x average poolings of the level above, as in the published
detector. Every neck weight therefore comes from pre-training; only the task heads start random.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from ..modeling import ITPN, LEVELS, STAGES, feature_info, tokens_to_map
from ..modeling.hivit import PATCH_SIZE

# Pyramid outputs (fpn_dim channels each) and backbone stages (for necks that want them too,
# e.g. UPerNet's "pyramid level concatenated with the backbone stage of the same stride"), from
# the network's own description (itpn_d2.modeling.features); p5 and p6 are the 2x poolings.
_POOLED = ("p5", "p6")
PYRAMID_STRIDES = {name: stride for name, stride, _ in LEVELS}
PYRAMID_STRIDES.update({name: LEVELS[-1][1] * 2 ** (i + 1) for i, name in enumerate(_POOLED)})
STAGE_STRIDES = {name: stride for name, stride, _ in STAGES}
DEFAULT_OUT_FEATURES = tuple(PYRAMID_STRIDES)


def itpn_output_shapes(embed_dim: int, fpn_dim: int) -> Dict[str, ShapeSpec]:
    """Shapes of every output :class:`ITPNBackbone` offers (``p2``-``p6``, ``c2``-``c4``) for a
    network with these widths (``fpn_dim`` 0: no pyramid, stages only)."""
    shapes = {f["name"]: ShapeSpec(channels=f["num_chs"], stride=f["reduction"])
              for f in feature_info(embed_dim, fpn_dim)}
    if fpn_dim:
        shapes.update({name: ShapeSpec(channels=fpn_dim, stride=PYRAMID_STRIDES[name])
                       for name in _POOLED})
    return shapes


class ITPNBackbone(Backbone):
    """HiViT + integral pyramid as a Detectron2 backbone with outputs ``p2`` ... ``p6``.

    Args:
        net: an :class:`~itpn_d2.modeling.ITPN` built with its pyramid, e.g.
            ``L(build_itpn)(name="itpn_base", drop_path_rate=0.05)``. Held as ``self.net``, so
            detector parameter names are ``backbone.net.<name in the ITPN state dict>``.
        out_features: names to return, any of ``p2``-``p6`` (pyramid levels at strides 4-64,
            ``fpn_dim`` channels; ``p5``/``p6`` are 2x average poolings of ``p4``/``p5``) and
            ``c2``-``c4`` (backbone stages at strides 4, 8, 16 with ``net.backbone.dims``
            channels).
        size_divisibility: Detectron2 pads every batch to a multiple of this. The network needs
            16 (its token size); 32 (the published detection setting) keeps ``p5`` exact.
        square_pad: if > 0, pad every batch to this square size instead (e.g. 1024 for
            large-scale jitter); images larger than it are an error.
        freeze_backbone: train with the HiViT (``net.backbone``) fixed: its parameters get
            ``requires_grad=False`` (Detectron2's optimizer skips them) and it stays in eval
            mode (no drop path); the pyramid and the heads train (a linear-probe-like
            protocol for comparing pre-trained backbones).
        freeze_pyramid: likewise for the pyramid (``net.pyramid``). With ``freeze_backbone``
            only the detector's heads train: the protocol that asks whether a pyramid can
            serve a frozen backbone as it is (pre-trained with it, or random).
    """

    def __init__(self, net: ITPN, out_features: Sequence[str] = DEFAULT_OUT_FEATURES,
                 size_divisibility: int = 32, square_pad: int = 0,
                 freeze_backbone: bool = False, freeze_pyramid: bool = False):
        super().__init__()
        if not isinstance(net, ITPN):
            raise TypeError(f"net must be an itpn_d2.modeling.ITPN, got {type(net).__name__}")
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in PYRAMID_STRIDES and f not in STAGE_STRIDES]
        if unknown or not out_features:
            raise ValueError(f"out_features {out_features} invalid; choose from "
                             f"{list(PYRAMID_STRIDES) + list(STAGE_STRIDES)}")
        if net.pyramid is None and any(f in PYRAMID_STRIDES for f in out_features):
            raise ValueError("net was built with pyramid=False but out_features asks for "
                             "pyramid levels (p2-p6); build it with pyramid=True")
        if freeze_pyramid and net.pyramid is None:
            raise ValueError("freeze_pyramid=True but net was built with pyramid=False: there is "
                             "no pyramid to freeze")
        if size_divisibility % PATCH_SIZE:
            raise ValueError(f"size_divisibility must be a multiple of {PATCH_SIZE} (the token "
                             f"size), got {size_divisibility}")
        if square_pad % max(size_divisibility, PATCH_SIZE):
            raise ValueError(f"square_pad {square_pad} is not a multiple of size_divisibility "
                             f"{size_divisibility}")
        self.net = net
        self._size_divisibility = size_divisibility
        self._square_pad = square_pad
        self._out_features = out_features
        shapes = itpn_output_shapes(net.backbone.embed_dim, net.fpn_dim)
        self._out_feature_strides = {f: shapes[f].stride for f in out_features}
        self._out_feature_channels = {f: shapes[f].channels for f in out_features}
        self.freeze_backbone = freeze_backbone
        self.freeze_pyramid = freeze_pyramid
        for part in self._frozen_parts():
            part.requires_grad_(False)
            part.eval()

    def _frozen_parts(self) -> List[nn.Module]:
        return ([self.net.backbone] if self.freeze_backbone else []) + \
            ([self.net.pyramid] if self.freeze_pyramid else [])

    def train(self, mode: bool = True) -> "ITPNBackbone":
        super().train(mode)
        for part in self._frozen_parts():  # the trainer calls model.train(): keep them fixed
            part.eval()
        return self

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x``: normalised images ``(B, C, H, W)``, H and W multiples of 16 (Detectron2 pads)."""
        if x.dim() != 4 or x.shape[-2] % PATCH_SIZE or x.shape[-1] % PATCH_SIZE:
            raise ValueError(
                f"ITPNBackbone needs (B, C, H, W) input with H and W multiples of {PATCH_SIZE}, "
                f"got {tuple(x.shape)}; Detectron2 pads to size_divisibility="
                f"{self._size_divisibility} when the model is called on a list of images")
        if self._square_pad and max(x.shape[-2:]) > self._square_pad:
            raise ValueError(f"input {tuple(x.shape[-2:])} is larger than square_pad="
                             f"{self._square_pad}; resize the images or raise square_pad")
        if any(f in PYRAMID_STRIDES for f in self._out_features):
            feats, levels = self.net.forward_stages_and_levels(x)
            p2, p3, p4 = (tokens_to_map(level, feats.grid) for level in levels)
            maps = {"p2": p2, "p3": p3, "p4": p4}
            if any(f in _POOLED for f in self._out_features):
                maps["p5"] = F.avg_pool2d(p4, kernel_size=2, stride=2)
                maps["p6"] = F.avg_pool2d(maps["p5"], kernel_size=2, stride=2)
        else:
            feats = self.net.backbone(x)
            maps = {}
        for name, stage in zip(STAGE_STRIDES, (feats.s4, feats.s8, feats.s16)):
            if name in self._out_features:
                maps[name] = tokens_to_map(stage, feats.grid)
        return {f: maps[f] for f in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f],
                             stride=self._out_feature_strides[f]) for f in self._out_features}

"""iTPN = HiViT backbone + integral pyramid: the one model shared by pretraining and Detectron2."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .features import feature_info
from .hivit import HiViT, HiViTFeatures, hivit_layer_id
from .layers import tokens_to_map
from .pyramid import IntegralPyramid


class ITPN(nn.Module):
    """A HiViT backbone with the integral feature pyramid on top (``pyramid=None``: backbone
    only). :func:`build_itpn` builds both parts from one set of keyword arguments.

    Args:
        backbone: the :class:`~itpn_d2.modeling.hivit.HiViT`.
        pyramid: an :class:`~itpn_d2.modeling.pyramid.IntegralPyramid` over the backbone's
            stages, or ``None``.
    """

    def __init__(self, backbone: HiViT, pyramid: Optional[IntegralPyramid] = None):
        super().__init__()
        self.backbone = backbone
        self.pyramid = pyramid
        # What forward_intermediates returns (timm's convention): the pyramid levels, or the
        # backbone stages of a model without pyramid. Read by timm's features_only wrapper.
        kind = "stage" if pyramid is None else "pyramid"
        self.feature_info = [f for f in feature_info(backbone.embed_dim, self.fpn_dim)
                             if f["kind"] == kind]
        # Set by build_itpn so that checkpoints can record how to rebuild the model.
        self.model_name: Optional[str] = None
        self.model_overrides: Dict[str, Any] = {}

    @property
    def fpn_dim(self) -> int:
        return self.pyramid.fpn_dim if self.pyramid is not None else 0

    def forward_pyramid(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor] = None
                        ) -> List[torch.Tensor]:
        """Pyramid levels ordered by stride ``[s4, s8, s16]``.

        Without ``ids_keep``: NCHW maps ``(B, fpn_dim, H/s, W/s)``. With ``ids_keep`` ``(B, K)``:
        visible tokens only, token layout ``(B, K, h, w, fpn_dim)`` with ``h = w = 4, 2, 1``.
        """
        if self.pyramid is None:
            raise RuntimeError("this model was built with pyramid=False; it has no pyramid")
        feats = self.backbone(images, ids_keep)
        levels = self.pyramid(feats)
        if ids_keep is not None:
            return levels
        return [tokens_to_map(level, feats.grid) for level in levels]

    def forward_stages_and_levels(self, images: torch.Tensor,
                                  ids_keep: Optional[torch.Tensor] = None
                                  ) -> Tuple[HiViTFeatures, Optional[List[torch.Tensor]]]:
        """Backbone stages and (if built) pyramid levels, both in token layout."""
        feats = self.backbone(images, ids_keep)
        return feats, (self.pyramid(feats) if self.pyramid is not None else None)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's unpooled features: the stride-16 backbone stage, NCHW ``(B, C, H/16, W/16)``
        (the ``final`` of :meth:`forward_intermediates`)."""
        feats = self.backbone(images)
        return tokens_to_map(feats.s16, feats.grid)

    forward = forward_pyramid

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor],
                                         Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the maps of :attr:`feature_info` (pyramid levels at strides 4, 8,
        16, or the backbone stages without pyramid).

        Args:
            x: images ``(B, C, H, W)``, H and W multiples of 16.
            indices: entries of ``feature_info`` to return: ``None`` all, an int ``n`` the last
                ``n``, or a list of (possibly negative) indices.
            norm: accepted for timm; the network has no final norm, so nothing changes.
            stop_early: accepted for timm; every level needs the whole backbone, so nothing
                changes.
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list; otherwise ``(final, list)`` with
                ``final`` the stride-16 backbone stage (NCHW).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.feature_info)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n if -n <= i < n else i for i in indices]
        if not all(0 <= i < n for i in take):
            raise IndexError(f"indices {indices} out of range for {n} features")
        feats, levels = self.forward_stages_and_levels(x)
        stages = (feats.s4, feats.s8, feats.s16)
        maps = [tokens_to_map(t, feats.grid) for t in (levels if levels is not None else stages)]
        out = [maps[i] if output_fmt == "NCHW" else maps[i].permute(0, 2, 3, 1) for i in take]
        if intermediates_only:
            return out
        return tokens_to_map(feats.s16, feats.grid), out

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter of this model for layer-wise LR decay.

        Backbone parameters get their depth (see :func:`hivit_layer_id`); the pyramid, which
        sits on top of the last block, gets ``num_layers`` (the same as task heads).
        """
        if name.startswith("backbone."):
            return hivit_layer_id(name[len("backbone."):], len(self.backbone.stage4),
                                  self.backbone.num_layers)
        return self.backbone.num_layers

    def no_weight_decay_names(self) -> List[str]:
        """Parameters that take no weight decay beyond norms and biases (which callers add)."""
        names = ["backbone." + n for n in self.backbone.no_weight_decay_names()]
        return names + [n for n, _ in self.named_parameters() if n.endswith(".gamma")]

    # timm's model conventions (its optimizer factory and training scripts call these)
    def no_weight_decay(self) -> Set[str]:
        return set(self.no_weight_decay_names())

    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[int]]:
        """Parameter name -> ``(layer id,)``, the grouping of timm's layer-wise LR decay: the
        same ids as :meth:`layer_id` (``coarse`` changes nothing: the ids are per block)."""
        return lambda name: (self.layer_id(name),)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.use_checkpoint = enable


# --------------------------------------------------------------------------- arch table

ARCHS: Dict[str, Dict[str, Any]] = {
    "itpn_nano": dict(embed_dim=128, mlp_depth=1, depth=4, num_heads=4, fpn_dim=64),
    "itpn_tiny": dict(embed_dim=384, mlp_depth=2, depth=10, num_heads=6),
    "itpn_small": dict(embed_dim=384, mlp_depth=4, depth=20, num_heads=6),
    "itpn_base": dict(embed_dim=512, mlp_depth=3, depth=24, num_heads=8),
    "itpn_large": dict(embed_dim=768, mlp_depth=2, depth=40, num_heads=12),
}


class DecoderSize(NamedTuple):
    """Pretraining decoder of an arch: pixel decoder and MFM heads (not part of the ITPN)."""

    dim: int
    depth: int
    heads: int
    mfm_dim: int
    mfm_heads: int


# The pretraining decoder of each entry of ARCHS (same keys; a test keeps them equal). Base
# follows the published pixel recipe (512-d, 8 blocks, 16 heads). Checkpoints' decoder layout
# follows from these sizes.
DECODER_SIZES: Dict[str, DecoderSize] = {
    "itpn_nano": DecoderSize(128, 2, 4, 128, 4),
    "itpn_tiny": DecoderSize(256, 4, 8, 256, 8),
    "itpn_small": DecoderSize(512, 8, 16, 256, 8),
    "itpn_base": DecoderSize(512, 8, 16, 256, 8),
    "itpn_large": DecoderSize(512, 8, 16, 256, 8),
}

# Every build_itpn argument with its default: HiViT's (read once from its signature), then the
# pyramid's (its width and depth; ``pyramid=False`` leaves it out).
HIVIT_DEFAULTS: Dict[str, Any] = {p.name: p.default
                                  for p in inspect.signature(HiViT.__init__).parameters.values()
                                  if p.name != "self"}
PYRAMID_DEFAULTS: Dict[str, Any] = {"pyramid": True, "fpn_dim": 256, "fpn_depth": 2}
ITPN_DEFAULTS: Dict[str, Any] = {**HIVIT_DEFAULTS, **PYRAMID_DEFAULTS}
BUILD_ARGS = tuple(ITPN_DEFAULTS)


def itpn_arguments(name: str, **overrides: Any) -> Dict[str, Any]:
    """Every ``ITPN`` argument that ``build_itpn(name, **overrides)`` uses, without building it.

    Args:
        name: a key of :data:`ARCHS`.
        overrides: as for :func:`build_itpn` (not checked here).
    """
    if name not in ARCHS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(ARCHS)}")
    return {**ITPN_DEFAULTS, **ARCHS[name], **overrides}


def build_itpn(name: str, **overrides: Any) -> ITPN:
    """Build a named iTPN (``itpn_nano`` ... ``itpn_large``) with keyword overrides.

    Defaults follow the published pixel model (``rpe=False``, absolute position embedding,
    ``fpn_depth=2``, no layer scale, ``img_size=224``). Unknown overrides raise ``TypeError``.
    """
    if name not in ARCHS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(ARCHS)}")
    unknown = sorted(set(overrides) - set(BUILD_ARGS))
    if unknown:
        raise TypeError(f"build_itpn({name!r}) got unknown arguments {unknown}; "
                        f"valid: {', '.join(BUILD_ARGS)}")
    args = itpn_arguments(name, **overrides)
    backbone = HiViT(**{k: args[k] for k in HIVIT_DEFAULTS})
    pyramid = (IntegralPyramid(args["embed_dim"], args["fpn_dim"], args["fpn_depth"],
                               args["mlp_ratio"]) if args["pyramid"] else None)
    model = ITPN(backbone, pyramid)
    model.model_name = name
    model.model_overrides = dict(overrides)
    return model


def _builder(name: str):
    def build(**overrides: Any) -> ITPN:
        return build_itpn(name, **overrides)

    build.__name__ = name
    build.__doc__ = f"{name}: {ARCHS[name]} (see :func:`build_itpn`)."
    return build


itpn_nano = _builder("itpn_nano")
itpn_tiny = _builder("itpn_tiny")
itpn_small = _builder("itpn_small")
itpn_base = _builder("itpn_base")
itpn_large = _builder("itpn_large")

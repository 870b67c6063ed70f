"""Layer-wise learning-rate decay and weight-decay exemptions for detectors with an iTPN backbone.

Layer ids come from :meth:`ITPN.layer_id`: 0 for the patch embedding, one per block (the two
patch merges count as blocks; ``pos_embed`` shares the id of the first attention block), and
``num_layers`` (= ``2 * mlp_depth + depth + 3``, 33 for ``itpn_base``) for the pyramid. Task
heads also get ``num_layers``. A parameter's learning rate is
``base_lr * lr_decay_rate ** (num_layers - layer_id)``: heads and the pyramid train at the base
rate (times ``pyramid_lr_factor`` for the pyramid), the last attention block at
``base_lr * decay``, the patch embedding at ``base_lr * decay ** num_layers``.

No weight decay on position embeddings, relative position tables, layer-scale gammas
(``ITPN.no_weight_decay_names``) and normalisation layers (``weight_decay_norm``, including
Detectron2's channels-first ``LayerNorm`` used by "LN" heads).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.solver.build import reduce_param_groups

from .backbone import ITPNBackbone

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, D2LayerNorm,
              FrozenBatchNorm2d)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


def find_itpn_backbones(model: nn.Module) -> Dict[str, ITPNBackbone]:
    """``{prefix of the wrapped net ("backbone.net."): backbone}`` for every ITPNBackbone."""
    found = {(name + "." if name else "") + "net.": m for name, m in _unwrap(model).named_modules()
             if isinstance(m, ITPNBackbone)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no ITPNBackbone; layer-wise LR decay "
                         f"and ITPN checkpoints need one")
    return found


def itpn_layer_id(model: nn.Module, name: str) -> int:
    """Layer id of the detector parameter ``name``; anything outside the backbone net (heads)
    gets ``num_layers`` like the pyramid."""
    backbones = find_itpn_backbones(model)
    for prefix, bb in backbones.items():
        if name.startswith(prefix):
            return bb.net.layer_id(name[len(prefix):])
    return max(bb.net.backbone.num_layers for bb in backbones.values())


def itpn_lr_factor_func(model: nn.Module, lr_decay_rate: float = 1.0,
                        pyramid_lr_factor: float = 1.0) -> Callable[[str], float]:
    """An ``lr_factor_func`` for :func:`detectron2.solver.get_default_optimizer_params`.

    Args:
        model: the detector (or any module holding an :class:`ITPNBackbone`).
        lr_decay_rate: per-layer decay (0.90 base, 0.95 large in the published recipes).
        pyramid_lr_factor: extra LR factor for the pyramid (1.0: same LR as the heads).
    """
    backbones = find_itpn_backbones(model)
    num_layers = max(bb.net.backbone.num_layers for bb in backbones.values())

    def lr_factor(name: str) -> float:
        for prefix, bb in backbones.items():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                factor = lr_decay_rate ** (bb.net.backbone.num_layers - bb.net.layer_id(rest))
                return factor * (pyramid_lr_factor if rest.startswith("pyramid.") else 1.0)
        return 1.0

    lr_factor.num_layers = num_layers  # for logging / tests
    return lr_factor


def no_weight_decay_param_names(model: nn.Module) -> List[str]:
    """Full names of the backbone parameters exempt from weight decay besides norms."""
    return [prefix + n for prefix, bb in find_itpn_backbones(model).items()
            for n in bb.net.no_weight_decay_names()]


def get_itpn_optimizer_params(model: nn.Module, base_lr: float, lr_decay_rate: float = 1.0,
                              pyramid_lr_factor: float = 1.0,
                              weight_decay: Optional[float] = None,
                              weight_decay_norm: Optional[float] = 0.0,
                              weight_decay_bias: Optional[float] = None) -> List[Dict[str, Any]]:
    """Parameter groups with layer-wise LR decay and the weight-decay exemptions above.

    Like :func:`detectron2.solver.get_default_optimizer_params` with
    ``lr_factor_func=itpn_lr_factor_func(model, ...)``, plus zero weight decay for
    ``ITPN.no_weight_decay_names()`` and every normalisation layer.

    Args:
        model: the detector; set by the train tool (``cfg.optimizer.params.model = model``).
        base_lr: LR before decay (``"${..lr}"`` in recipes).
        lr_decay_rate, pyramid_lr_factor: see :func:`itpn_lr_factor_func`.
        weight_decay: default weight decay (``None``: the optimizer's).
        weight_decay_norm: weight decay of normalisation layers (``None``: like the rest).
        weight_decay_bias: weight decay of biases (``None``: like the rest, as published).
    """
    lr_factor = itpn_lr_factor_func(model, lr_decay_rate, pyramid_lr_factor)
    no_decay = set(no_weight_decay_param_names(model))
    defaults: Dict[str, Any] = {"lr": base_lr}
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in _unwrap(model).named_modules():
        for pname, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            name = f"{module_name}.{pname}" if module_name else pname
            group = copy.copy(defaults)
            group["lr"] = base_lr * lr_factor(name)
            if isinstance(module, NORM_TYPES) and weight_decay_norm is not None:
                group["weight_decay"] = weight_decay_norm
            if pname == "bias" and weight_decay_bias is not None:
                group["weight_decay"] = weight_decay_bias
            if name in no_decay:
                group["weight_decay"] = 0.0
            params.append({"params": [value], **group})
    return reduce_param_groups(params)

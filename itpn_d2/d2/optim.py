"""Layer-wise learning-rate decay and weight-decay exemptions for detectors with an iTPN backbone,
as arguments of Detectron2's :func:`~detectron2.solver.get_default_optimizer_params` (the way
ViTDet's recipes pass ``get_vit_lr_decay_rate`` and ``{"pos_embed": {"weight_decay": 0}}``).

Layer ids come from :meth:`ITPN.layer_id`: 0 for the patch embedding, one per block (the two
patch merges count as blocks; ``pos_embed`` shares the id of the first attention block), and
``num_layers`` (= ``2 * mlp_depth + depth + 3``, 33 for ``itpn_base``) for the pyramid. Task
heads also get ``num_layers``. A parameter's learning rate is
``base_lr * lr_decay_rate ** (num_layers - layer_id)``: heads and the pyramid train at the base
rate (times ``pyramid_lr_factor`` for the pyramid), the last attention block at
``base_lr * decay``, the patch embedding at ``base_lr * decay ** num_layers``.

No weight decay on position embeddings, relative position tables, layer-scale gammas
(``ITPN.no_weight_decay_names``, through :func:`no_weight_decay_overrides`) and normalisation
layers (``weight_decay_norm=0.0``).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

from .backbone import ITPNBackbone


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
        model: the detector (or any module holding an :class:`ITPNBackbone`; a DDP-wrapped
            one too, whose parameter names start with ``module.``).
        lr_decay_rate: per-layer decay (0.90 base, 0.95 large in the published recipes).
        pyramid_lr_factor: extra LR factor for the pyramid (1.0: same LR as the heads).
    """
    wrapped = "module." if _unwrap(model) is not model else ""
    backbones = {wrapped + p: bb for p, bb in find_itpn_backbones(model).items()}

    def lr_factor(name: str) -> float:
        for prefix, bb in backbones.items():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                factor = lr_decay_rate ** (bb.net.backbone.num_layers - bb.net.layer_id(rest))
                return factor * (pyramid_lr_factor if rest.startswith("pyramid.") else 1.0)
        return 1.0

    return lr_factor


def no_weight_decay_param_names(model: nn.Module) -> List[str]:
    """Full names of the backbone parameters exempt from weight decay besides norms."""
    return [prefix + n for prefix, bb in find_itpn_backbones(model).items()
            for n in bb.net.no_weight_decay_names()]


def no_weight_decay_overrides(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """``overrides`` for :func:`detectron2.solver.get_default_optimizer_params`: no weight
    decay for the parameters of ``ITPN.no_weight_decay_names()`` (``pos_embed``,
    ``rel_pos_table``, ``gamma``).

    Detectron2 matches overrides by a parameter's own name (the last part of its full name), so
    a head parameter of the same name would lose its weight decay too; that is refused.

    Raises:
        ValueError: a parameter outside ``no_weight_decay_names()`` has one of those names.
    """
    exempt = set(no_weight_decay_param_names(model))
    names = {n.rsplit(".", 1)[-1] for n in exempt}
    clash = [n for n, _ in _unwrap(model).named_parameters()
             if n.rsplit(".", 1)[-1] in names and n not in exempt]
    if clash:
        raise ValueError(f"parameters {clash[:3]} share a name with the iTPN parameters that "
                         f"take no weight decay ({sorted(names)}); rename them, or give "
                         f"get_default_optimizer_params explicit overrides")
    return {n: {"weight_decay": 0.0} for n in sorted(names)}

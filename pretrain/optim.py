"""Learning-rate schedule, AdamW over decay / no-decay parameter groups, and a run's step counts.

Counting: a *step* is one optimizer update (``accum_iter`` data iterations). An epoch has
``steps_per_epoch = (images per process // batch_size) // accum_iter`` steps; leftover images
of an epoch are not used. The learning rate follows a per-step linear warm-up over
``warmup_epochs`` then a cosine decay to ``min_lr``; the EMA momentum follows a cosine from
``ema_momentum`` to 1 over all steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from .config import PretrainConfig
from .models import PretrainModel


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: PretrainModel, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters split into decay / no-decay (norms, biases, positions, layer scale,
    mask tokens). Teacher parameters are frozen and not included."""
    skip = set(model.no_weight_decay_names())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: PretrainModel, config: PretrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused where the device has the kernels) over :func:`param_groups`."""
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=tuple(config.opt_betas))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused kernels unavailable for this device / dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


@dataclass
class Schedule:
    """Step counts of a run (see the module docstring)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    end_step: int  # total_steps, or --max_steps when smaller


def build_schedule(config: PretrainConfig, samples_per_rank: int) -> Schedule:
    steps_per_epoch = samples_per_rank // config.batch_size // config.accum_iter
    total = steps_per_epoch * config.epochs
    end = min(total, config.max_steps) if config.max_steps else total
    return Schedule(steps_per_epoch, total, int(round(config.warmup_epochs * steps_per_epoch)),
                    end)

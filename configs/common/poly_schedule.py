"""Poly learning-rate schedule with linear warm-up (mmsegmentation's ``poly`` policy)."""

from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def poly_schedule(max_iter, warmup_iters=1500, power=1.0, warmup_factor=1e-6):
    """LR multiplier ``(1 - iter / max_iter) ** power``, times a linear warm-up from
    ``warmup_factor`` over the first ``warmup_iters`` (a fraction of the run, so overriding
    ``train.max_iter`` keeps its share). Published ADE20K setting: 1500 of 160k, power 1.0."""
    return L(WarmupParamScheduler)(
        scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=power),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )

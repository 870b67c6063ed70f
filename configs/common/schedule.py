"""Step schedules in iterations (the published recipes count epochs: 1x = 12 epochs with
steps at 9 and 11, 3x = 36 with steps at 27 and 33; 90k iterations at batch 16 ~ 12 epochs)."""

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def step_schedule(max_iter, steps=(9 / 12, 11 / 12), warmup_iters=500, warmup_factor=0.001):
    """LR multiplier: linear warm-up over ``warmup_iters``, then x0.1 at each fraction in
    ``steps`` of ``max_iter``. (The 500-iteration warm-up is mmdetection's default, which the
    published detector inherits.)"""
    milestones = [int(round(max_iter * s)) for s in steps]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1 ** i for i in range(len(steps) + 1)],
            milestones=milestones + [max_iter],
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


lr_multiplier_1x = step_schedule(90000)
lr_multiplier_3x = step_schedule(270000, steps=(27 / 36, 33 / 36))

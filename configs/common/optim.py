"""AdamW with layer-wise LR decay over the iTPN backbone (published: lr 2e-4, wd 0.05,
decay 0.90 for base), built like ViTDet's recipes by Detectron2's
``get_default_optimizer_params``. No weight decay on norms, position embeddings, relative
position tables and layer scale; see :mod:`itpn_d2.d2.optim` for the layer ids."""

import torch

from detectron2.config import LazyCall as L
from detectron2.solver import get_default_optimizer_params

from itpn_d2.d2.optim import itpn_lr_factor_func, no_weight_decay_overrides

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        model=None,  # set to the detector by the train tool before instantiation
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        lr_factor_func=L(itpn_lr_factor_func)(
            model="${..model}",
            lr_decay_rate=0.90,
            pyramid_lr_factor=1.0,  # the pyramid trains at the heads' rate
        ),
        overrides=L(no_weight_decay_overrides)(model="${..model}"),
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)

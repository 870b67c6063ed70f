"""Mask R-CNN, iTPN-B (HiViT-B + pre-trained pyramid), COCO 2017, 1x schedule.

Published settings: batch 16, 90k iterations (~12 epochs, steps at 9 and 11), AdamW lr 2e-4,
betas (0.9, 0.999), wd 0.05, layer decay 0.90, drop path 0.05, multi-scale resize + crop,
pad 32, AMP. Unlike the published detector, the pyramid is reused exactly as pre-trained.

    python tools/lazyconfig_train_net.py --config-file configs/coco/mask_rcnn_itpn_b.py \
        --num-gpus 8 train.init_checkpoint=/path/to/pretrain_checkpoint.pth
"""

from ..common.coco import dataloader
from ..common.models.mask_rcnn_itpn import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import step_schedule
from ..common.train import train

model.backbone.net.name = "itpn_base"
model.backbone.net.drop_path_rate = 0.05

dataloader.train.total_batch_size = 16

optimizer.lr = 2e-4
optimizer.weight_decay = 0.05
optimizer.params.lr_factor_func.lr_decay_rate = 0.90

train.max_iter = 90000
lr_multiplier = step_schedule(train.max_iter, steps=(9 / 12, 11 / 12))

"""Mask R-CNN, iTPN-B, 3x schedule (36 epochs, steps at 27 and 33), drop path 0.3."""

from ..common.schedule import step_schedule
from .mask_rcnn_itpn_b import dataloader, model, optimizer, train

model.backbone.net.drop_path_rate = 0.3

train.max_iter = 270000
lr_multiplier = step_schedule(train.max_iter, steps=(27 / 36, 33 / 36))

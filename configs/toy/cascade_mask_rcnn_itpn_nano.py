"""Cascade Mask R-CNN recipe (configs/coco/cascade_mask_rcnn_itpn_b_3x.py) shrunk for CPUs:
itpn_nano on the toy shapes dataset."""

from ..coco.cascade_mask_rcnn_itpn_b_3x import dataloader, model, optimizer, train
from ._detection import toy_detection

lr_multiplier = toy_detection(model, dataloader, train)

"""Mask R-CNN recipe (configs/coco/mask_rcnn_itpn_b.py) shrunk for CPUs: itpn_nano on the toy
shapes dataset (tools/make_toy_dataset.py, $ITPN_TOY_ROOT)."""

from ..coco.mask_rcnn_itpn_b import dataloader, model, optimizer, train
from ._detection import toy_detection

lr_multiplier = toy_detection(model, dataloader, train)

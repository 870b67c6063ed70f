"""Mask R-CNN, iTPN-L (HiViT-L + pre-trained pyramid), 1x: the base recipe with the large
model and layer decay 0.95."""

from .mask_rcnn_itpn_b import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.name = "itpn_large"
optimizer.params.lr_factor_func.lr_decay_rate = 0.95

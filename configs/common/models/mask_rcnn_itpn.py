"""Mask R-CNN on the iTPN backbone: the pre-trained pyramid is the neck (no FPN convs).

Heads follow the published detector: RPN with one conv, a 4conv1fc box head with a norm layer
(SyncBN), GIoU box loss with weight 10, a 4conv mask head. RGB input, ImageNet statistics.
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (FastRCNNConvFCHead, FastRCNNOutputLayers,
                                           MaskRCNNConvUpsampleHead, StandardROIHeads)

from itpn_d2.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from itpn_d2.d2 import ITPNBackbone
from itpn_d2.modeling import build_itpn

model = L(GeneralizedRCNN)(
    backbone=L(ITPNBackbone)(
        # build_itpn defaults (those of pretrain/main.py), so its checkpoints load as they are.
        net=L(build_itpn)(name="itpn_base", drop_path_rate=0.0),
        out_features=("p2", "p3", "p4", "p5", "p6"),
        size_divisibility=32,
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=256, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1],
                                  allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1],
                                    allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(output_size=7, scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
                                sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=L(FastRCNNConvFCHead)(  # 4conv1fc
            input_shape=L(ShapeSpec)(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="SyncBN",
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
            box_reg_loss_type="giou",
            loss_weight={"loss_box_reg": 10.0},
        ),
        mask_in_features=["p2", "p3", "p4", "p5"],
        mask_pooler=L(ROIPooler)(output_size=14, scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
                                 sampling_ratio=0, pooler_type="ROIAlignV2"),
        mask_head=L(MaskRCNNConvUpsampleHead)(  # 4conv + deconv
            input_shape=L(ShapeSpec)(channels=256, width=14, height=14),
            num_classes="${..num_classes}",
            conv_dims=[256, 256, 256, 256, 256],
        ),
    ),
    pixel_mean=list(IMAGENET_MEAN),
    pixel_std=list(IMAGENET_STD),
    input_format="RGB",
)

"""UPerNet on the iTPN backbone: the pre-trained pyramid (p2-p4, plus p5 = 2x average pooling of
p4) feeds a UPerNet head (PPM on p5, top-down fusion, fused 3x3 conv, classifier) and an
auxiliary FCN head on p4 (loss weight 0.4). Cross-entropy ignores 255. Sliding-window test.

``model.concat_stages=True`` feeds the heads each pyramid level concatenated with the backbone
stage of the same stride, as the published segmentation model (channels 384/512/768/768 for
iTPN-B); head input shapes follow ``model.backbone.net.name`` and ``model.concat_stages``.
"""

from detectron2.config import LazyCall as L

from itpn_d2.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from itpn_d2.d2 import ITPNBackbone
from itpn_d2.d2.semseg import EncoderDecoderSegmentor, FCNHead, UPerNetHead, itpn_feature_shapes
from itpn_d2.data.images import IGNORE_LABEL
from itpn_d2.modeling import build_itpn

model = L(EncoderDecoderSegmentor)(
    backbone=L(ITPNBackbone)(
        # build_itpn defaults (those of pretrain/main.py), so its checkpoints load as they are.
        net=L(build_itpn)(name="itpn_base", drop_path_rate=0.0),
        # c2-c4 are only read with concat_stages=True (they cost a reshape otherwise).
        out_features=("p2", "p3", "p4", "p5", "c2", "c3", "c4"),
        size_divisibility=32,
    ),
    sem_seg_head=L(UPerNetHead)(
        input_shape=L(itpn_feature_shapes)(model_name="${...backbone.net.name}",
                                           concat_stages="${...concat_stages}"),
        in_features=("p2", "p3", "p4", "p5"),
        num_classes=150,
        channels=768,
        pool_scales=(1, 2, 3, 6),
        norm="SyncBN",
        dropout=0.1,
        loss_weight=1.0,
        ignore_value=IGNORE_LABEL,
    ),
    auxiliary_head=L(FCNHead)(
        input_shape=L(itpn_feature_shapes)(model_name="${...backbone.net.name}",
                                           concat_stages="${...concat_stages}"),
        in_feature="p4",
        num_classes="${..sem_seg_head.num_classes}",
        channels=256,
        num_convs=1,
        norm="${..sem_seg_head.norm}",
        dropout=0.1,
        loss_weight=0.4,
        ignore_value="${..sem_seg_head.ignore_value}",
    ),
    pixel_mean=list(IMAGENET_MEAN),
    pixel_std=list(IMAGENET_STD),
    input_format="RGB",
    concat_stages=False,
    inference_mode="slide",
    window_size=512,
    window_stride=341,
)

"""COCO 2017 instances, as the published iTPN detector reads them.

Train: horizontal flip, then (DETR-style, picked at random per image) either a resize of the
shorter side to 480-800 (step 32, longer side <= 1333), or a resize to 400/500/600, a random
crop of 384-600 px and the same 480-800 resize. Test: shorter side 800, longer <= 1333.
RGB input (the model normalises with ImageNet statistics); padding to 32 is the backbone's.
Datasets come from Detectron2's builtin registration under ``$DETECTRON2_DATASETS/coco``.
"""

from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.evaluation import COCOEvaluator

from itpn_d2.d2.data import BitmaskDatasetMapper, ImageDatasetMapper, RandomChoice

MULTI_SCALE = tuple(range(480, 801, 32))  # 480, 512, ..., 800

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(BitmaskDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(RandomChoice)(choices=[
                [L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE, max_size=1333,
                                         sample_style="choice")],
                [L(T.ResizeShortestEdge)(short_edge_length=(400, 500, 600), max_size=1333,
                                         sample_style="choice"),
                 L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
                 L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE, max_size=1333,
                                         sample_style="choice")],
            ]),
        ],
        image_format="RGB",
        use_instance_mask=True,
        # Polygons become bitmasks before augmentation, as in the published (mmdetection)
        # pipeline; cropping pixel masks needs no polygon clipping library.
        instance_mask_format="bitmask",
        recompute_boxes=True,  # boxes follow the cropped masks
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(ImageDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox", "segm"),
)

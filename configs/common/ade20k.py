"""ADE20K (SceneParsing, 150 classes) as the published iTPN UPerNet reads it, in Detectron2.

Datasets: Detectron2's builtin ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val``, registered
from ``$DETECTRON2_DATASETS/ADEChallengeData2016`` (``images/{training,validation}/*.jpg``,
``annotations_detectron2/{training,validation}/*.png`` with labels 0-149 and 255 = ignore; make
the latter with ``tools/prepare_ade20k.py``).

Train (mmsegmentation's pipeline): shorter side 256-1024 (512 x 0.5-2.0), 512 x 512 crop with at
most 75% of one class, horizontal flip, brightness/contrast/saturation jitter; batches are padded
with the ignore label. Test: shorter side 512 (longer <= 2048); the model slides 512 windows and
resizes its prediction to the original size. RGB input.
"""

from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)

from itpn_d2.d2.sem_seg_evaluation import ITPNSemSegEvaluator
from itpn_d2.data.images import IGNORE_LABEL
from itpn_d2.d2.semseg_data import SemSegDatasetMapper, semseg_train_augmentations

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_train", filter_empty=False),
    mapper=L(SemSegDatasetMapper)(
        is_train=True,
        augmentations=L(semseg_train_augmentations)(
            crop_size=512, short_edge=512, scale_range=(0.5, 2.0), max_long_edge=2048,
            cat_max_ratio=0.75, ignore_value="${..ignore_value}"),
        image_format="RGB",
        num_classes=150,
        ignore_value=IGNORE_LABEL,
    ),
    total_batch_size=16,
    aspect_ratio_grouping=False,  # every sample is a crop of the same size
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_val", filter_empty=False),
    mapper=L(SemSegDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=512, max_size=2048)],
        image_format="${...train.mapper.image_format}",
        num_classes="${...train.mapper.num_classes}",
        ignore_value="${...train.mapper.ignore_value}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(ITPNSemSegEvaluator)(dataset_name="${..test.dataset.names}")

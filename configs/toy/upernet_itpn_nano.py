"""UPerNet recipe (configs/ade20k/upernet_itpn_b.py) shrunk for CPUs: itpn_nano on the toy
shapes segmentation set (tools/make_toy_dataset.py, $ITPN_TOY_ROOT; 6 classes, 128 px).

Model size, head channels, dataset names, crop/window sizes and schedule change; and, because
without them the toy UPerNet predicted background everywhere for 1600 iterations (mIoU 14.4 at
every evaluation, from scratch, lr 1e-3 or 3e-3): whole images instead of 96 px crops (a crop
cuts shapes, and a cut shape is another shape), scales 0.75-1 only, and a cross-entropy weight
of 0.2 on background (79% of the pixels). From scratch, seed 0, 1600 iterations at lr 1e-3,
mIoU at 400 / 800 / 1200 / 1600: 14.4 / 14.4 / 14.8 / 15.1 with whole images, 15.9 / 19.1 /
19.9 / 22.2 with the background weight too (README "Toy recipes").
"""

from itpn_d2.data.toy import TOY_IMAGE_SIZE, register_toy_datasets

from ..ade20k.upernet_itpn_b import dataloader, model, optimizer, train
from ..common.poly_schedule import poly_schedule

register_toy_datasets(lazy=True)  # for Detectron2's own tools; files are read with the data
model.backbone.net.name = "itpn_nano"  # fpn_dim 64
model.backbone.net.img_size = TOY_IMAGE_SIZE  # the toy pretraining size
model.sem_seg_head.channels = 64
model.sem_seg_head.num_classes = 6  # background + 5 shapes
model.auxiliary_head.channels = 32
model.sem_seg_head.class_weight = [0.2] + [1.0] * 5  # background, then the shapes
model.auxiliary_head.class_weight = "${..sem_seg_head.class_weight}"
model.window_size = TOY_IMAGE_SIZE  # whole toy images: a window would cut shapes too
model.window_stride = TOY_IMAGE_SIZE

dataloader.train.dataset.names = "itpn_toy_sem_seg_train"
dataloader.test.dataset.names = "itpn_toy_sem_seg_val"
dataloader.train.mapper.augmentations.update(crop_size=TOY_IMAGE_SIZE, short_edge=TOY_IMAGE_SIZE,
                                             scale_range=(0.75, 1.0), max_long_edge=512)
dataloader.test.mapper.augmentations[0].update(short_edge_length=TOY_IMAGE_SIZE, max_size=512)
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = dataloader.test.num_workers = 0

optimizer.lr = 1e-3  # on the toy data (the published 3e-5 fine-tunes a large model)

train.output_dir = "./output/toy_upernet"
train.max_iter = 200
lr_multiplier = poly_schedule(train.max_iter, warmup_iters=20)
train.eval_period = train.checkpointer.period = 100
train.log_period = 10

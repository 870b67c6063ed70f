"""UPerNet recipe (configs/ade20k/upernet_itpn_b.py) shrunk for CPUs: itpn_nano on the toy
shapes segmentation set (tools/make_toy_dataset.py, $ITPN_TOY_ROOT; 6 classes, 128 px).

Only model size, head channels, dataset names, crop/window sizes and schedule change.
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
model.window_size = 96  # 2 x 2 windows over the 128 px test images
model.window_stride = 64

dataloader.train.dataset.names = "itpn_toy_sem_seg_train"
dataloader.test.dataset.names = "itpn_toy_sem_seg_val"
dataloader.train.mapper.augmentations.update(crop_size=96, short_edge=TOY_IMAGE_SIZE,
                                             max_long_edge=512)
dataloader.test.mapper.augmentations[0].update(short_edge_length=TOY_IMAGE_SIZE, max_size=512)
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = dataloader.test.num_workers = 0

optimizer.lr = 3e-3  # from scratch on the toy data (the published 3e-5 fine-tunes)

train.output_dir = "./output/toy_upernet"
train.max_iter = 200
lr_multiplier = poly_schedule(train.max_iter, warmup_iters=20)
train.eval_period = train.checkpointer.period = 100
train.log_period = 10

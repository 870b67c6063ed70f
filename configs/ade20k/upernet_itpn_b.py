"""UPerNet, iTPN-B (HiViT-B + pre-trained pyramid), ADE20K, 160k iterations.

Published settings: batch 16 (2 x 8 GPUs), 160k iterations, 512 x 512 crops (scale 0.5-2.0,
flip), AdamW lr 3e-5, betas (0.9, 0.999), wd 0.05, layer decay 0.90, poly LR (power 1) after
1500 linear warm-up iterations, drop path 0.1, UPerNet channels 768 + auxiliary FCN (0.4),
sliding-window test (window 512, stride 341), mixed precision. Differences: the heads read the
pre-trained pyramid (``model.concat_stages=True`` for the published "level + stage" inputs)
and the backbone keeps build_itpn's defaults (the published one adds a zero-initialised
relative position bias, ``model.backbone.net.rpe=True``, which a default checkpoint lacks).

    python tools/prepare_ade20k.py $DETECTRON2_DATASETS/ADEChallengeData2016
    python tools/lazyconfig_train_net.py --config-file configs/ade20k/upernet_itpn_b.py \
        --num-gpus 8 train.init_checkpoint=/path/to/pretrain_checkpoint.pth
"""

from ..common.ade20k import dataloader
from ..common.models.upernet_itpn import model
from ..common.optim import AdamW as optimizer
from ..common.poly_schedule import poly_schedule
from ..common.train import train

model.backbone.net.name = "itpn_base"
model.backbone.net.drop_path_rate = 0.1
model.sem_seg_head.num_classes = 150
dataloader.train.mapper.num_classes = "${model.sem_seg_head.num_classes}"

dataloader.train.total_batch_size = 16

optimizer.lr = 3e-5
optimizer.weight_decay = 0.05
optimizer.params.lr_factor_func.lr_decay_rate = 0.90

train.max_iter = 160000
lr_multiplier = poly_schedule(train.max_iter, warmup_iters=1500)
train.checkpointer.period = 16000
train.eval_period = 16000
train.output_dir = "./output/upernet_itpn_b_ade20k"

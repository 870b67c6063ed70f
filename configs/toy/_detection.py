"""The one set of overrides that turns a COCO detection recipe into its CPU / toy-data variant.

Only model size, head channels, dataset names, input sizes and schedule change (with, for
the CPU, the RoIs sampled per image, the batch size and the loader workers), and, because
they made the toy heads learn much faster, GroupNorm in the box and mask heads and RoI
sampling of 32 per image at up to 50% foreground. Measured from scratch, seed 0, batch 4,
lr 2e-3, 1200 iterations (box AP at iterations 600 / 1000; README "Toy recipes"):
the full recipe's heads (SyncBN box head, no mask-head norm, 64 RoIs at 25%) 1.5 / 14.1,
GroupNorm heads 3.6 / 16.5, GroupNorm + 32 RoIs at 50% 8.6 / 34.7. Later LR steps helped as
much; fewer proposals before NMS make a CPU step faster. Everything else (head layout, losses,
optimizer, augmentation policy) is the full recipe's.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from itpn_d2.data.toy import TOY_IMAGE_SIZE, register_toy_datasets

from ..common.schedule import step_schedule

TOY_LR_STEPS = (0.9, 0.97)  # fractions of max_iter
TOY_SCALES = tuple(TOY_IMAGE_SIZE * k // 8 for k in (6, 7, 8))  # 96, 112, 128 for 128 px images


def toy_detection(model, dataloader, train, model_name="itpn_nano", fpn_dim=64, conv_dim=64,
                  fc_dim=256, max_iter=300):
    """Shrink ``model``/``dataloader``/``train`` in place; return the toy ``lr_multiplier``.

    Also registers the toy datasets (lazily: files are read with the data), so that
    Detectron2's own tools run the recipe."""
    register_toy_datasets(lazy=True)
    model.backbone.net.name = model_name  # itpn_nano: fpn_dim 64
    model.backbone.net.img_size = TOY_IMAGE_SIZE  # the toy pretraining size
    model.proposal_generator.head.in_channels = fpn_dim
    heads = model.roi_heads
    box_heads = heads.box_heads if "box_heads" in heads else [heads.box_head]
    predictors = heads.box_predictors if "box_predictors" in heads else [heads.box_predictor]
    for head in box_heads:
        head.input_shape.channels = fpn_dim
        head.conv_dims = [conv_dim] * 4
        head.fc_dims = [fc_dim]
        head.conv_norm = "GN"  # batch statistics of a few RoIs per image learn slowly
    for predictor in predictors:
        predictor.input_shape.channels = fc_dim
        predictor.test_topk_per_image = 20  # at most 4 objects per image
    heads.mask_head.input_shape.channels = fpn_dim
    heads.mask_head.conv_dims = [conv_dim] * 5
    heads.mask_head.conv_norm = "GN"
    heads.num_classes = 5
    # Toy images hold at most 4 objects (~10 foreground RoIs): fewer RoIs per image at up to
    # 50% foreground keep the box classifier from sitting at "background" for ~800 iterations.
    heads.batch_size_per_image = 32
    heads.positive_fraction = 0.5
    # Toy shapes are 26-56 px across: anchors of 16-256 px (COCO's 32-512 miss the small ones).
    model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
    model.proposal_generator.post_nms_topk = (300, 100)
    # NMS of 2000 training proposals per level took a quarter of a CPU training step; toy
    # images hold at most 4 objects, and 1000 is what inference keeps.
    model.proposal_generator.pre_nms_topk = (1000, 1000)

    dataloader.train.dataset.names = "itpn_toy_train"
    dataloader.test.dataset.names = "itpn_toy_val"
    # Flip and rescale only: a crop would cut shapes, and a cut shape is a different shape.
    dataloader.train.mapper.augmentations = [
        L(T.RandomFlip)(horizontal=True),
        L(T.ResizeShortestEdge)(short_edge_length=TOY_SCALES, max_size=213,
                                sample_style="choice"),
    ]
    dataloader.test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=TOY_IMAGE_SIZE, max_size=213)]
    dataloader.train.total_batch_size = 4
    dataloader.train.num_workers = dataloader.test.num_workers = 0

    train.output_dir = "./output/toy"
    train.max_iter = max_iter
    train.eval_period = train.checkpointer.period = max_iter // 2
    train.log_period = 10
    # The LR steps at 90% / 97% (the full recipe's 75% / 92% cut the toy heads while they were
    # still learning fast: seed 1 from the shipped pretraining, 1500 iterations, box AP 26.1
    # with the full recipe's steps, 36.8 with these).
    return step_schedule(max_iter, steps=TOY_LR_STEPS, warmup_iters=max_iter // 10)

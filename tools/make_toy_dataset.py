#!/usr/bin/env python
"""Make the synthetic toy shapes dataset (see ``itpn_d2/data/toy.py`` for its layout).

``itpn-make-toy`` (``python -m itpn_d2.data``) takes the same flags but ``--check``.

Examples:
    python tools/make_toy_dataset.py                     # datasets/itpn_toy or $ITPN_TOY_ROOT
    python tools/make_toy_dataset.py /tmp/toy --num-train 32 --num-val 8
    python tools/make_toy_dataset.py --check             # then one detectron2 training step
"""

import sys
from pathlib import Path

from itpn_d2.data.toy import get_parser, make_from_args, toy_class_names
from itpn_d2.errors import run_cli


def forward_check(root: Path, num_images: int = 2) -> None:
    """Feed a few training images through Detectron2's mapper and a Mask R-CNN training step.

    The model is randomly initialised: this only shows the data loads and the losses are
    finite.
    """
    import torch
    from detectron2 import model_zoo
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from itpn_d2.data.toy import register_toy_datasets

    register_toy_datasets(root)
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(toy_class_names())
    cfg.MODEL.RESNETS.NORM = "BN"  # frozen BN statistics are meaningless without weights
    # RLE masks need the bitmask format; no resizing keeps the step cheap on a CPU.
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    batch = [mapper(record) for record in DatasetCatalog.get("itpn_toy_train")[:num_images]]

    model = build_model(cfg).train()
    with EventStorage():  # the RPN and ROI heads log training statistics
        losses = model(batch)
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise RuntimeError(f"non-finite losses: {losses}")
    total.backward()
    print("forward check:", ", ".join(f"{k}={v.item():.3f}" for k, v in sorted(losses.items())))


def main(argv=None) -> int:
    parser = get_parser()
    parser.description = __doc__.split("\n")[0]
    parser.add_argument(
        "--check", action="store_true", help="then run one Mask R-CNN training step on it"
    )
    args = parser.parse_args(argv)
    paths = make_from_args(args)
    if args.check:
        forward_check(paths["root"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

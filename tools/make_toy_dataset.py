#!/usr/bin/env python
"""Make the synthetic toy shapes dataset (see ``itpn_d2/data/toy.py`` for its layout).

Examples:
    python tools/make_toy_dataset.py                     # datasets/itpn_toy or $ITPN_TOY_ROOT
    python tools/make_toy_dataset.py /tmp/toy --num-train 32 --num-val 8
    python tools/make_toy_dataset.py --check             # then one detectron2 training step
"""

import argparse
import sys
import time
from pathlib import Path

from itpn_d2.data.toy import TOY_IMAGE_SIZE, default_toy_root, make_toy_dataset, toy_class_names
from itpn_d2.errors import UserError, run_cli


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "out", nargs="?", type=Path, help=f"output folder (default: {default_toy_root()})"
    )
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=TOY_IMAGE_SIZE,
                        help="a multiple of 32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check", action="store_true", help="then run one Mask R-CNN training step on it"
    )
    args = parser.parse_args()
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"output folder {args.out} is a file; choose another folder")

    start = time.perf_counter()
    try:
        paths = make_toy_dataset(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
        )
    except ValueError as e:  # sizes and counts, checked by make_toy_dataset
        raise UserError(f"{e} (--image-size, --num-train, --num-val)") from None
    print(f"toy dataset ready in {paths['root']} ({time.perf_counter() - start:.1f}s)")
    if args.check:
        forward_check(paths["root"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Original / masked / reconstruction grid of a pretraining checkpoint on some images.

Each image is resized (shorter side) and center-cropped to the checkpoint's input size; the
mask is drawn from ``--seed``. Rows are images; columns original, masked input (grey = masked)
and reconstruction (visible patches as they are, masked patches predicted; see
:mod:`pretrain.visualize`).

    python tools/visualize_reconstruction.py output/pretrain/checkpoint-last.pth a.jpg b.jpg \\
        --out grid.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from itpn_d2.checkpoint import CheckpointError, check_state_dict, load_checkpoint  # noqa: E402
from pretrain.data import center_crop, load_rgb, to_uint8_tensor  # noqa: E402
from pretrain.models import build_pretrain_model  # noqa: E402
from pretrain.visualize import reconstruction_grid, save_image  # noqa: E402


def load_model(path: str):
    """Encoder + pixel decoder of a pretraining checkpoint (teacher and MFM heads unused)."""
    ckpt = load_checkpoint(path)
    if not ckpt.get("decoder") or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"{path} has no pixel decoder: it is not a pretraining checkpoint "
                              f"of pretrain/main.py (an exported backbone cannot reconstruct)")
    args = dict(ckpt["args"], mfm="none")
    model = build_pretrain_model(args)
    for module, key in ((model.encoder, "model"), (model.decoder, "decoder")):
        check_state_dict(module, ckpt[key], f"{path} [{key}]")
        module.load_state_dict(ckpt[key])
    return model.eval(), args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (pretrain/main.py)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="reconstruction.png", help="output PNG")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="default: the checkpoint's training mask ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        model, train_args = load_model(args.checkpoint)
        size = train_args["input_size"]
        batch = torch.stack([to_uint8_tensor(center_crop(load_rgb(f), size)) for f in args.images])
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.to(args.device)
    ratio = args.mask_ratio if args.mask_ratio is not None else train_args["mask_ratio"]
    grid = reconstruction_grid(model, batch.to(args.device), ratio, seed=args.seed)
    print(f"wrote {save_image(grid, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

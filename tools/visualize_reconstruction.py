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
from itpn_d2.data.images import load_rgb_image  # noqa: E402
from itpn_d2.errors import UserError, disk_full_message, run_cli  # noqa: E402
from pretrain.data import DataError, center_crop, to_uint8_tensor  # noqa: E402
from pretrain.main import device_type, number_type  # noqa: E402
from pretrain.models import build_pretrain_model, num_visible  # noqa: E402
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


def load_image(path: str, size: int) -> torch.Tensor:
    """``path`` resized and center-cropped to ``size``: uint8 ``(3, size, size)``."""
    try:
        return to_uint8_tensor(center_crop(load_rgb_image(path), size))
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for unreadable files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def main(argv=None) -> int:
    """The command line; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: _main(argv))


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (pretrain/main.py)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="reconstruction.png", help="output PNG")
    p.add_argument("--mask_ratio", type=number_type(float, 0, 1, low_open=True), default=None,
                   help="default: the checkpoint's training mask ratio")
    p.add_argument("--seed", type=number_type(int, 0), default=0, help="seed of the random mask")
    p.add_argument("--device", type=device_type, default="cpu")
    args = p.parse_args(argv)
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name, e.g. "
                        f"{os.path.join(args.out, 'reconstruction.png')}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available; use --device cpu")
    model, train_args = load_model(args.checkpoint)
    size = train_args["input_size"]
    batch = torch.stack([load_image(f, size) for f in args.images])
    model.to(args.device)
    ratio = args.mask_ratio if args.mask_ratio is not None else train_args["mask_ratio"]
    try:
        num_visible((size // 16) ** 2, ratio)
    except ValueError as e:
        raise UserError(f"--mask_ratio {ratio:g} at input size {size}: {e}") from None
    grid = reconstruction_grid(model, batch.to(args.device), ratio, seed=args.seed)
    try:
        print(f"wrote {save_image(grid, args.out)}")
    except OSError as e:
        if disk_full_message(e):
            raise
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}") from None
    except ValueError as e:  # Pillow: unknown file extension
        raise UserError(f"cannot write --out {args.out}: {e}; use a .png file name") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""iTPN pretraining CLI (MAE / iTPN conventions).

Examples (from the repository root)::

    python pretrain/main.py --model itpn_nano --max_steps 20          # toy data, CPU smoke run
    torchrun --nproc_per_node=8 pretrain/main.py --model itpn_base --data_path /data/imagenet \\
        --batch_size 64 --blr 1.5e-4 --mask_ratio 0.75 --epochs 1600 --warmup_epochs 40 \\
        --output_dir output/itpn_base_pixel_ema
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __name__ == "__main__":
    # OpenMP threads that wait passively (sleep instead of spinning) keep CPU training fast when
    # other processes share the cores: measured on 2 shared cores, itpn_nano at 128 px ran at
    # ~21 img/s with passive waiting and 4-8 img/s with the default spinning. It must be set
    # before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if __package__ in (None, ""):
        # Run as a script: make the repository root (the parent of pretrain/) importable.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from itpn_d2.checkpoint import CheckpointError  # noqa: E402
from pretrain.data import DataError  # noqa: E402
from pretrain.engine import TrainingDiverged, TrainResult, train  # noqa: E402
from pretrain.gpu_data import DECODE_CHOICES  # noqa: E402
from pretrain.models import DECODER_SIZES, MFM_LOSSES, MFM_MODES, TeacherError  # noqa: E402


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help text already explains the default."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "iTPN pretraining", formatter_class=_HelpFormatter,
        description="Train HiViT + the integral pyramid by masked image modeling (pixels) and "
                    "masked feature modeling (every pyramid level predicts teacher features).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="itpn_base", choices=sorted(DECODER_SIZES),
                   help="iTPN size")
    g.add_argument("--input_size", type=int, default=None,
                   help="image side, a multiple of 16 (default: 224; 128 on the toy dataset, "
                        "whose images are 128 px)")
    g.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--rpe", action=argparse.BooleanOptionalAction, default=False,
                   help="relative position bias in the attention blocks")
    g.add_argument("--fpn_depth", type=int, default=2,
                   help="MLP blocks after each top-down fusion of the pyramid")
    g.add_argument("--layer_scale_init", type=float, default=None,
                   help="initial layer-scale value (default: no layer scale)")
    g.add_argument("--pyramid", choices=("on", "off"), default="on",
                   help="'off': the HiViT + MAE baseline without pyramid (needs --mfm none); "
                        "its checkpoint then holds a backbone only")
    g.add_argument("--decoder_dim", type=int, default=None,
                   help="pixel decoder width (default per model: nano 128, tiny 256, else 512)")
    g.add_argument("--decoder_depth", type=int, default=None,
                   help="pixel decoder blocks (default per model: nano 2, tiny 4, else 8)")
    g.add_argument("--decoder_heads", type=int, default=None,
                   help="pixel decoder heads (default per model: nano 4, tiny 8, else 16)")

    g = p.add_argument_group("masked image / feature modeling")
    g.add_argument("--mask_ratio", type=float, default=0.75,
                   help="fraction of 16x16 tokens masked (dropped from the encoder)")
    g.add_argument("--mfm", choices=MFM_MODES, default="ema",
                   help="teacher of masked feature modeling: 'ema' momentum copy of the backbone, "
                        "'clip' frozen open_clip image encoder, 'none' pixels only")
    g.add_argument("--mfm_weight", type=float, default=1.0,
                   help="total loss = MIM + mfm_weight x mean over levels of MFM")
    g.add_argument("--mfm_loss", choices=MFM_LOSSES, default="smooth_l1",
                   help="MFM loss on layer-normalised teacher features")
    g.add_argument("--mfm_dim", type=int, default=None,
                   help="MFM head width (default per model: nano 128, else 256)")
    g.add_argument("--ema_momentum", type=float, default=0.996,
                   help="EMA teacher momentum at step 0, cosine-scheduled to 1.0")
    g.add_argument("--teacher", default="ViT-B-16",
                   help="open_clip model name of the CLIP teacher (--mfm clip)")
    g.add_argument("--teacher_checkpoint", default=None,
                   help="local file with the CLIP teacher's weights (whole CLIP model or its "
                        "image tower); required by --mfm clip, never downloaded (default: none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64,
                   help="images per process per iteration; effective batch = batch_size x "
                        "accum_iter x world size")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation iterations")
    g.add_argument("--epochs", type=int, default=1600,
                   help="training epochs (sets the LR and EMA schedules)")
    g.add_argument("--warmup_epochs", type=float, default=40, help="linear warm-up (epochs)")
    g.add_argument("--blr", type=float, default=1.5e-4,
                   help="base learning rate: lr = blr x effective batch / 256")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute learning rate (default: derived from --blr)")
    g.add_argument("--min_lr", type=float, default=0.0, help="end of the cosine schedule")
    g.add_argument("--weight_decay", type=float, default=0.05,
                   help="AdamW weight decay (not on norms, biases, positions, layer scale)")
    g.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW betas")
    g.add_argument("--clip_grad", type=float, default=None,
                   help="max gradient norm (default: no clipping)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast precision (default: bf16 on GPU, off on CPU); fp16 uses a "
                        "gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder tree (its train/ subfolder if present) or flat folder of "
                        "images; default: the toy dataset (written on first use)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="data loading processes per training process (default: 0 on the CPU, "
                        "where decoding in the training process costs less than competing for "
                        "the cores; min(8, CPU cores / processes per node) on GPU)")
    g.add_argument("--decode", choices=DECODE_CHOICES, default="cpu",
                   help="where JPEGs are decoded and cropped: 'cpu' in the loader workers (PIL), "
                        "'gpu' in the training process with nvjpeg (needs CUDA; workers only "
                        "read file bytes; other files fall back to PIL)")
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="stop when more than this fraction of an epoch's images are unreadable "
                        "(each one is skipped with a warning)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output/pretrain",
                   help="checkpoints, log.txt, reconstruction grids")
    g.add_argument("--log_dir", default=None,
                   help="TensorBoard folder parent (default: output_dir)")
    g.add_argument("--device", default=None,
                   help="cuda or cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order, augmentation and masking "
                        "(rank r uses seed + r for its own random streams)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from (default: none, or see --auto_resume)")
    g.add_argument("--auto_resume", action="store_true",
                   help="continue from output_dir/checkpoint-last.pth if it exists")
    g.add_argument("--save_every", type=int, default=1,
                   help="write checkpoint-last.pth every N epochs (and always at the end)")
    g.add_argument("--keep_every", type=int, default=0,
                   help="also keep checkpoint-EPOCH.pth every N epochs (0: never)")
    g.add_argument("--log_every", type=int, default=20,
                   help="steps between log points (loss sync, TensorBoard, progress)")
    g.add_argument("--vis_images", type=int, default=8,
                   help="images in the reconstruction grid written each epoch (0: none)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps in all, counted from the start of "
                        "training, and save a checkpoint (default: run all epochs)")
    return p


def main(argv: Optional[List[str]] = None) -> TrainResult:
    """Parse ``argv`` and train; errors propagate (see :func:`cli` for the command line)."""
    args = get_args_parser().parse_args(argv)
    for key in ("save_every", "log_every"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1")
    return train(vars(args))


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: known errors become one clear message and exit status 1."""
    try:
        main(argv)
    except (DataError, TeacherError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())

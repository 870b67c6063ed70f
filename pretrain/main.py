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

from itpn_d2.runtime import set_omp_wait_policy

if __name__ == "__main__":  # `python pretrain/main.py`: OpenMP reads it when torch loads below
    set_omp_wait_policy()  # (itpn-pretrain does the same in pretrain.launch; imports do not)

from itpn_d2.errors import DEBUG_ENV, EXIT_USER_ERROR, run_cli  # noqa: E402
from pretrain.engine import PeerStopped, TrainResult, train  # noqa: E402
from pretrain.flags import device_type, number_type  # noqa: E402
from pretrain.gpu_data import DECODE_CHOICES  # noqa: E402
from pretrain.models import (DECODER_SIZES, MFM_LOSSES, MFM_MODES, SettingsError,  # noqa: E402
                             num_visible)


# --------------------------------------------------------------------------- flag types
# number_type / device_type are in pretrain.flags (visualize.py uses them too).


POSITIVE_INT = number_type(int, 1)
COUNT = number_type(int, 0)  # >= 0
FRACTION = number_type(float, 0, 1)  # [0, 1)
POSITIVE = number_type(float, 0, low_open=True)
NON_NEGATIVE = number_type(float, 0)


# A rank that stops silently (rank 0 reports the error) waits this long before it exits:
# torchrun terminates the other processes as soon as one exits, which could cut rank 0 short.
QUIET_EXIT_DELAY_S = 1.0


def _wait_for_rank0() -> None:
    import time

    time.sleep(QUIET_EXIT_DELAY_S)


class _Parser(argparse.ArgumentParser):
    """Bad flags give one ``error:`` line; under torchrun only rank 0 prints it (every rank
    parses the same command line)."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            message = message[len("argument "):] if message.startswith("argument ") else message
            print(f"error: {message} (see --help)", file=sys.stderr)
        else:
            _wait_for_rank0()
        sys.exit(EXIT_USER_ERROR)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help text already explains the default."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(
        "iTPN pretraining", formatter_class=_HelpFormatter,
        description="Train HiViT + the integral pyramid by masked image modeling (pixels) and "
                    "masked feature modeling (every pyramid level predicts teacher features).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="itpn_base", choices=sorted(DECODER_SIZES),
                   help="iTPN size")
    g.add_argument("--input_size", type=number_type(int, 16, multiple_of=16), default=None,
                   help="image side, a multiple of 16 (default: 224; 128 on the toy dataset, "
                        "whose images are 128 px)")
    g.add_argument("--drop_path", type=FRACTION, default=0.0, help="stochastic depth rate")
    g.add_argument("--rpe", action=argparse.BooleanOptionalAction, default=False,
                   help="relative position bias in the attention blocks")
    g.add_argument("--fpn_depth", type=POSITIVE_INT, default=2,
                   help="MLP blocks after each top-down fusion of the pyramid")
    g.add_argument("--layer_scale_init", type=POSITIVE, default=None,
                   help="initial layer-scale value (default: no layer scale)")
    g.add_argument("--pyramid", choices=("on", "off"), default="on",
                   help="'off': the HiViT + MAE baseline without pyramid (needs --mfm none); "
                        "its checkpoint then holds a backbone only")
    g.add_argument("--decoder_dim", type=POSITIVE_INT, default=None,
                   help="pixel decoder width (default per model: nano 128, tiny 256, else 512)")
    g.add_argument("--decoder_depth", type=POSITIVE_INT, default=None,
                   help="pixel decoder blocks (default per model: nano 2, tiny 4, else 8)")
    g.add_argument("--decoder_heads", type=POSITIVE_INT, default=None,
                   help="pixel decoder heads (default per model: nano 4, tiny 8, else 16)")

    g = p.add_argument_group("masked image / feature modeling")
    g.add_argument("--mask_ratio", type=number_type(float, 0, 1, low_open=True), default=0.75,
                   help="fraction of 16x16 tokens masked (dropped from the encoder)")
    g.add_argument("--mfm", choices=MFM_MODES, default="ema",
                   help="teacher of masked feature modeling: 'ema' momentum copy of the backbone, "
                        "'clip' frozen open_clip image encoder, 'none' pixels only")
    g.add_argument("--mfm_weight", type=NON_NEGATIVE, default=1.0,
                   help="total loss = MIM + mfm_weight x mean over levels of MFM")
    g.add_argument("--mfm_loss", choices=MFM_LOSSES, default="smooth_l1",
                   help="MFM loss on layer-normalised teacher features")
    g.add_argument("--mfm_dim", type=POSITIVE_INT, default=None,
                   help="MFM head width (default per model: nano 128, else 256)")
    g.add_argument("--ema_momentum", type=FRACTION, default=0.996,
                   help="EMA teacher momentum at step 0, cosine-scheduled to 1.0")
    g.add_argument("--teacher", default="ViT-B-16",
                   help="open_clip model name of the CLIP teacher (--mfm clip)")
    g.add_argument("--teacher_checkpoint", default=None,
                   help="local file with the CLIP teacher's weights (whole CLIP model or its "
                        "image tower); required by --mfm clip, never downloaded (default: none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=64,
                   help="images per process per iteration; effective batch = batch_size x "
                        "accum_iter x world size")
    g.add_argument("--accum_iter", type=POSITIVE_INT, default=1,
                   help="gradient accumulation iterations")
    g.add_argument("--epochs", type=POSITIVE_INT, default=1600,
                   help="training epochs (sets the LR and EMA schedules)")
    g.add_argument("--warmup_epochs", type=NON_NEGATIVE, default=40, help="linear warm-up (epochs)")
    g.add_argument("--blr", type=POSITIVE, default=1.5e-4,
                   help="base learning rate: lr = blr x effective batch / 256")
    g.add_argument("--lr", type=POSITIVE, default=None,
                   help="absolute learning rate (default: derived from --blr)")
    g.add_argument("--min_lr", type=NON_NEGATIVE, default=0.0, help="end of the cosine schedule")
    g.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.05,
                   help="AdamW weight decay (not on norms, biases, positions, layer scale)")
    g.add_argument("--opt_betas", type=FRACTION, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW betas")
    g.add_argument("--clip_grad", type=POSITIVE, default=None,
                   help="max gradient norm (default: no clipping)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast precision (default: bf16 on GPU, off on CPU); fp16 uses a "
                        "gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder tree (its train/ subfolder if present) or flat folder of "
                        "images; default: the toy dataset (written on first use)")
    g.add_argument("--num_workers", type=COUNT, default=None,
                   help="data loading processes per training process (default: 0 on the CPU, "
                        "where decoding in the training process costs less than competing for "
                        "the cores; min(8, CPU cores / processes per node) on GPU)")
    g.add_argument("--decode", choices=DECODE_CHOICES, default="cpu",
                   help="where JPEGs are decoded and cropped: 'cpu' in the loader workers (PIL), "
                        "'gpu' in the training process with nvjpeg (needs CUDA; workers only "
                        "read file bytes; other files fall back to PIL)")
    g.add_argument("--max_bad_fraction", type=number_type(float, 0, 1, high_open=False),
                   default=0.01,
                   help="stop when more than this fraction of an epoch's images are unreadable "
                        "(each one is skipped with a warning)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output/pretrain",
                   help="checkpoints, log.txt, reconstruction grids")
    g.add_argument("--log_dir", default=None,
                   help="TensorBoard folder parent (default: output_dir)")
    g.add_argument("--device", default=None, type=device_type,
                   help="cuda or cpu (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--seed", type=number_type(int, 0, 2 ** 31), default=0,
                   help="seed of initialisation, data order, augmentation and masking "
                        "(rank r uses seed + r for its own random streams)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from (default: none, or see --auto_resume)")
    g.add_argument("--auto_resume", action="store_true",
                   help="continue from output_dir/checkpoint-last.pth if it exists")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds one (its "
                        "checkpoint-last.pth is replaced)")
    g.add_argument("--save_every", type=POSITIVE_INT, default=1,
                   help="write checkpoint-last.pth every N epochs (and always at the end)")
    g.add_argument("--keep_every", type=COUNT, default=0,
                   help="also keep checkpoint-EPOCH.pth every N epochs (0: never)")
    g.add_argument("--log_every", type=POSITIVE_INT, default=20,
                   help="steps between log points (loss sync, TensorBoard, progress)")
    g.add_argument("--vis_images", type=COUNT, default=8,
                   help="images in the reconstruction grid written each epoch (0: none)")
    g.add_argument("--debug", action="store_true",
                   help=f"show the traceback of expected errors too (same as {DEBUG_ENV}=1)")
    g.add_argument("--max_steps", type=POSITIVE_INT, default=None,
                   help="stop after this many optimizer steps (>= 1) in all, counted from the "
                        "start of training, and save a checkpoint (default: run all epochs)")
    return p


def given_flags(argv: Optional[List[str]]) -> set:
    """The destinations of the flags written in ``argv`` (not left at their defaults)."""
    parser = get_args_parser()
    for action in parser._actions:  # argparse's documented way to tell them apart: SUPPRESS
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_args(args: argparse.Namespace, given: Optional[set] = None) -> None:
    """Checks that involve several flags (single flags are checked as they are parsed);
    ``given``: the flags written on the command line (:func:`given_flags`)."""
    if "warmup_epochs" in (given or ()) and args.warmup_epochs > args.epochs:
        raise SettingsError(f"--warmup_epochs {args.warmup_epochs:g} is longer than --epochs "
                            f"{args.epochs}: the learning rate would never reach its peak; use "
                            f"--warmup_epochs <= --epochs")
    if args.min_lr is not None and args.lr is not None and args.min_lr > args.lr:
        raise SettingsError(f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.input_size is not None:
        try:
            num_visible((args.input_size // 16) ** 2, args.mask_ratio)
        except ValueError as e:
            raise SettingsError(f"--input_size {args.input_size} with --mask_ratio "
                                f"{args.mask_ratio:g}: {e}; use a larger --input_size") from None
    if args.mfm != "clip" and args.teacher_checkpoint is not None:
        raise SettingsError(f"--teacher_checkpoint is only read by --mfm clip (now --mfm "
                            f"{args.mfm}); drop it or add --mfm clip")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise SettingsError(f"--output_dir {args.output_dir} is a file, not a folder")


def main(argv: Optional[List[str]] = None) -> TrainResult:
    """Parse ``argv`` and train; errors propagate (see :func:`cli` for the command line)."""
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args, given_flags(argv))
    except SettingsError:
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports it
            raise PeerStopped() from None
        raise
    from pretrain.config import PretrainConfig

    return train(PretrainConfig.from_namespace(args))


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: expected errors become one ``error:`` line and exit status 2."""
    def entry() -> int:
        try:
            main(argv)
        except PeerStopped:  # another process of the job prints the error
            _wait_for_rank0()
            return EXIT_USER_ERROR
        return 0

    argv = sys.argv[1:] if argv is None else argv
    if "--debug" not in argv:
        return run_cli(entry)
    before = os.environ.get(DEBUG_ENV)
    os.environ[DEBUG_ENV] = "1"  # run_cli reads it
    try:
        return run_cli(entry)
    finally:
        if before is None:
            del os.environ[DEBUG_ENV]
        else:
            os.environ[DEBUG_ENV] = before


if __name__ == "__main__":
    sys.exit(cli())

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
from pretrain.config import PretrainConfig, build_parser, validate  # noqa: E402
from pretrain.engine import PeerStopped, TrainResult, train  # noqa: E402
from pretrain.flags import SettingsError, wait_for_rank0  # noqa: E402


def get_args_parser():
    """The command line, built from the fields of :class:`pretrain.config.PretrainConfig`."""
    return build_parser()


def given_flags(argv: Optional[List[str]]) -> set:
    """The destinations of the flags written in ``argv`` (not left at their defaults)."""
    parser = get_args_parser()
    for action in parser._actions:  # argparse's documented way to tell them apart: SUPPRESS
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: Optional[List[str]] = None) -> TrainResult:
    """Parse ``argv`` and train; errors propagate (see :func:`cli` for the command line)."""
    config = PretrainConfig.from_namespace(get_args_parser().parse_args(argv))
    try:
        validate(config, tuple(given_flags(argv)))
    except SettingsError:
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports it
            raise PeerStopped() from None
        raise
    return train(config)


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: expected errors become one ``error:`` line and exit status 2."""
    def entry() -> int:
        try:
            main(argv)
        except PeerStopped:  # another process of the job prints the error
            wait_for_rank0()
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

"""Running a Detectron2 tool: an expected error ends as one ``error:`` line, also in workers.

:func:`itpn_d2.errors.run_cli` does this for one process. With ``--num-gpus``/``--num-machines``
> 1 Detectron2's ``launch`` runs ``main`` in spawned workers, where an exception would print a
traceback per worker and the parent a second one; :func:`launch_cli` runs each worker's
``main`` through ``run_cli`` (the worker prints its line and exits with its status) and turns
the parent's "process exited" error into that status.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any, Callable

from detectron2.engine import launch

from ..errors import UserError, debug_enabled, disk_full_message, run_cli

__all__ = ["InputFileError", "launch_cli", "quiet_expected_errors"]

class InputFileError(UserError, FileNotFoundError):
    """An input file named on the command line does not exist."""


# Loggers that log an exception with its traceback before re-raising it (TrainerBase.train).
_RERAISING_LOGGERS = ("detectron2.engine.train_loop",)


class _ExpectedErrorFilter(logging.Filter):
    """Drop "Exception during training" records of expected errors: run_cli prints them."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        expected = isinstance(error, UserError) or (
            isinstance(error, OSError) and disk_full_message(error) is not None)
        return not expected or debug_enabled()


_FILTER = _ExpectedErrorFilter()


def quiet_expected_errors() -> None:
    """Install the filter above on the loggers that re-raise (idempotent)."""
    for name in _RERAISING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _status(main: Callable[[Any], Any], args: Any) -> int:
    """``main(args)`` through ``run_cli``; a non-int result (e.g. evaluation results) is 0."""
    def call():
        result = main(args)
        return result if isinstance(result, int) else 0

    return run_cli(call)


def _worker(main: Callable[[Any], Any], args: Any) -> None:
    quiet_expected_errors()
    status = _status(main, args)
    if status:
        sys.exit(status)  # a launched worker: the parent sees the exit status


def launch_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``launch(main, ...)`` with Detectron2's ``--num-gpus`` / ``--num-machines`` /
    ``--machine-rank`` / ``--dist-url`` from ``args``; return the exit status.

    One process: ``main`` runs here through ``run_cli``. Several: each worker does, and a
    worker's non-zero exit (after its ``error:`` line) becomes this function's status.
    """
    from torch.multiprocessing.spawn import ProcessExitedException

    quiet_expected_errors()
    if args.num_gpus * args.num_machines == 1:
        return _status(main, args)
    try:
        launch(functools.partial(_worker, main), args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            return e.exit_code  # the worker printed why
        print(f"error: worker process {e.error_index} was killed ({e.signal_name or e}); see "
              f"its log above", file=sys.stderr)
        return 1
    return 0

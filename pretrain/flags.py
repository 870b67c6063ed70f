"""Command-line flags of the pretraining scripts: ``type=`` helpers for argparse, and
:class:`SettingsError` for flag values that cannot work.

argparse turns the ``ArgumentTypeError`` of a ``type=`` helper into "argument --flag: <message>".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Optional

from itpn_d2.errors import EXIT_USER_ERROR, UserError

# A rank that stops silently (rank 0 reports the error) waits this long before it exits:
# torchrun terminates the other processes as soon as one exits, which could cut rank 0 short.
QUIET_EXIT_DELAY_S = 1.0


class SettingsError(UserError, ValueError):
    """A pretraining flag value, or a combination of them, that cannot work."""


def number_type(kind: type, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = True,
            multiple_of: Optional[int] = None) -> Callable[[str], Any]:
    """A ``type=`` helper: ``kind(text)`` within ``[low, high)`` (ends per ``*_open``)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    if low is not None and high is not None:
        want = f"in {lo}{low}, {high}{hi}"
    elif low is not None:
        want = f"{'>' if low_open else '>='} {low}"
    else:
        want = "a number"
    if multiple_of:
        want = f"a multiple of {multiple_of}, {want}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value < low or (low_open and value == low))
        bad |= high is not None and (value > high or (high_open and value == high))
        bad |= bool(multiple_of) and value % multiple_of != 0
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.checks_range = True  # pretrain.config.validate applies it to values set in code
    return parse


def on_off(text: str) -> bool:
    """``on`` / ``off`` (a ``type=`` helper, also used for checkpoint values) -> bool."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def wait_for_rank0() -> None:
    time.sleep(QUIET_EXIT_DELAY_S)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help text already explains the default."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """Bad flags give one ``error:`` line and exit status 2; under torchrun only rank 0 prints
    it (every rank parses the same command line)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":
            message = message[len("argument "):] if message.startswith("argument ") else message
            print(f"error: {message} (see --help)", file=sys.stderr)
        else:
            wait_for_rank0()
        sys.exit(EXIT_USER_ERROR)


def device_type(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    return text

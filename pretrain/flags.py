"""Command-line flags of the pretraining scripts: ``type=`` helpers for argparse, and
:class:`SettingsError` for flag values that cannot work.

argparse turns the ``ArgumentTypeError`` of a ``type=`` helper into "argument --flag: <message>".
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Optional

from itpn_d2.errors import UserError


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

    return parse


def device_type(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    return text

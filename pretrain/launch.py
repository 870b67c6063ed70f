"""The ``itpn-pretrain`` command: :func:`itpn_d2.runtime.set_omp_wait_policy` before torch loads
(OpenMP reads it then), then :func:`pretrain.main.cli`. Importing :mod:`pretrain.main` itself
changes no environment variable."""

from __future__ import annotations

from typing import List, Optional

from itpn_d2.runtime import set_omp_wait_policy


def cli(argv: Optional[List[str]] = None) -> int:
    set_omp_wait_policy()
    from pretrain.main import cli as pretrain_cli

    return pretrain_cli(argv)

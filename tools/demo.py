#!/usr/bin/env python
"""End-to-end iTPN demo on the synthetic toy dataset, sized for a CPU (``make demo``).

The stages, presets and report are :mod:`itpn_d2.experiments.demo` (``--help`` shows them).

    python tools/demo.py                        # output/demo/REPORT.md
    python tools/demo.py --preset smoke --output output/demo_smoke
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

from itpn_d2.errors import run_cli
from itpn_d2.experiments import demo

# The checkout whose tools (pretrain/main.py, tools/*.py) and configs the stages run.
REPO = Path(__file__).resolve().parents[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return demo.main(demo.parse_args(argv, REPO, demo.__doc__), REPO)


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Check a CUDA machine: the GPU-only tests and every GPU performance target, one JSON report.

    tools/gpu_check.py --output RESULTS/gpu_check.json          # full check, ~4 min on an H200
    tools/gpu_check.py --quick --output RESULTS/gpu_check.json  # no compile, fewer steps, ~2 min
    tools/gpu_check.py --only pretrain d2                       # some groups
    tools/gpu_check.py --list                                   # the plan and targets (any machine)
    tools/gpu_check.py --print-install                          # shell lines for the GPU machine

Groups: gpu_tests (pytest -m gpu), pretrain, infer, d2, data (see pretrain/gpu_check.py).
The report holds the device name, torch / CUDA / torchvision / Python versions and, per check,
its figure, unit, target, status (pass / fail / error; tests also skip) and seconds. Exit status
0 when every check passed, 1 when one failed or erred, 2 for an error of use (no CUDA device).
Run it from the repository root with the project on PYTHONPATH (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from itpn_d2.errors import run_cli


# Shell lines for the GPU machine this project is lent (docs/performance.md, "GPU check"):
# tooling of this checkout, not library code.
INSTALL = """\
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site \\
    .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/.d2:$PWD PYTHONUNBUFFERED=1 || exit
mkdir -p "$OUT" && python3 tools/gpu_check.py --output "$OUT/gpu_check.json" 2>&1 \\
    | tee "$OUT/gpu_check.log\""""


def get_parser() -> argparse.ArgumentParser:
    from pretrain.gpu_check import ALL_GROUPS

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="gpu_check.json", help="JSON report file")
    p.add_argument("--quick", action="store_true",
                   help="no torch.compile, fewer steps, a smaller corpus (~2 min)")
    p.add_argument("--only", nargs="+", metavar="GROUP", default=None,
                   help=f"run only these groups: {', '.join(ALL_GROUPS)}")
    p.add_argument("--list", action="store_true",
                   help="print the plan and the targets, run nothing (works without CUDA)")
    p.add_argument("--print-install", action="store_true",
                   help="print the shell lines that install the wheels and run the check on "
                        "this project's GPU machine")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from pretrain import gpu_check as gc

    args = get_parser().parse_args(argv)
    if args.print_install:
        print(INSTALL)
        return 0
    plan = gc.make_plan(args.quick)
    groups = gc.resolve_groups(args.only)
    if args.list:
        print("\n".join(gc.plan_lines(plan, groups)))
        return 0
    device = gc.require_cuda()
    report = gc.run_check(Path(args.output), plan, groups, device)
    s = report["summary"]
    return 0 if s["fail"] == 0 and s["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))

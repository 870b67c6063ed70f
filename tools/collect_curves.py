#!/usr/bin/env python
"""Collect the evaluation curves of finished Detectron2 runs into one JSON and one PNG.

    python tools/collect_curves.py --run "scratch=output/a" --run "integral=output/b" \
        --output results/toy_reference/curves

Each run folder holds Detectron2's ``metrics.json`` (periodic evaluations) and ``config.yaml``
(its ``train.max_iter``); the JSON keeps, per run, the box / mask AP or mIoU after each
evaluation and the folder's overrides as Detectron2 saved them.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from itpn_d2.errors import UserError, run_cli
from itpn_d2.experiments.figures import plot_eval_curves
from itpn_d2.experiments.stages import eval_history


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="label=folder")
    p.add_argument("--output", type=Path, required=True, help="<output>.json and <output>.png")
    p.add_argument("--title", default="")
    args = p.parse_args()
    curves = {}
    for spec in args.run:
        label, _, folder = spec.partition("=")
        folder = Path(folder)
        if not (folder / "metrics.json").is_file() or not (folder / "config.yaml").is_file():
            raise UserError(f"{folder} has no metrics.json / config.yaml of a Detectron2 run")
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        max_iter = cfg["train"]["max_iter"]
        curve = {task: eval_history(folder / "metrics.json", max_iter, task, metric)
                 for task, metric in (("bbox", "AP"), ("segm", "AP"), ("sem_seg", "mIoU"))}
        curves[label] = {k: v for k, v in curve.items() if v}
        curves[label]["max_iter"] = max_iter
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    plot_eval_curves({k: {m: c for m, c in v.items() if m != "max_iter"}
                      for k, v in curves.items()}, args.output.with_suffix(".png"), args.title)
    print(f"wrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

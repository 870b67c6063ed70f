#!/usr/bin/env python
"""Object probe accuracy against samples seen for pretraining runs (:mod:`itpn_d2.probe_curve`).

    python tools/probe_curve.py --run integral=output/pretrain_integral \\
        --run conventional=output/pretrain_conventional --epochs 1 2 4 8 16 32 \\
        --toy-root datasets/itpn_toy --output results/toy/pretrain_curve

Each run folder holds the kept snapshots of ``pretrain/main.py --keep_every 1``; finished
probes under ``--output`` are reused. Writes ``probe_curve.json`` and ``probe_curve.png``.
"""

import argparse
import sys
from pathlib import Path

from itpn_d2.errors import UserError, run_cli
from itpn_d2.probe_curve import probe_curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="label=folder")
    p.add_argument("--epochs", type=int, nargs="+", required=True,
                   help="1-based epochs whose snapshots are probed")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--toy-root", type=Path, default=None,
                   help="toy dataset with the probe split (default: $ITPN_TOY_ROOT, else "
                        "datasets/itpn_toy)")
    p.add_argument("--input-size", type=int, default=None, help="passed to the probe")
    p.add_argument("--object-train", default=None,
                   help="passed to the probe: the split its classifiers are fit on (default "
                        "itpn_toy_train)")
    p.add_argument("--object-val", default=None,
                   help="passed to the probe: the split it scores (default itpn_toy_probe)")
    args = p.parse_args()
    runs = {}
    for spec in args.run:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise UserError(f"--run {spec!r}: expected label=folder")
        runs[label] = Path(folder)
    extra = [item for flag, value in (("--input-size", args.input_size),
                                      ("--object-train", args.object_train),
                                      ("--object-val", args.object_val)) if value
             for item in (flag, str(value))]
    curve = probe_curve(runs, args.epochs, args.output, args.toy_root, extra)
    for label, run in curve["runs"].items():
        for point in run["points"]:
            best = max(point["accuracy"].items(), key=lambda kv: kv[1]["accuracy"])
            print(f"{label} epoch {point['epoch']} ({point['samples']} samples): best "
                  f"{best[0]} {best[1]['accuracy']:.1f}")
    print(f"wrote {args.output / 'probe_curve.json'} and {args.output / 'probe_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

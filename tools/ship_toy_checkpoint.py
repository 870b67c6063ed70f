#!/usr/bin/env python
"""Make a shipped toy checkpoint (``itpn_d2/weights/<name>.pth`` + ``<name>.json``) from a
finished pretraining run: the export (backbone + pyramid + metadata) and its provenance
(command, commit, samples seen, wall time, machine, the object / dense probe numbers), and a
reconstruction grid of val images (``<name>_reconstruction.png``).

    python tools/ship_toy_checkpoint.py output/toy_pretrain/checkpoint-last.pth \
        itpn_nano_toy_integral --probe output/toy_pretrain/probe/probe.json \
        --command "python pretrain/main.py ..." --commit 922518c

The probe JSON comes from ``itpn-probe`` on the same checkpoint; the wall time and samples
seen from the run's ``log.txt`` beside the checkpoint.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from itpn_d2.errors import UserError, run_cli
from itpn_d2.zoo import WEIGHTS_DIR
from pretrain.export import export_backbone
from pretrain.visualize import main as visualize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="pretrain/main.py checkpoint")
    p.add_argument("name", help="shipped name, e.g. itpn_nano_toy_integral")
    p.add_argument("--probe", type=Path, required=True, help="itpn-probe's probe.json")
    p.add_argument("--command", required=True, help="the pretraining command that was run")
    p.add_argument("--commit", required=True, help="the commit the run used")
    p.add_argument("--images", type=Path, nargs="+", required=True,
                   help="val images for <name>_reconstruction.png (masked patches predicted)")
    p.add_argument("--machine", default=f"{platform.machine()}, {torch.get_num_threads()} "
                                        f"threads, torch {torch.__version__}")
    args = p.parse_args()
    log = args.checkpoint.parent / "log.txt"
    if not log.is_file():
        raise UserError(f"{log} is missing: the provenance needs the run's log")
    epochs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    run = ckpt["args"]
    WEIGHTS_DIR.mkdir(exist_ok=True)
    dst = WEIGHTS_DIR / f"{args.name}.pth"
    export_backbone(str(args.checkpoint), str(dst))
    probe = json.loads(args.probe.read_text())
    info = {
        "name": args.name,
        "file": dst.name,
        "command": args.command,
        "commit": args.commit,
        "settings": {k: run[k] for k in ("model", "input_size", "pyramid", "mfm", "mask_ratio",
                                         "epochs", "batch_size", "blr", "warmup_epochs",
                                         "seed")},
        "epochs_run": epochs[-1]["epoch"] + 1,
        "samples_seen": ckpt["step"] * run["eff_batch_size"],
        "wall_s": round(sum(e["time_s"] for e in epochs), 1),
        "final_loss": {k: epochs[-1][f"train_{k}"] for k in ("loss", "mim", "mfm")
                       if f"train_{k}" in epochs[-1]},
        "machine": args.machine,
        "probe": {protocol: {f"{r['model']}/{r['source']}": {
            k: v for k, v in r.items() if k not in ("model", "source", "weight_decay")}
            for r in result["rows"]} for protocol, result in probe["protocols"].items()},
        "probe_settings": {"command": "itpn-probe <file> (defaults)",
                           **probe["settings"]},
    }
    dst.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    visualize([str(args.checkpoint), *map(str, args.images),
               "--out", str(WEIGHTS_DIR / f"{args.name}_reconstruction.png")])
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB) and {dst.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

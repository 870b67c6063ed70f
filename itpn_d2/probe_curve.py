"""Probe accuracy against samples seen: the object probe of :mod:`itpn_d2.probe` on the kept
snapshots of pretraining runs (``checkpoint-<epoch index>.pth`` of ``pretrain/main.py
--keep_every``), one JSON and one PNG with a log-scale sample axis.

Each snapshot's probe report is kept under ``<output>/<run>/epoch<N>/probe.json`` and reused, so
a curve can be extended while its runs go on. Samples seen are read from the snapshot
(``step * eff_batch_size``). Snapshots of one run share its LR schedule: a point at epoch 4 of
a 32-epoch run is not a 4-epoch run; each point records the ``--epochs`` its snapshot was
trained under (``schedule_epochs``), which changes where a run was resumed with more epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .errors import UserError
from .probe import SOURCES
from .probe import main as probe_main

# Settings of a run recorded beside its points (the rest of ``args`` is the same for all arms).
RUN_SETTINGS = ("model", "input_size", "pyramid", "mfm", "mask_ratio", "epochs", "batch_size",
                "blr", "data_path", "seed")


def snapshot_info(path: Path) -> Dict:
    """``{"samples": ..., "epoch": ..., "settings": {...}}`` of a pretraining snapshot."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        args = ckpt["args"]
        samples = int(ckpt["step"]) * int(args["eff_batch_size"])
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a pretraining snapshot of pretrain/main.py ({e})") from None
    return {"samples": samples, "epoch": int(ckpt["epoch"]),
            "settings": {k: args.get(k) for k in RUN_SETTINGS}}


def probe_curve(runs: Dict[str, Path], epochs: Sequence[int], output: Path,
                toy_root: Optional[Path] = None, extra_args: Sequence[str] = ()) -> Dict:
    """Probe ``epochs`` (1-based; missing snapshots are skipped) of every run folder of
    ``runs`` (label -> folder); return and write ``<output>/probe_curve.json``."""
    curve: Dict = {"protocol": "object", "probe_args": list(extra_args), "runs": {},
                   "baselines": {}}
    for label, folder in runs.items():
        points: List[Dict] = []
        for epoch in epochs:
            snapshot = Path(folder) / f"checkpoint-{epoch - 1}.pth"
            if not snapshot.is_file():
                continue
            info = snapshot_info(snapshot)
            pyramid = info["settings"]["pyramid"] not in (False, "off")  # "off": older runs
            sources = [s for s in SOURCES if pyramid or s.startswith("c")]
            out = output / label / f"epoch{epoch}"
            if not (out / "probe.json").is_file():
                argv = [str(snapshot), "--protocols", "object", "--sources", *sources,
                        "--output", str(out), "--no-progress", *extra_args]
                if toy_root is not None:
                    argv += ["--toy-root", str(toy_root)]
                probe_main(argv)
            report = json.loads((out / "probe.json").read_text())["protocols"]["object"]
            rows = report["rows"]
            curve["split"] = {k: report[k] for k in ("train", "val", "num_train", "num_val")}
            points.append({"epoch": epoch, "samples": info["samples"],
                           "schedule_epochs": info["settings"]["epochs"],
                           "accuracy": {r["source"]: {"accuracy": r["accuracy"],
                                                      "ci95": r["ci95"]}
                                        for r in rows if r["model"] == "checkpoint"}})
            for r in rows:  # the same for every snapshot of one architecture and probe split
                if r["model"] != "checkpoint":
                    curve["baselines"][f"{r['model']}/{r['source']}"] = {
                        "accuracy": r["accuracy"], "ci95": r["ci95"]}
        if not points:
            raise UserError(f"{folder} holds none of the snapshots checkpoint-<epoch-1>.pth for "
                            f"epochs {list(epochs)}; pretrain with --keep_every 1")
        curve["runs"][label] = {"folder": str(folder), "settings": info["settings"],
                                "points": points}
    output.mkdir(parents=True, exist_ok=True)
    (output / "probe_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    plot_probe_curve(curve, output / "probe_curve.png")
    return curve


def plot_probe_curve(curve: Dict, path: Path) -> Path:
    """One panel per source: object probe accuracy against samples seen (log scale) for each
    run, raw pixels as a dashed line and the random model as a dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s in SOURCES
               if any(s in p["accuracy"] for r in curve["runs"].values() for p in r["points"])]
    fig, axes = plt.subplots(1, len(sources), figsize=(2.9 * len(sources), 3.0), sharey=True,
                             squeeze=False)
    pixels = curve["baselines"].get("pixels/pixels")
    for ax, source in zip(axes[0], sources):
        for label, run in curve["runs"].items():
            pts = [p for p in run["points"] if source in p["accuracy"]]
            if pts:
                ax.plot([p["samples"] for p in pts], [p["accuracy"][source]["accuracy"]
                                                      for p in pts], marker="o", markersize=3,
                        label=label)
        if pixels:
            ax.axhline(pixels["accuracy"], color="k", linestyle="--", linewidth=0.8,
                       label="raw pixels")
        random = curve["baselines"].get(f"random/{source}")
        if random:
            ax.axhline(random["accuracy"], color="grey", linestyle=":", linewidth=0.8,
                       label="random model")
        ax.set_xscale("log")
        ax.set_title(source, fontsize=9)
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("object probe accuracy %")
    legend = {}  # every run, also those missing from the last panel (no pyramid: no p-levels)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0][0].legend(legend.values(), legend.keys(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_probe_curve", "probe_curve", "snapshot_info"]

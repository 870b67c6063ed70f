"""The transfer study (``tools/transfer_study.py``): does a pre-trained pyramid fine-tune into a
better detector than a random one?

Fine-tunes one detector recipe with one budget from the starts of :data:`ARMS` under the
:data:`PROTOCOLS` (everything trains, or the HiViT frozen) over several seeds, each run a
cached stage (:mod:`itpn_d2.experiments.stages`) whose final box / mask AP comes from the
``eval_results.json`` the train tool writes and whose AP curve from its periodic evaluations
in ``metrics.json``. Per protocol it tabulates mean, standard deviation, 95% t interval and
paired (same seed) differences, gives a go / no-go verdict (does some pre-trained start beat
scratch?) and plots curves and final AP. Imports no detectron2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..data.toy import TOY_IMAGE_SIZE, toy_paths
from .stages import (FREEZE_PROTOCOLS, Experiment, Stage, StageError, d2_overrides,
                     d2_train_progress, eval_history, eval_metrics, file_digest, format_duration,
                     mean_std_ci, pretrain_progress, pretrain_summary, python, resolve_device,
                     toy_size_overrides)

ARMS = ("integral", "conventional", "scratch", "mim_only")
# pretrain/main.py settings of each pre-trained arm.
PRETRAIN_MODES = {
    "integral": ("on", "ema"),
    "conventional": ("off", "none"),
    "mim_only": ("on", "none"),
}
ARM_LABELS = {
    "integral": "integral (backbone + pyramid, MIM + MFM)",
    "conventional": "conventional (backbone only, pyramid random)",
    "scratch": "scratch (nothing pre-trained)",
    "mim_only": "integral, MIM only (no MFM)",
}
TOY_CONFIG = "configs/toy/mask_rcnn_itpn_nano.py"
# Fine-tuning protocols: the recipe's overrides of each ("scarce" also trains on
# --scarce-dataset).
PROTOCOLS = {**FREEZE_PROTOCOLS, "scarce": {}}
PROTOCOL_LABELS = {
    "full": "full fine-tuning",
    "frozen": "frozen backbone (pyramid and heads train)",
    "heads": "frozen backbone and pyramid (only the heads train)",
    "scarce": "full fine-tuning on few labelled images",
}
NO_GO = "no-go: pre-training does not beat scratch at this budget (interval includes 0)"


def get_parser(repo: Path, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The study's command line (``repo``: the checkout; outputs default to its ``output/``)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path(repo) / "output" / "transfer_study")
    p.add_argument("--arms", nargs="+", choices=ARMS,
                   default=["integral", "conventional", "scratch"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="fine-tuning seeds (at least 2 for a spread and a verdict)")
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=["full", "frozen"],
                   help="full: everything trains; frozen: the HiViT backbone stays fixed "
                        "(model.backbone.freeze_backbone=True), pyramid and heads train; "
                        "heads: backbone and pyramid stay fixed (also "
                        "model.backbone.freeze_pyramid=True), only the heads train; scarce: "
                        "full fine-tuning on --scarce-dataset")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per command (OMP_NUM_THREADS; default: PyTorch's choice)")
    p.add_argument("--no-progress", action="store_true")

    g = p.add_argument_group("toy data (used when the recipe reads itpn_toy_* datasets or "
                             "pretraining has no --pretrain-data)")
    g.add_argument("--num-train", type=int, default=256)
    g.add_argument("--num-val", type=int, default=64)
    g.add_argument("--num-pool", type=int, default=4096,
                   help="unlabelled images (images/pool) that toy pretraining reads; 0: it "
                        "reads the train images")
    g.add_argument("--image-size", type=int, default=TOY_IMAGE_SIZE)

    g = p.add_argument_group("pretraining (pretrain/main.py; one shared budget for every arm)")
    g.add_argument("--model", default="itpn_nano", help="--model of pretrain/main.py")
    g.add_argument("--pretrain-data", default=None,
                   help="--data_path (ImageNet-style folder); default: the toy train images")
    g.add_argument("--input-size", type=int, default=None,
                   help="--input_size (default: the toy image size on toy data, else 224)")
    g.add_argument("--pretrain-epochs", type=int, default=3,
                   help="epochs over the data (the toy pool: 4096 images, as the demo)")
    g.add_argument("--pretrain-batch", type=int, default=32, help="--batch_size per process")
    g.add_argument("--pretrain-blr", type=float, default=5e-3)
    g.add_argument("--pretrain-warmup", type=float, default=0.3)
    g.add_argument("--pretrain-nproc", type=int, default=1,
                   help="processes per node; > 1 launches pretraining with torchrun")
    g.add_argument("--pretrain-args", default="",
                   help="extra pretrain/main.py arguments, one quoted string")
    for arm in PRETRAIN_MODES:
        g.add_argument(f"--{arm.replace('_', '-')}-checkpoint", default=None,
                       help=f"use this checkpoint for the {arm} arm instead of pre-training it")

    g = p.add_argument_group("fine-tuning (tools/lazyconfig_train_net.py)")
    g.add_argument("--config-file", default=TOY_CONFIG, help="detection LazyConfig recipe")
    g.add_argument("--train-dataset", default=None, help="dataloader.train.dataset.names")
    g.add_argument("--test-dataset", default=None, help="dataloader.test.dataset.names")
    g.add_argument("--scarce-dataset", default="itpn_toy_train_64",
                   help="the training set of the scarce protocol (toy: itpn_toy_train_<n>, the "
                        "first n of the 256 train images, n in 32, 64, 128)")
    g.add_argument("--iters", type=int, default=200, help="train.max_iter of every run")
    g.add_argument("--protocol-iters", action="append", default=[], metavar="PROTOCOL=N",
                   help="train.max_iter of one protocol instead of --iters (repeatable), e.g. "
                        "heads=1200")
    g.add_argument("--evals", type=int, default=3,
                   help="evaluations per run (train.eval_period = iters // evals), the AP curve")
    g.add_argument("--batch", type=int, default=4, help="dataloader.train.total_batch_size")
    g.add_argument("--lr", type=float, default=2e-3, help="optimizer.lr")
    g.add_argument("--num-gpus", type=int, default=1, help="GPUs per fine-tuning run")
    g.add_argument("--set", dest="opts", action="append", default=[], metavar="KEY=VALUE",
                   help="another override of the recipe for every run (repeatable), e.g. "
                        "--set train.amp.enabled=True")
    return p


def parse_args(argv: Optional[Sequence[str]], repo: Path,
               description: Optional[str] = None) -> argparse.Namespace:
    """Parsed and checked arguments (a bad value exits with argparse's usage message);
    ``--config-file`` may be relative to the checkout ``repo``."""
    p = get_parser(repo, description)
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    if len(set(args.arms)) != len(args.arms):
        p.error(f"--arms must be distinct, got {args.arms}")
    if len(set(args.protocols)) != len(args.protocols):
        p.error(f"--protocols must be distinct, got {args.protocols}")
    for key in ("iters", "evals", "batch", "num_gpus", "pretrain_epochs", "pretrain_batch",
                "pretrain_nproc", "num_train", "num_val"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.num_pool < 0:
        p.error("--num-pool must be >= 0")
    args.iters_of = {protocol: args.iters for protocol in PROTOCOLS}
    for item in args.protocol_iters:
        protocol, _, n = item.partition("=")
        if protocol not in PROTOCOLS or not n.isdigit() or int(n) < 1:
            p.error(f"--protocol-iters takes PROTOCOL=N with PROTOCOL one of {list(PROTOCOLS)} "
                    f"and N >= 1, got {item!r}")
        args.iters_of[protocol] = int(n)
    for protocol in args.protocols:
        if args.evals > args.iters_of[protocol]:
            p.error(f"--evals {args.evals} is more than the {args.iters_of[protocol]} "
                    f"iterations of protocol {protocol}")
    if args.image_size % 32:
        p.error(f"--image-size must be a multiple of 32, got {args.image_size}")
    if not (Path(repo) / args.config_file).is_file() and not Path(args.config_file).is_file():
        p.error(f"--config-file {args.config_file} does not exist")
    for arm in PRETRAIN_MODES:
        path = getattr(args, f"{arm}_checkpoint")
        if path is not None and not Path(path).is_file():
            p.error(f"--{arm.replace('_', '-')}-checkpoint {path} does not exist")
    bad = [o for o in args.opts if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    args.device = resolve_device(args.device)
    args.output = args.output.resolve()
    return args


class Study(Experiment):
    """The study's stages; ``run()`` returns the summary written to results.json.

    Args:
        args: from :func:`parse_args`.
        repo: the checkout whose tools the stages run.
    """

    def __init__(self, args: argparse.Namespace, repo: Path):
        super().__init__(args, repo)
        self.toy_recipe = "configs/toy/" in Path(args.config_file).as_posix() \
            and args.train_dataset is None
        self.toy_pretrain = args.pretrain_data is None
        self.input_size = args.input_size or (args.image_size if self.toy_pretrain else 224)
        # toy pretraining reads the unlabelled pool when there is one
        self.pretrain_split = "pool" if args.num_pool > 0 else "train"

    # ------------------------------------------------------------------ stages
    def data(self) -> Optional[Stage]:
        if not (self.toy_recipe or (self.toy_pretrain and self.pretrained_arms_to_train())):
            return None
        return self.toy_data()

    def pretrained_arms_to_train(self) -> List[str]:
        return [arm for arm in self.args.arms
                if arm in PRETRAIN_MODES and getattr(self.args, f"{arm}_checkpoint") is None]

    def pretrain(self, arm: str, data: Optional[Stage]) -> Dict:
        """The checkpoint of ``arm``: given on the command line, or pre-trained here."""
        a = self.args
        given = getattr(a, f"{arm}_checkpoint")
        if given is not None:
            # by content: a new file under the same path reruns the arm's fine-tuning
            return {"checkpoint": str(Path(given).resolve()),
                    "fingerprint": {"given": given, "sha256": file_digest(given)},
                    "img_size": a.input_size or checkpoint_img_size(given)}
        pyramid, mfm = PRETRAIN_MODES[arm]
        paths = toy_paths(self.data_root)
        data_path = a.pretrain_data or str(paths["pool"] if self.pretrain_split == "pool"
                                           else paths["train"]["image_root"])
        settings = dict(model=a.model, pyramid=pyramid, mfm=mfm, data_path=data_path,
                        input_size=self.input_size, epochs=a.pretrain_epochs,
                        batch_size=a.pretrain_batch, blr=a.pretrain_blr,
                        warmup_epochs=a.pretrain_warmup, nproc=a.pretrain_nproc,
                        extra=a.pretrain_args, device=a.device,
                        code=self.pretrain_code,
                        data=data.fingerprint() if data is not None and self.toy_pretrain
                        else None)
        stage = Stage(f"pretrain_{arm}", f"pretrain {a.model} for the {arm} arm "
                      f"(--pyramid {pyramid} --mfm {mfm})", self.out / f"pretrain_{arm}",
                      settings, outputs=["checkpoint-last.pth", "backbone.pth"], resumable=True)

        def work(stage: Stage) -> Dict:
            launcher = [python()]
            if a.pretrain_nproc > 1:
                launcher = [python(), "-m", "torch.distributed.run",
                            f"--nproc_per_node={a.pretrain_nproc}"]
            cmd = [*launcher, self.runner.script("pretrain/main.py"), "--model", a.model,
                   "--data_path", data_path, "--input_size", self.input_size,
                   "--pyramid", pyramid, "--mfm", mfm, "--batch_size", a.pretrain_batch,
                   "--epochs", a.pretrain_epochs, "--warmup_epochs", a.pretrain_warmup,
                   "--blr", a.pretrain_blr, "--device", a.device, "--output_dir",
                   stage.out_dir, "--log_every", 5, "--vis_images", 0, "--auto_resume",
                   *a.pretrain_args.split()]
            total = None
            if self.toy_pretrain:
                images = a.num_pool if self.pretrain_split == "pool" else a.num_train
                total = a.pretrain_epochs * (images // (a.pretrain_batch * a.pretrain_nproc))
            self.runner.command(stage, cmd, pretrain_progress(total))
            self.runner.command(stage, [python(), self.runner.script("tools/export_backbone.py"),
                                        stage.out_dir / "checkpoint-last.pth",
                                        stage.out_dir / "backbone.pth"],
                                log_name=f"export_{arm}")
            return {} if a.dry_run else pretrain_summary(stage.out_dir)

        self.runner.run(stage, work)
        return {"checkpoint": str(stage.out_dir / "backbone.pth"),
                "fingerprint": stage.fingerprint(), "img_size": self.input_size}

    def finetune(self, arm: str, protocol: str, seed: int, start: Optional[Dict]) -> Stage:
        """One fine-tuning run; results: final ``bbox`` / ``segm`` metrics and the box AP
        ``curve`` of its periodic evaluations."""
        a = self.args
        iters = a.iters_of[protocol]
        eval_period = iters // a.evals
        settings = dict(config=a.config_file, iters=iters, batch=a.batch, lr=a.lr, seed=seed,
                        protocol=protocol, eval_period=eval_period,
                        scarce_dataset=a.scarce_dataset if protocol == "scarce" else None,
                        num_gpus=a.num_gpus, device=a.device, train_dataset=a.train_dataset,
                        test_dataset=a.test_dataset, opts=a.opts, image_size=a.image_size,
                        start=start["fingerprint"] if start else None,
                        code=self.d2_code,
                        data=self.data_fp)
        stage = Stage(f"finetune_{protocol}_{arm}_s{seed}",
                      f"fine-tune {arm} ({protocol}), seed {seed}",
                      self.out / "finetune" / protocol / f"{arm}_s{seed}", settings)

        def work(stage: Stage) -> Dict:
            overrides: Dict[str, object] = {
                "train.output_dir": str(stage.out_dir),
                "train.init_checkpoint": start["checkpoint"] if start else "",
                "train.device": a.device,
                "train.seed": seed,
                "train.max_iter": iters,
                "train.eval_period": eval_period,  # and after the last iteration
                "train.checkpointer.period": iters + 1,  # model_final.pth only
                "train.log_period": max(1, min(20, iters // 10)),
                "dataloader.train.total_batch_size": a.batch,
                "optimizer.lr": a.lr,
                **PROTOCOLS[protocol],
            }
            if self.toy_recipe:
                overrides.update(toy_size_overrides("det", a.image_size))
            img_size = start["img_size"] if start else (self.input_size if self.toy_pretrain
                                                        else None)
            if img_size:
                overrides["model.backbone.net.img_size"] = img_size
            if a.train_dataset:
                overrides["dataloader.train.dataset.names"] = a.train_dataset
            if protocol == "scarce":
                overrides["dataloader.train.dataset.names"] = a.scarce_dataset
            if a.test_dataset:
                overrides["dataloader.test.dataset.names"] = a.test_dataset
            cmd = [python(), self.runner.script("tools/lazyconfig_train_net.py"), "--config-file",
                   a.config_file, "--num-gpus", a.num_gpus, *d2_overrides(overrides), *a.opts]
            self.runner.command(stage, cmd, d2_train_progress(iters))
            if a.dry_run:
                return {}
            results = eval_metrics(stage, ("bbox", "segm"), required=("bbox",))
            results["curve"] = eval_history(stage.out_dir / "metrics.json", iters)
            return results

        return self.runner.run(stage, work)

    def run(self) -> Dict:
        a = self.args
        start_time = time.perf_counter()
        n_pre = len(self.pretrained_arms_to_train())
        n_runs = len(a.arms) * len(a.protocols) * len(a.seeds)
        print(f"transfer study: arms {', '.join(a.arms)}; protocols {', '.join(a.protocols)}; "
              f"seeds {a.seeds}; {n_pre} pretraining run(s) and {n_runs} fine-tuning runs of "
              f"{iteration_text(a.iters_of, a.protocols)}; output {self.out}", flush=True)
        self.runner.total_stages = (
            int(self.toy_recipe or (self.toy_pretrain and n_pre > 0)) + n_pre + n_runs)
        data = self.data()
        self.data_fp = data.fingerprint() if data is not None and self.toy_recipe else None
        starts = {arm: self.pretrain(arm, data) if arm in PRETRAIN_MODES else None
                  for arm in a.arms}
        runs: Dict[str, Dict[str, Dict[int, Dict]]] = {
            protocol: {arm: {} for arm in a.arms} for protocol in a.protocols}
        for seed in a.seeds:  # seed-major: an interrupted study has every arm at some seeds
            for protocol in a.protocols:
                for arm in a.arms:
                    runs[protocol][arm][seed] = self.finetune(arm, protocol, seed,
                                                              starts[arm]).results
        wall = time.perf_counter() - start_time
        summary = summarize_study(runs, a.arms)
        summary.update(
            wall_s=round(wall, 1),
            settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            pretraining={arm: s["fingerprint"] for arm, s in starts.items() if s},
        )
        if not a.dry_run:
            (self.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            (self.out / "results.md").write_text(render_markdown(summary))
            plot(summary, self.out / "transfer_study.png")
        return summary


def iteration_text(iters_of: Dict[str, int], protocols: Sequence[str]) -> str:
    """"1800 iterations" or, when protocols differ, "1800 iterations (heads: 1200)"."""
    counts = [iters_of[p] for p in protocols]
    common = max(counts, key=counts.count)  # ties: the first protocol's
    others = ", ".join(f"{p}: {iters_of[p]}" for p in protocols if iters_of[p] != common)
    return f"{common} iterations" + (f" ({others})" if others else "")


def checkpoint_img_size(path: str) -> Optional[int]:
    """The pretraining image size recorded in an iTPN checkpoint (``model_overrides``), which
    the detector's backbone must be built with; None for other files (Detectron2 checkpoints,
    published ones: the train tool then says what to set) or when nothing is recorded."""
    from itpn_d2.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except (CheckpointError, OSError, RuntimeError, ValueError):
        return None
    return (ckpt.get("model_overrides") or {}).get("img_size") if isinstance(ckpt, dict) else None


# ------------------------------------------------------------------------------ results
def paired_differences(runs: Dict[str, Dict[int, Dict]], first: str, second: str,
                       task: str) -> Optional[Dict]:
    """Statistics of ``first`` - ``second`` AP over the seeds both ran (None: no such seed)."""
    seeds = sorted(set(runs[first]) & set(runs[second]))
    diffs = [runs[first][s][task]["AP"] - runs[second][s][task]["AP"]
             for s in seeds if task in runs[first][s] and task in runs[second][s]]
    if not diffs:
        return None
    return {"a": first, "b": second, "task": task, **mean_std_ci(diffs), "values": diffs}


def mean_curve(arm_runs: Dict[int, Dict]) -> List[Dict]:
    """Box AP per evaluated iteration over the seeds (iterations every run evaluated)."""
    curves = [{p["iteration"]: p["value"] for p in r.get("curve", [])} for r in arm_runs.values()]
    if not curves:
        return []
    common = sorted(set.intersection(*(set(c) for c in curves)))
    return [{"iteration": i, **mean_std_ci(c[i] for c in curves)} for i in common]


def summarize_runs(runs: Dict[str, Dict[int, Dict]], arms: Sequence[str]) -> Dict:
    """Per-arm statistics of box and mask AP and the mean box AP curve, and paired (same
    seed) differences of every arm pair."""
    per_arm = {}
    for arm in arms:
        entry = {"runs": {str(s): r for s, r in runs[arm].items()}}
        for task in ("bbox", "segm"):
            values = [r[task]["AP"] for r in runs[arm].values() if task in r]
            entry[task] = {**mean_std_ci(values), "values": values}
        entry["curve"] = mean_curve(runs[arm])
        per_arm[arm] = entry
    paired = [d for i, first in enumerate(arms) for second in arms[i + 1:]
              for task in ("bbox", "segm")
              if (d := paired_differences(runs, first, second, task)) is not None]
    return {"arms": per_arm, "paired": paired}


def verdict(runs: Dict[str, Dict[int, Dict]], arms: Sequence[str]) -> Dict:
    """Go / no-go of one protocol: go when the paired box-AP difference (arm - scratch) of
    some pre-trained arm has a 95% interval above 0; ``reason`` says which, or why not."""
    if "scratch" not in arms:
        return {"go": False, "reason": "no verdict: the scratch arm is not in --arms"}
    pretrained = [arm for arm in arms if arm != "scratch"]
    if not pretrained:
        return {"go": False, "reason": "no verdict: no pre-trained arm in --arms"}
    diffs = {arm: paired_differences(runs, arm, "scratch", "bbox") for arm in pretrained}
    n = min((d["n"] if d else 0) for d in diffs.values())
    if n < 2:
        return {"go": False, "reason": f"no verdict: a 95% interval needs at least 2 seeds "
                                       f"with every arm run (have {n})"}
    low = {arm: d["mean"] - d["ci95"] for arm, d in diffs.items()}
    text = "; ".join(f"{arm} - scratch {d['mean']:+.1f} box AP ({low[arm]:+.1f}, "
                     f"{d['mean'] + d['ci95']:+.1f})" for arm, d in diffs.items())
    winners = [arm for arm in pretrained if low[arm] > 0]
    if winners:
        return {"go": True, "reason": f"go: {', '.join(winners)} beat(s) scratch (95% interval "
                                      f"above 0): {text}"}
    if all(d["mean"] + d["ci95"] < 0 for d in diffs.values()):  # not "includes 0"
        return {"go": False, "reason": "no-go: scratch beats pre-training at this budget "
                                       f"(interval below 0): {text}"}
    return {"go": False, "reason": f"{NO_GO}: {text}"}


def summarize_study(runs: Dict[str, Dict[str, Dict[int, Dict]]], arms: Sequence[str]) -> Dict:
    """:func:`summarize_runs` and :func:`verdict` of each protocol of ``runs``
    (``{protocol: {arm: {seed: results}}}``)."""
    return {"protocols": {p: summarize_runs(r, arms) for p, r in runs.items()},
            "verdict": {p: verdict(r, arms) for p, r in runs.items()}}


def _pm(stats: Dict) -> str:
    if stats["n"] == 0:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.1f}"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} ({stats['mean'] - stats['ci95']:.1f}, " \
           f"{stats['mean'] + stats['ci95']:.1f})"


def _paired_rows(paired: Sequence[Dict]) -> List[str]:
    rows = ["| comparison | metric | mean difference (95% t interval) | per seed |",
            "| --- | --- | --- | --- |"]
    for d in paired:
        ci = "" if d["n"] < 2 else \
            f" ({d['mean'] - d['ci95']:+.1f}, {d['mean'] + d['ci95']:+.1f})"
        per_seed = ", ".join(f"{v:+.1f}" for v in d["values"])
        metric = "box AP" if d["task"] == "bbox" else "mask AP"
        rows.append(f"| {d['a']} - {d['b']} | {metric} | {d['mean']:+.1f}{ci} | {per_seed} |")
    return rows


def render_protocol(protocol: str, summary: Dict, verdict_: Dict) -> List[str]:
    """The markdown section of one protocol: AP table, verdict, paired differences."""
    lines = [f"## {PROTOCOL_LABELS[protocol]} (`{protocol}`)", "",
             "| start | seeds | box AP | mask AP | box AP per seed |",
             "| --- | --- | --- | --- | --- |"]
    for arm, entry in summary["arms"].items():
        per_seed = ", ".join(f"{v:.1f}" for v in entry["bbox"]["values"])
        lines.append(f"| {ARM_LABELS[arm]} | {entry['bbox']['n']} | {_pm(entry['bbox'])} "
                     f"| {_pm(entry['segm'])} | {per_seed} |")
    lines += ["", f"**Verdict: {verdict_['reason']}**"]
    vs_scratch = [d for d in summary["paired"] if "scratch" in (d["a"], d["b"])]
    between = [d for d in summary["paired"] if "scratch" not in (d["a"], d["b"])]
    if vs_scratch:
        lines += ["", "Paired differences against scratch (same seed: same head "
                      "initialisation and data order):", "", *_paired_rows(vs_scratch)]
    if between:
        if verdict_["go"]:
            lines += ["", "Comparisons between pre-trained arms:", "", *_paired_rows(between)]
        else:
            lines += ["", "Differences between pre-trained arms (not interpreted: "
                          + ("no verdict" if verdict_["reason"].startswith("no verdict")
                             else "pre-training does not beat scratch at this budget")
                          + "):", "", *_paired_rows(between)]
    return lines + [""]


def pretraining_text(st: Dict) -> str:
    """How the pre-trained arms of the settings ``st`` were made."""
    given = {arm: st.get(f"{arm}_checkpoint") for arm in PRETRAIN_MODES
             if arm in st["arms"] and st.get(f"{arm}_checkpoint")}
    made = [arm for arm in PRETRAIN_MODES if arm in st["arms"] and arm not in given]
    parts = [f"{arm} from `{Path(path).name}`" for arm, path in given.items()]
    if made:
        parts.append(f"{', '.join(made)} pre-trained here (`{st['model']}`, "
                     f"{st['pretrain_epochs']} epochs at batch {st['pretrain_batch']})")
    return "pre-trained arms: " + "; ".join(parts) if parts else "no pre-trained arm"


def render_markdown(summary: Dict) -> str:
    st = summary["settings"]
    lines = [
        "# Transfer study: integral vs conventional pretraining",
        "",
        f"Recipe `{st['config_file']}`, "
        f"{iteration_text(st['iters_of'], st['protocols'])} at batch {st['batch']}, "
        f"lr {st['lr']}, seeds {st['seeds']}, {st['evals']} evaluations per run; "
        + pretraining_text(st)
        + (f"; `scarce` trains on `{st['scarce_dataset']}`" if "scarce" in st["protocols"]
           else "")
        + f". Took {format_duration(summary['wall_s'])} (cached runs count as 0).",
        "",
        "AP on Detectron2's 0-100 scale: mean ± sample std over seeds (95% t interval). "
        "Go when some pre-trained arm beats scratch: its paired box-AP difference has a 95% "
        "interval above 0.",
        "",
    ]
    for protocol, entry in summary["protocols"].items():
        lines += render_protocol(protocol, entry, summary["verdict"][protocol])
    lines += ["Toy scale (synthetic shapes, minutes of CPU training) is not COCO: the "
              "outcome says how these starts compare under this budget only.", ""]
    return "\n".join(lines)


def _plot_curves(ax, arms_summary: Dict) -> None:
    for x, (arm, entry) in enumerate(arms_summary.items()):
        curve = entry["curve"]
        if not curve:
            continue
        its = [p["iteration"] for p in curve]
        mean = [p["mean"] for p in curve]
        ax.plot(its, mean, color=f"C{x}", marker="o", ms=3, label=arm)
        if all(p["n"] > 1 for p in curve):
            ax.fill_between(its, [p["mean"] - p["ci95"] for p in curve],
                            [p["mean"] + p["ci95"] for p in curve], color=f"C{x}", alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("box AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_bars(ax, arms_summary: Dict, task: str = "bbox") -> None:
    arms = list(arms_summary)
    for x, arm in enumerate(arms):
        stats = arms_summary[arm][task]
        if stats["n"] == 0:
            continue
        ax.bar(x, stats["mean"], color=f"C{x}", alpha=0.45, width=0.6)
        if stats["n"] > 1:
            ax.errorbar(x, stats["mean"], yerr=stats["ci95"], color="k", capsize=5)
        ax.scatter([x] * stats["n"], stats["values"], color=f"C{x}", edgecolor="k",
                   zorder=3, s=22)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=15)
    ax.grid(axis="y", alpha=0.3)


def plot(summary: Dict, path: Path) -> Path:
    """One row per protocol: mean box AP vs iteration (95% band), final box AP bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(summary["protocols"])
    fig, axes = plt.subplots(len(protocols), 2, figsize=(10, 3.8 * len(protocols)), dpi=100,
                             squeeze=False)
    for row, protocol in zip(axes, protocols):
        arms_summary = summary["protocols"][protocol]["arms"]
        outcome = summary["verdict"][protocol]["reason"].split(":")[0]  # go, no-go, no verdict
        _plot_curves(row[0], arms_summary)
        row[0].set_title(f"{protocol}: box AP during fine-tuning (mean, 95% band)")
        _plot_bars(row[1], arms_summary)
        row[1].set_title(f"{protocol}: final box AP (mean, 95% CI, seeds): {outcome}")
    fig.suptitle("Detection fine-tuning from different starts (toy scale)"
                 if "toy" in summary["settings"]["config_file"] else
                 "Detection fine-tuning from different starts")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace, repo: Path) -> int:
    """Run the study of ``args`` (:func:`parse_args`) with the tools of the checkout ``repo``;
    print the table. Returns the exit status (1: a stage failed)."""
    study = Study(args, repo)
    try:
        summary = study.run()
    except StageError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print("\n" + render_markdown(summary))
        print(f"wrote {args.output / 'results.md'}, results.json, transfer_study.png")
    return 0


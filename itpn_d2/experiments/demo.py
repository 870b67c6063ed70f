"""The end-to-end iTPN demo on the synthetic toy dataset, sized for a CPU (``tools/demo.py``,
``make demo``).

Stages (each cached in its own folder under ``--output``, see :mod:`itpn_d2.experiments.stages`):

 1. toy data        make the shapes dataset (``tools/make_toy_dataset.py``): a small labelled
                    split and a large unlabelled pool
 2. pretrain        ``pretrain/main.py`` on the pool: itpn_nano, MIM + MFM with the EMA teacher; then
                    ``tools/export_backbone.py`` (backbone + pyramid for Detectron2)
 3. untrained       ``tools/lazyconfig_train_net.py --eval-only``: the Mask R-CNN with the
                    pre-trained backbone + pyramid and random heads, i.e. with zero fine-tuning
                    (the "untrained model" baseline of the box AP)
 4. detection       fine-tune ``configs/toy/mask_rcnn_itpn_nano.py`` from the export, then COCO
                    box / mask AP on the toy val split
 5. segmentation    fine-tune ``configs/toy/upernet_itpn_nano.py`` from the export, then mIoU
 6. figures         pretraining loss curve (log.txt), reconstruction grid
                    (``tools/visualize_reconstruction.py``), detection predictions on val
                    images (the top-scoring ones, from the COCO evaluator's results) and
                    segmentation predictions (``tools/visualize_semseg.py``)
 7. REPORT.md       the numbers, settings, timings, commands and figures; ``results.json``

Numbers come from the files the stages' tools write (``eval_results.json``, ``log.txt``).
Imports no detectron2 (the figures import it when they draw).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from ..data.images import IGNORE_LABEL
from ..data.toy import TOY_IMAGE_SIZE
from ..zoo import ZOO_PREFIX, zoo_path
from .figures import draw_top_detections, montage, plot_loss_curve, upscale
from .stages import (FREEZE_PROTOCOLS, Experiment, Stage, StageError, d2_eval_progress,
                     d2_overrides, d2_train_progress, eval_metrics, file_digest,
                     format_duration, pretrain_progress, pretrain_summary, python,
                     read_json_lines, resolve_device, toy_size_overrides)

DET_CONFIG = "configs/toy/mask_rcnn_itpn_nano.py"
SEG_CONFIG = "configs/toy/upernet_itpn_nano.py"
MODEL = "itpn_nano"
# The shipped checkpoint fine-tuning starts from (--init shipped): the best integral
# pretraining (96 epochs of the 4096-image pool), which --preset reproduce pretrains anew.
SHIPPED = "itpn_nano_toy_integral"
DET_RESULTS = "inference/coco_instances_results.json"  # under the detection stage's folder
# The transfer study committed with the checkout (tools/transfer_study.py on SHIPPED and its
# conventional counterpart, one folder per run of the tool; README "Transfer study"): REPORT.md
# shows it beside the live numbers.
STUDY_RESULTS = (Path("results") / "toy" / "transfer_study_96ep",
                 Path("results") / "toy" / "transfer_study_96ep_frozen_scarce",
                 Path("results") / "toy" / "transfer_study_96ep_full")

# Settings of each preset; command-line flags override single values.
PRESETS: Dict[str, Dict[str, object]] = {
    # 8.5-10.5 minutes on 2 CPU cores (measured on 3 seeds: README.md, "What the demo shows").
    "full": dict(
        num_train=256, num_val=64, num_pool=1024, num_probe=768, image_size=TOY_IMAGE_SIZE,
        init="shipped",
        pretrain_epochs=3, pretrain_batch=32, pretrain_blr=5e-3, pretrain_warmup=0.3,
        # Mask R-CNN's heads on the frozen shipped backbone + pyramid: box AP 63.9 / 66.0 /
        # 65.2 at 1200 iterations on seeds 0 / 1 / 2 (the transfer study's "heads" protocol),
        # where full fine-tuning of the 30-epoch pair reached 27-72 at 1800 depending on the
        # seed (README "Transfer study").
        det_iters=1200, det_batch=4, det_lr=2e-3, det_score_thresh=0.05, det_protocol="heads",
        seg_iters=2000, seg_batch=4, seg_lr=1e-3,
        vis_images=4,
    ),
    # Every stage in about a minute: checks an installation, not a result.
    "smoke": dict(
        num_train=16, num_val=4, num_pool=16, num_probe=0, image_size=64, init="live",
        pretrain_epochs=1, pretrain_batch=8, pretrain_blr=5e-3, pretrain_warmup=0,
        # a 4-iteration detector may score every box below 0.05: keep them all, so that the
        # COCO evaluation has predictions to score
        det_iters=4, det_batch=2, det_lr=1e-3, det_score_thresh=0.0, det_protocol="heads",
        seg_iters=4, seg_batch=2, seg_lr=3e-3,
        vis_images=2,
    ),
}
# Everything from nothing: the live pretraining is SHIPPED's (the command in
# itpn_d2/weights/<SHIPPED>.json: 96 epochs of the 4096-image pool), and the full preset's
# fine-tuning starts from it. 110 minutes on 2 CPU cores, measured end to end (README "The demo").
PRESETS["reproduce"] = {**PRESETS["full"], "num_pool": 4096, "init": "live",
                        "pretrain_epochs": 96, "pretrain_warmup": 1.0}


def get_parser(repo: Path, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The demo's command line (``repo``: the checkout; outputs default to its ``output/``)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path(repo) / "output" / "demo",
                   help="output folder (default: output/demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="default sizes: 'full' (8.5-10.5 min on 2 CPU cores), 'smoke' (~1 min) or "
                        "'reproduce' (the shipped pretraining from nothing, then 'full': ~2 h)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per command (OMP_NUM_THREADS; default: PyTorch's choice). "
                        "1 helps a lot when other jobs share the cores")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and fine-tuning")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("toy data")
    g.add_argument("--num-train", type=int, help="labelled training images")
    g.add_argument("--num-pool", type=int,
                   help="unlabelled images, the pretraining data (as ImageNet is to COCO)")
    g.add_argument("--num-val", type=int, help="validation images (all are evaluated)")
    g.add_argument("--num-probe", type=int,
                   help="labelled images held out for itpn-probe (0: none)")
    g.add_argument("--image-size", type=int, help="image side, a multiple of 32")
    g = p.add_argument_group("pretraining (pretrain/main.py, MIM + MFM with the EMA teacher)")
    g.add_argument("--pretrain-epochs", type=int)
    g.add_argument("--pretrain-batch", type=int, help="--batch_size")
    g.add_argument("--pretrain-blr", type=float, help="--blr (lr = blr x batch / 256)")
    g.add_argument("--pretrain-warmup", type=float, help="--warmup_epochs")
    g = p.add_argument_group("fine-tuning (tools/lazyconfig_train_net.py)")
    g.add_argument("--init", choices=("shipped", "live"),
                   help=f"start of fine-tuning: 'shipped', the integral pretraining shipped with "
                        f"the package ({ZOO_PREFIX}{SHIPPED}, see README), or 'live', this run's "
                        f"pretraining (full preset: shipped; at 128 px only)")
    g.add_argument("--det-iters", type=int, help="Mask R-CNN iterations")
    g.add_argument("--det-batch", type=int, help="Mask R-CNN images per iteration")
    g.add_argument("--det-lr", type=float, help="Mask R-CNN AdamW learning rate")
    g.add_argument("--det-protocol", choices=list(FREEZE_PROTOCOLS),
                   help="what the Mask R-CNN fine-tuning trains: 'full' everything, 'frozen' the "
                        "pyramid and heads on the frozen backbone, 'heads' only the heads on the "
                        "frozen backbone + pyramid")
    g.add_argument("--det-score-thresh", type=float,
                   help="Mask R-CNN's test score threshold (the recipe's: 0.05)")
    g.add_argument("--seg-iters", type=int, help="UPerNet iterations")
    g.add_argument("--seg-batch", type=int, help="UPerNet images per iteration")
    g.add_argument("--seg-lr", type=float, help="UPerNet AdamW learning rate")
    g.add_argument("--vis-images", type=int, help="val images drawn in the figures")
    return p


def parse_args(argv: Optional[Sequence[str]], repo: Path,
               description: Optional[str] = None) -> argparse.Namespace:
    """Parsed and checked arguments, the preset's values filling the flags not given (a bad
    value exits with argparse's usage message)."""
    p = get_parser(repo, description)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = ["num_train", "num_val", "num_pool", "image_size", "pretrain_epochs",
                "pretrain_batch",
                "det_iters", "det_batch", "seg_iters", "seg_batch", "vis_images"]
    bad = [f"--{k.replace('_', '-')}" for k in positive if getattr(args, k) < 1]
    if bad:
        p.error(f"{', '.join(bad)} must be >= 1")
    if args.image_size % 32:
        p.error(f"--image-size must be a multiple of 32, got {args.image_size}")
    if args.init == "shipped" and args.image_size != TOY_IMAGE_SIZE:
        p.error(f"--init shipped needs --image-size {TOY_IMAGE_SIZE} (the shipped pretraining's "
                f"size); use --init live for other sizes")
    if args.num_probe < 0:
        p.error("--num-probe must be >= 0")
    if args.pretrain_batch > args.num_pool:
        p.error(f"--pretrain-batch {args.pretrain_batch} exceeds --num-pool {args.num_pool}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.device = resolve_device(args.device)
    args.output = args.output.resolve()
    return args


# ------------------------------------------------------------------------------- stages
class Demo(Experiment):
    """The demo's stages; ``run()`` returns the results written to results.json / REPORT.md.

    Args:
        args: from :func:`parse_args`.
        repo: the checkout whose tools the stages run.
    """

    def __init__(self, args: argparse.Namespace, repo: Path):
        super().__init__(args, repo, total_stages=6)

    def d2_common(self, stage: Stage, max_iter: int) -> Dict[str, object]:
        a = self.args
        return {
            "train.output_dir": str(stage.out_dir),
            "train.device": a.device,
            "train.seed": a.seed,
            "train.max_iter": max_iter,
            "train.eval_period": max_iter,  # evaluate once, at the end
            "train.checkpointer.period": max_iter + 1,  # model_final.pth only
            "train.log_period": max(1, min(10, max_iter // 10)),
        }

    def score_thresh_override(self) -> Dict[str, object]:
        return {"model.roi_heads.box_predictor.test_score_thresh": self.args.det_score_thresh}

    def size_overrides(self, kind: str) -> Dict[str, object]:
        return toy_size_overrides(kind, self.args.image_size)

    def pretrain(self, data: Stage) -> Stage:
        a = self.args
        settings = dict(model=MODEL, mfm="ema", pyramid="on", epochs=a.pretrain_epochs,
                        batch_size=a.pretrain_batch, blr=a.pretrain_blr,
                        warmup_epochs=a.pretrain_warmup, seed=a.seed, device=a.device,
                        code=self.pretrain_code, data=data.fingerprint())
        stage = Stage("pretrain", "pretrain itpn_nano (MIM + MFM, EMA teacher)",
                      self.out / "pretrain", settings,
                      outputs=["checkpoint-last.pth", "backbone.pth", "log.txt"], resumable=True)

        def work(stage: Stage) -> Dict:
            steps = a.pretrain_epochs * (a.num_pool // a.pretrain_batch)
            cmd = [python(), self.runner.script("pretrain/main.py"), "--model", MODEL,
                   "--data_path", self.data_root / "images" / "pool",
                   "--input_size", a.image_size, "--mfm", "ema", "--pyramid", "on",
                   "--batch_size", a.pretrain_batch, "--epochs", a.pretrain_epochs,
                   "--warmup_epochs", a.pretrain_warmup, "--blr", a.pretrain_blr,
                   "--seed", a.seed, "--device", a.device, "--output_dir", stage.out_dir,
                   "--cache_images",  # the pool is small: decode it once
                   "--auto_resume",  # an interrupted run continues (the stage is resumable)
                   "--log_every", max(1, min(5, steps // 20)), "--vis_images", 8]
            self.runner.command(stage, cmd, pretrain_progress(steps))
            self.runner.command(stage, [python(), self.runner.script("tools/export_backbone.py"),
                                        stage.out_dir / "checkpoint-last.pth",
                                        stage.out_dir / "backbone.pth"],
                                log_name="export")
            if a.dry_run:
                return {}
            return pretrain_summary(stage.out_dir, ("loss", "mim", "mfm"))

        return self.runner.run(stage, work)

    def set_init(self, pretrain: Stage) -> None:
        """Where fine-tuning starts (``--init``): the shipped integral pretraining or this
        run's; sets ``init_checkpoint`` and ``init_fingerprint`` (part of stage settings)."""
        if self.args.init == "shipped":
            path = zoo_path(SHIPPED)
            self.init_checkpoint = str(path)
            self.init_fingerprint = {"shipped": SHIPPED, "sha256": file_digest(path)}
        else:
            self.init_checkpoint = str(pretrain.out_dir / "backbone.pth")
            self.init_fingerprint = pretrain.fingerprint()

    def untrained(self) -> Stage:
        """Zero fine-tuning: pre-trained backbone + pyramid, random RPN/ROI heads."""
        a = self.args
        stage = Stage("untrained", "evaluate the untrained detector (random heads)",
                      self.out / "untrained", dict(config=DET_CONFIG, seed=a.seed,
                                                   score_thresh=a.det_score_thresh,
                                                   device=a.device, code=self.d2_code,
                                                   init=self.init_fingerprint))

        def work(stage: Stage) -> Dict:
            overrides = {**self.d2_common(stage, 1), **self.size_overrides("det"),
                         **self.score_thresh_override(),
                         "train.init_checkpoint": self.init_checkpoint}
            cmd = [python(), self.runner.script("tools/lazyconfig_train_net.py"), "--config-file",
                   DET_CONFIG, "--eval-only", *d2_overrides(overrides)]
            self.runner.command(stage, cmd, d2_eval_progress(a.num_val))
            return self.metrics(stage, ("bbox", "segm"))

        return self.runner.run(stage, work)

    def finetune_settings(self, config: str, iters: int, batch: int, lr: float
                          ) -> Dict[str, object]:
        a = self.args
        return dict(config=config, iters=iters, batch=batch, lr=lr, seed=a.seed, device=a.device,
                    code=self.d2_code, init=self.init_fingerprint)

    def finetune(self, stage: Stage, config: str, iters: int, batch: int, lr: float, size: str,
                 extra: Optional[Dict[str, object]] = None, progress: bool = True) -> None:
        """Fine-tune ``config`` from the initial checkpoint, on one thread: detection and
        segmentation run side by side (see :meth:`Runner.run_parallel`)."""
        overrides = {**self.d2_common(stage, iters), **self.size_overrides(size),
                     "train.init_checkpoint": self.init_checkpoint,
                     "dataloader.train.total_batch_size": batch, "optimizer.lr": lr,
                     **(extra or {})}
        cmd = [python(), self.runner.script("tools/lazyconfig_train_net.py"), "--config-file",
               config,
               *d2_overrides(overrides)]
        self.runner.command(stage, cmd, d2_train_progress(iters) if progress else None,
                            env={"OMP_NUM_THREADS": "1"} if self.args.device == "cpu" else None)

    def detection(self) -> Tuple[Stage, Callable[[Stage], Dict]]:
        a = self.args
        stage = Stage("detection", "fine-tune Mask R-CNN + COCO evaluation",
                      self.out / "detection",
                      {**self.finetune_settings(DET_CONFIG, a.det_iters, a.det_batch, a.det_lr),
                       "score_thresh": a.det_score_thresh, "protocol": a.det_protocol},
                      outputs=["model_final.pth", DET_RESULTS])

        def work(stage: Stage) -> Dict:
            # keep the val predictions (coco_instances_results.json) for the figure
            extra = {"dataloader.evaluator.output_dir": str(stage.out_dir / "inference"),
                     **self.score_thresh_override(), **FREEZE_PROTOCOLS[a.det_protocol]}
            self.finetune(stage, DET_CONFIG, a.det_iters, a.det_batch, a.det_lr, "det", extra)
            return self.metrics(stage, ("bbox", "segm"))

        return stage, work

    def segmentation(self) -> Tuple[Stage, Callable[[Stage], Dict]]:
        a = self.args
        stage = Stage("segmentation", "fine-tune UPerNet + mIoU evaluation",
                      self.out / "segmentation",
                      self.finetune_settings(SEG_CONFIG, a.seg_iters, a.seg_batch, a.seg_lr),
                      outputs=["model_final.pth"])

        def work(stage: Stage) -> Dict:
            extra = {}
            if a.image_size < TOY_IMAGE_SIZE:  # the toy recipe trains on whole 128 px images
                # (64 px at least: p6 is p5 pooled, stride 64)
                extra["dataloader.train.mapper.augmentations.crop_size"] = max(64, a.image_size)
                extra["dataloader.train.mapper.augmentations.short_edge"] = a.image_size
            self.finetune(stage, SEG_CONFIG, a.seg_iters, a.seg_batch, a.seg_lr, "seg", extra,
                          progress=False)  # the detection stage beside it shows the bar
            results = self.metrics(stage, ("sem_seg",))
            if not a.dry_run:
                results["all_background"] = all_background_scores(
                    self.data_root / "sem_seg" / "val")
            return results

        return stage, work

    def figures(self, pretrain: Stage, detection: Stage, segmentation: Stage) -> Stage:
        a = self.args
        stage = Stage("figures", "figures", self.out / "figures",
                      dict(vis_images=a.vis_images, device=a.device,
                           inputs=[s.fingerprint() for s in (pretrain, detection, segmentation)]),
                      outputs=["pretrain_loss.png", "reconstruction.png",
                               "detection_predictions.png", "segmentation_predictions.png"])

        def work(stage: Stage) -> Dict:
            out = stage.out_dir
            val_images = sorted((self.data_root / "images" / "val").glob("*.png"))[:a.vis_images]
            if not a.dry_run:
                plot_loss_curve(read_json_lines(pretrain.out_dir / "log.txt"),
                                out / "pretrain_loss.png")
            self.runner.command(
                stage, [python(), self.runner.script("tools/visualize_reconstruction.py"),
                        pretrain.out_dir / "checkpoint-last.pth", *val_images,
                        "--out", out / "reconstruction.png", "--device", a.device],
                log_name="vis_reconstruction")
            self.runner.command(
                stage, [python(), self.runner.script("tools/visualize_semseg.py"),
                        "--config-file", SEG_CONFIG,
                        "--checkpoint", segmentation.out_dir / "model_final.pth",
                        "--num-images", a.vis_images, "--output", out / "segmentation",
                        "--device", a.device, *d2_overrides(self.size_overrides("seg"))],
                log_name="vis_segmentation")
            if not a.dry_run:
                upscale(out / "reconstruction.png", min_width=640)
                if a.init == "shipped":  # made with tools/ship_toy_checkpoint.py
                    shutil.copyfile(zoo_path(SHIPPED).with_name(f"{SHIPPED}_reconstruction.png"),
                                    out / "shipped_reconstruction.png")
                    upscale(out / "shipped_reconstruction.png", min_width=640)
                paths = draw_top_detections(detection.out_dir / DET_RESULTS, self.data_root,
                                            out / "detection", a.vis_images)
                montage(paths, out / "detection_predictions.png",
                        "Mask R-CNN on toy val: ground truth | the k highest-scoring "
                        "detections (k = objects in the image)", columns=2)
                montage(sorted((out / "segmentation").glob("*.png")),
                        out / "segmentation_predictions.png",
                        "UPerNet on toy val: prediction | ground truth", columns=1)
            return {}

        return self.runner.run(stage, work)

    def metrics(self, stage: Stage, tasks: Sequence[str]) -> Dict:
        """``tasks`` of the stage's ``eval_results.json`` (each required; none in a dry run)."""
        return {} if self.args.dry_run else eval_metrics(stage, tasks, required=tasks)

    def run(self) -> Dict:
        start = time.perf_counter()
        data = self.toy_data()
        pretrain = self.pretrain(data)
        self.set_init(pretrain)
        untrained = self.untrained()
        detection, segmentation = self.runner.run_parallel([self.detection(),
                                                            self.segmentation()])
        figures = self.figures(pretrain, detection, segmentation)
        wall = time.perf_counter() - start
        stages = [data, pretrain, untrained, detection, segmentation, figures]
        summary = {
            **headline(stages, wall),
            "wall_s": round(wall, 1),
            "stages": {s.name: {"wall_s": round(s.wall_s, 1), "reused": s.reused,
                                "results": s.results} for s in stages},
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(self.args).items()},
            "machine": machine_info(self.args),
            "commands": [shlex.join(c) for c in self.runner.commands],
        }
        if not self.args.dry_run:
            (self.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            study = [committed_study(self.runner.repo / folder, self.out / "figures")
                     for folder in STUDY_RESULTS]
            study = "\n".join(text for text in study if text) or None
            (self.out / "REPORT.md").write_text(render_report(summary, study))
        return summary


def committed_study(folder: Path, figures: Path) -> Optional[str]:
    """The Markdown of a committed transfer study (``folder/results.md``, headings one level
    down), with its figure copied into ``figures`` as ``<folder name>.png``; None when the
    checkout has none."""
    md = folder / "results.md"
    if not md.is_file():
        return None
    text = md.read_text().replace("\n## ", "\n### ").replace("# ", "## ", 1)
    png = folder / "transfer_study.png"
    if png.is_file():
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, figures / f"{folder.name}.png")
        text += f"\n![transfer study](figures/{folder.name}.png)\n"
    return text


def all_background_scores(label_dir: Path, num_classes: int = 6,
                          ignore_label: int = IGNORE_LABEL) -> Dict[str, float]:
    """mIoU and pixel accuracy (0-100) of predicting background (label 0) everywhere, computed
    as Detectron2's SemSegEvaluator does (classes absent from labels and predictions are left
    out of the mean): the score a segmenter must beat to show it learned anything."""
    import numpy as np
    from PIL import Image

    counts = np.zeros(num_classes, dtype=np.int64)
    for path in sorted(Path(label_dir).glob("*.png")):
        labels = np.asarray(Image.open(path))
        labels = labels[labels != ignore_label]
        counts += np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    total = counts.sum()
    if total == 0:
        raise StageError(f"no labelled pixels under {label_dir}")
    present = counts > 0
    present[0] = True  # background is predicted everywhere
    ious = np.zeros(num_classes)
    ious[0] = counts[0] / total  # intersection: background pixels; union: every pixel
    return {"mIoU": float(100.0 * ious[present].mean()), "pACC": float(100.0 * counts[0] / total)}


# ------------------------------------------------------------------------------- report
def machine_info(args: argparse.Namespace) -> Dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": args.device,
            "threads": args.threads or torch.get_num_threads()}


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _loss(results: Dict, name: str) -> str:
    """``first -> final`` of a pretraining loss from the stage's results."""
    nan = float("nan")
    return (f"{results.get('first_' + name, nan):.4f} -> "
            f"{results.get('final_' + name, nan):.4f}")


def _init_text(cfg: Dict) -> str:
    if cfg.get("init") != "shipped":
        return "this run's live pretraining (`pretrain/backbone.pth`)"
    from ..zoo import zoo_info

    info = zoo_info(SHIPPED)
    return (f"the shipped integral pretraining `{ZOO_PREFIX}{SHIPPED}` ({info['samples_seen']:,} "
            f"samples seen, {info['epochs_run']} epochs of the pool; provenance in "
            f"`itpn_d2/weights/{SHIPPED}.json`)")


DET_PROTOCOL_TEXT = {
    "full": "fine-tuned from the pre-trained backbone + pyramid",
    "frozen": "pyramid and heads trained on the frozen pre-trained backbone",
    "heads": "heads trained on the frozen pre-trained backbone + pyramid",
}


def render_report(s: Dict, study: Optional[str] = None) -> str:
    st, cfg = s["stages"], s["settings"]
    pre = st["pretrain"]["results"]
    det, unt = st["detection"]["results"], st["untrained"]["results"]
    seg = st["segmentation"]["results"].get("sem_seg", {})
    seg0 = st["segmentation"]["results"].get("all_background", {})
    box, mask = det.get("bbox", {}), det.get("segm", {})
    ubox, umask = unt.get("bbox", {}), unt.get("segm", {})
    lines = [
        "# iTPN-D2 demo report",
        "",
        f"Written by `tools/demo.py` on {time.strftime('%Y-%m-%d %H:%M')}; this run took "
        f"{format_duration(s['wall_s'])} (stages reused from an earlier run count as 0). "
        f"Device: {s['machine']['device']}, {s['machine']['cpu_count']} CPU cores, "
        f"{s['machine']['threads']} threads, torch {s['machine']['torch']}.",
        "",
        "Toy scale: synthetic shapes, `itpn_nano` (1.2M parameters in backbone + pyramid) and "
        "minutes of training. "
        "The numbers show that the pipeline works end to end, not what iTPN reaches on "
        "ImageNet / COCO / ADE20K.",
        "",
        "## Results (toy val split)",
        "",
        f"Fine-tuning starts from {_init_text(cfg)}.",
        "",
        "| model | box AP | box AP50 | mask AP | mask AP50 | mIoU | pixel acc |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| Mask R-CNN, untrained (pre-trained backbone + pyramid, random heads, 0 iterations) "
        f"| {_fmt(ubox.get('AP'))} | {_fmt(ubox.get('AP50'))} | {_fmt(umask.get('AP'))} "
        f"| {_fmt(umask.get('AP50'))} | | |",
        f"| Mask R-CNN, {DET_PROTOCOL_TEXT[cfg.get('det_protocol', 'full')]} for "
        f"{cfg['det_iters']} iterations | {_fmt(box.get('AP'))} | {_fmt(box.get('AP50'))} "
        f"| {_fmt(mask.get('AP'))} | {_fmt(mask.get('AP50'))} | | |",
        f"| UPerNet, fine-tuned {cfg['seg_iters']} iterations | | | | | {_fmt(seg.get('mIoU'))} "
        f"| {_fmt(seg.get('pACC'))} |",
        f"| reference: \"background everywhere\" (computed from the val labels) | | | | "
        f"| {_fmt(seg0.get('mIoU'))} | {_fmt(seg0.get('pACC'))} |",
        "",
        f"Live pretraining ({pre.get('epochs')} epochs of the pool, MIM + MFM with the EMA "
        f"teacher): loss {_loss(pre, 'loss')} (MIM {_loss(pre, 'mim')}, MFM "
        f"{_loss(pre, 'mfm')}).",
        "",
        "AP and mIoU are on Detectron2's 0-100 scale (COCO evaluation of the toy val split). "
        "The untrained baseline is the same detector evaluated before any fine-tuning; "
        "`tools/transfer_study.py` compares fine-tuning from scratch with the same budget. "
        "A segmenter that predicts background everywhere scores the reference row; the "
        "toy UPerNet recipe weighs background 0.2 in its loss so that it leaves it "
        "(README, \"Toy evidence\"). Toy runs vary with the seed by many points: the README "
        "gives the range measured over seeds.",
        "",
    ]
    if study:
        folders = ", ".join(f"`{f.as_posix()}/`" for f in STUDY_RESULTS)
        lines += [f"The transfer study below was run on `{SHIPPED}` and its conventional "
                  f"counterpart and committed with the checkout ({folders}, README "
                  f"\"Transfer study\"); this demo did not run it. It compares starts and "
                  f"protocols over seeds at this toy scale.",
                  "", study.rstrip(), ""]
    lines += [
        "## Figures",
        "",
        "Pretraining loss (log.txt):",
        "",
        "![pretraining loss](figures/pretrain_loss.png)",
        "",
        "Reconstructions of val images by the live pretraining (columns: original, masked "
        "input, reconstruction):",
        "",
        "![reconstruction](figures/reconstruction.png)",
        "",
    ]
    if cfg.get("init") == "shipped":
        lines += ["The same by the shipped pretraining that fine-tuning starts from:", "",
                  "![shipped reconstruction](figures/shipped_reconstruction.png)", ""]
    lines += [

        "Detection (Mask R-CNN) on val images: ground truth, then the k highest-scoring "
        "detections (k = objects in the image) with their scores:",
        "",
        "![detection](figures/detection_predictions.png)",
        "",
        "Segmentation (UPerNet) on val images (left: prediction, right: ground truth):",
        "",
        "![segmentation](figures/segmentation_predictions.png)",
        "",
        "## Stages",
        "",
        "| stage | wall time | reused | folder |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in st.items():
        lines.append(f"| {name} | {format_duration(info['wall_s'])} | "
                     f"{'yes' if info['reused'] else 'no'} | `{name}/` |")

    lines += ["", "## Settings", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    if s["commands"]:
        lines += ["## Commands run", "", "```bash"] + s["commands"] + ["```", ""]
    return "\n".join(lines)


def headline(stages: Sequence[Stage], wall_s: float) -> Dict[str, object]:
    """The top-level keys of results.json: the headline numbers (``None`` when a stage has no
    results, as in a dry run), this run's seconds and each stage's (the time it took when it
    ran, also when this run reused it)."""
    st = {s.name: s.results for s in stages}

    def get(stage: str, task: str, key: str) -> Optional[float]:
        return st.get(stage, {}).get(task, {}).get(key)

    return {"box_ap": get("detection", "bbox", "AP"), "mask_ap": get("detection", "segm", "AP"),
            "miou": get("segmentation", "sem_seg", "mIoU"),
            "miou_background": get("segmentation", "all_background", "mIoU"),
            "untrained_box_ap": get("untrained", "bbox", "AP"), "seconds": round(wall_s, 1),
            "stage_seconds": {s.name: round(s.wall_s, 1) for s in stages}}


def main(args: argparse.Namespace, repo: Path) -> int:
    """Run the demo of ``args`` (:func:`parse_args`) with the tools of the checkout ``repo``;
    print the headline numbers. Returns the exit status (1: a stage failed)."""
    demo = Demo(args, repo)
    print(f"iTPN-D2 demo: preset {args.preset}, device {args.device}, output {args.output}",
          flush=True)
    try:
        summary = demo.run()
    except StageError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    print(f"\ndemo finished in {format_duration(summary['seconds'])}\n"
          f"  detection (toy val):    box AP {summary['box_ap']:.1f}, mask AP "
          f"{summary['mask_ap']:.1f} (untrained: box AP {summary['untrained_box_ap']:.1f})\n"
          f"  segmentation (toy val): mIoU {summary['miou']:.1f}\n"
          f"  report: {args.output / 'REPORT.md'}", flush=True)
    return 0


"""Shared machinery of the demo and the transfer study: cached stages that run this project's
command-line tools (``tools/*.py``, ``pretrain/main.py`` of a checkout) as subprocesses, with a
progress bar each.

A stage is one command (pretraining, a Detectron2 fine-tune, an evaluation...) writing into its
own folder. When it succeeds, ``stage.json`` in that folder records the stage's settings and the
numbers it produced; a later run with the same settings reuses the folder instead of running
the command again (``force=True`` redoes it). A stage whose settings changed, or that was
interrupted, starts from an empty folder.

The full output of every command goes to ``<log_dir>/<stage>.log``; the console shows one
progress bar per stage, driven by the lines the tools print (pretraining steps, Detectron2
iterations, evaluated images). Numbers come from the files the tools write, never from their
printed text: ``eval_results.json`` (:mod:`itpn_d2.eval_results`), Detectron2's
``metrics.json`` and pretraining's ``log.txt``. Imports no detectron2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from tqdm import tqdm

from ..errors import UserError
from ..eval_results import EVAL_RESULTS, read_eval_results
from ..runtime import set_omp_wait_policy

# Code whose changes invalidate cached stages (see source_hash): pretraining, and Detectron2
# fine-tuning.
PRETRAIN_CODE = ("pretrain", "itpn_d2/modeling")
D2_CODE = ("configs", "itpn_d2")
RECORD = "stage.json"
# Settings of a resumable stage's run, written when it starts: an interrupted run with the same
# settings is continued instead of redone.
STARTED = "stage.started.json"
# What trains when fine-tuning from a pre-trained start: the detection recipe's overrides.
FREEZE_PROTOCOLS = {
    "full": {},  # everything
    "frozen": {"model.backbone.freeze_backbone": True},  # the pyramid and the heads
    "heads": {"model.backbone.freeze_backbone": True,  # the heads only
              "model.backbone.freeze_pyramid": True},
}
RECORD_VERSION = 1

# -------------------------------------------------------------------- progress lines
# Lines printed by pretrain/main.py when its stderr is not a terminal (one per --log_every).
PRETRAIN_TOTAL = re.compile(r"steps/epoch, (\d+) steps;")
PRETRAIN_STEP = re.compile(r"^epoch (\d+) step (\d+): loss ([-\d.naninf]+)")
# Detectron2's CommonMetricPrinter and inference_on_dataset.
D2_ITER = re.compile(r"\biter: (\d+)\s+total_loss: ([-\d.naninf]+)")
D2_INFERENCE = re.compile(r"Inference done (\d+)/(\d+)")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage, the command and its log."""


# ------------------------------------------------------------------------- progress
@dataclass
class Progress:
    """How a stage's output lines move its progress bar.

    Args:
        total: bar length (steps, iterations or images); a ``total_pattern`` may replace it.
        unit: bar unit shown by tqdm.
        total_pattern: regex whose first group, when a line matches, becomes the total.
        step_pattern: regex of a progress line: group ``step_group`` is the position reached
            (plus ``offset``), group ``loss_group`` (if set) a loss shown beside the bar.
        offset: added to the position (Detectron2 prints 0-based iteration numbers).
        eval_pattern: regex ``(done)/(total)`` of an evaluation, shown beside the bar.
    """

    total: Optional[int] = None
    unit: str = "it"
    total_pattern: Optional[re.Pattern] = None
    step_pattern: Optional[re.Pattern] = None
    step_group: int = 1
    loss_group: Optional[int] = None
    offset: int = 0
    eval_pattern: Optional[re.Pattern] = D2_INFERENCE

    def feed(self, line: str, bar: tqdm) -> None:
        if self.total_pattern is not None:
            m = self.total_pattern.search(line)
            if m:
                bar.total = int(m.group(1))
                bar.refresh()
        if self.step_pattern is not None:
            m = self.step_pattern.search(line)
            if m:
                pos = int(m.group(self.step_group)) + self.offset
                bar.update(max(pos - bar.n, 0))
                if self.loss_group is not None:
                    bar.set_postfix_str(f"loss {m.group(self.loss_group)}")
        if self.eval_pattern is not None:
            m = self.eval_pattern.search(line)
            if m:
                if self.step_pattern is None:  # an evaluation-only stage: the bar is the images
                    bar.total = int(m.group(2))
                    bar.update(max(int(m.group(1)) - bar.n, 0))
                else:
                    bar.set_postfix_str(f"evaluating {m.group(1)}/{m.group(2)} images")


def pretrain_progress(total: Optional[int] = None) -> Progress:
    return Progress(total=total, unit="step", total_pattern=PRETRAIN_TOTAL,
                    step_pattern=PRETRAIN_STEP, step_group=2, loss_group=3, eval_pattern=None)


def d2_train_progress(max_iter: int) -> Progress:
    return Progress(total=max_iter, unit="it", step_pattern=D2_ITER, loss_group=2, offset=1)


def d2_eval_progress(num_images: Optional[int] = None) -> Progress:
    return Progress(total=num_images, unit="img")


# --------------------------------------------------------------------------- stages
def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


@dataclass
class Stage:
    """One cached unit of work.

    Args:
        name: short identifier (log file name, record key).
        title: what the console shows.
        out_dir: the folder the stage owns (emptied before it runs).
        settings: everything that determines the stage's outputs, including the records of
            the stages it reads from; JSON-serialisable.
        outputs: files (relative to ``out_dir``) that must exist for the stage to be reused.
        resumable: ``work`` continues what an interrupted run left in ``out_dir`` (as
            ``pretrain/main.py --auto_resume`` does), so a run with the same settings keeps
            the folder instead of emptying it.
    """

    name: str
    title: str
    out_dir: Path
    settings: Dict
    outputs: Sequence[str] = ()
    resumable: bool = False
    results: Dict = field(default_factory=dict)
    wall_s: float = 0.0
    reused: bool = False

    @property
    def record_path(self) -> Path:
        return self.out_dir / RECORD

    def _matching_record(self, path: Path) -> Optional[Dict]:
        """The record at ``path`` if this stage's code version and settings wrote it."""
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("version") != RECORD_VERSION \
                or record.get("settings") != _jsonable(self.settings):
            return None
        return record

    def reusable(self) -> bool:
        """True when a finished run with the same settings left its record and outputs."""
        record = self._matching_record(self.record_path)
        if record is None or not all((self.out_dir / o).exists() for o in self.outputs):
            return False
        self.results = record.get("results", {})
        self.wall_s = record.get("wall_s", 0.0)
        return True

    def interrupted(self) -> bool:
        """True when a resumable stage's unfinished run with the same settings left its
        folder."""
        return self.resumable and self._matching_record(self.out_dir / STARTED) is not None

    def save(self) -> None:
        _write_json(self.record_path, {
            "version": RECORD_VERSION, "stage": self.name, "settings": self.settings,
            "results": self.results, "wall_s": round(self.wall_s, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})

    def save_started(self) -> None:
        _write_json(self.out_dir / STARTED, {
            "version": RECORD_VERSION, "stage": self.name, "settings": self.settings,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def fingerprint(self) -> Dict:
        """What downstream stages put in their settings: this stage's settings."""
        return {"stage": self.name, "settings": _jsonable(self.settings)}


# What the stages run: the experiments work from a checkout only (an installed itpn_d2 has none).
CHECKOUT_PARTS = ("tools/lazyconfig_train_net.py", "pretrain/main.py", "configs/toy")


def _write_json(path: Path, record: Dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    os.replace(tmp, path)


def require_checkout(repo: Path) -> None:
    """One-line :class:`UserError` unless ``repo`` holds what the stages run."""
    missing = [name for name in CHECKOUT_PARTS if not (Path(repo) / name).exists()]
    if missing:
        raise UserError(f"{repo} is not a checkout of iTPN-D2 (no {', '.join(missing)}): the "
                        f"experiments run the checkout's tools and configs, not the installed "
                        f"package; run them from a clone of the repository")


class Runner:
    """Runs stages in order: reuse or (re)run, log, time, report.

    Args:
        repo: the checkout whose scripts the commands run (their working directory).
        log_dir: where ``<stage>.log`` files go.
        env: extra environment variables of every command.
        force: redo every stage even if its record matches.
        dry_run: print the commands instead of running them (stages then have no results).
        progress: show progress bars (else one line per stage).
        stream: where stage summaries are printed.
        total_stages: shown as ``[i/total]`` (``None``: ``[i]``).
    """

    def __init__(self, repo: Path, log_dir: Path, env: Optional[Dict[str, str]] = None,
                 force: bool = False, dry_run: bool = False, progress: bool = True, stream=None,
                 total_stages: Optional[int] = None):
        self.repo = Path(repo)
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.force = force
        self.dry_run = dry_run
        self.progress = progress
        self.stream = stream or sys.stdout
        self.total_stages = total_stages
        self.stages: List[Stage] = []
        self.commands: List[List[str]] = []

    def say(self, msg: str) -> None:
        tqdm.write(msg, file=self.stream)
        self.stream.flush()

    def run(self, stage: Stage, work: Callable[[Stage], Dict]) -> Stage:
        """Reuse ``stage`` if possible, else empty its folder and call ``work(stage)``, whose
        returned dict becomes ``stage.results``."""
        self._register(stage)
        number = next(i for i, s in enumerate(self.stages) if s is stage) + 1
        index = f"{number}/{self.total_stages}" if self.total_stages else number
        if not self.force and not self.dry_run and stage.reusable():
            stage.reused = True
            self.say(f"[{index}] {stage.title}: reused {stage.out_dir} "
                     f"(same settings; --force redoes it)")
            return stage
        resuming = not self.force and not self.dry_run and stage.interrupted()
        if not self.dry_run and not resuming:
            if stage.out_dir.exists():
                shutil.rmtree(stage.out_dir)
            stage.out_dir.mkdir(parents=True)
            if stage.resumable:
                stage.save_started()
        self.say(f"[{index}] {stage.title}"
                 + (f": continuing the interrupted run in {stage.out_dir} ..." if resuming
                    else " ..."))
        start = time.perf_counter()
        stage.results = work(stage) or {}
        stage.wall_s = time.perf_counter() - start
        if not self.dry_run:
            stage.save()
            self.say(f"[{index}] {stage.title}: done in {format_duration(stage.wall_s)}"
                     + (f" ({summary})" if (summary := summarize(stage.results)) else ""))
        return stage

    def _register(self, stage: Stage) -> None:
        if not any(s is stage for s in self.stages):
            self.stages.append(stage)

    def run_parallel(self, jobs: Sequence[Tuple[Stage, Callable[[Stage], Dict]]]
                     ) -> List[Stage]:
        """:meth:`run` each ``(stage, work)`` at the same time, numbered in the given order.

        Each ``work`` runs in a thread of its own and its commands are processes, so two
        one-thread commands use two cores: on small models that is about twice the
        throughput of one two-thread command. A failure is raised once all have ended."""
        for stage, _ in jobs:
            self._register(stage)
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(self.run, stage, work) for stage, work in jobs]
            wait(futures)
        return [f.result() for f in futures]

    def script(self, name: str) -> str:
        """Path of a script of the checkout (``tools/x.py``, ``pretrain/main.py``)."""
        return str(self.repo / name)

    def command(self, stage: Stage, cmd: Sequence[str], progress: Optional[Progress] = None,
                env: Optional[Dict[str, str]] = None, log_name: Optional[str] = None) -> None:
        """Run ``cmd`` (from the checkout's root) with its output in the stage's log file and
        a progress bar (none without ``progress``; none either when stderr is not a terminal).
        Raises :class:`StageError` if it fails.

        The commands import ``itpn_d2`` (and ``pretrain``) as this process does: from the
        installed package, or from ``PYTHONPATH`` if the environment sets it."""
        cmd = [str(c) for c in cmd]
        self.commands.append(cmd)
        if self.dry_run:
            self.say("  " + shlex.join(cmd))
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{log_name or stage.name}.log"
        full_env = {**os.environ, **self.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        set_omp_wait_policy(full_env)
        lines: List[str] = []
        show = self.progress and progress is not None
        bar = tqdm(total=progress.total if show else None, desc=f"  {log_name or stage.name}",
                   unit=progress.unit if show else "it", dynamic_ncols=True, leave=False,
                   disable=None if show else True, file=sys.stderr)
        with open(log_path, "w", buffering=1) as log:  # line-buffered: tail -f works
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=self.repo, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            try:
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line)
                    if show:
                        progress.feed(line, bar)
                rc = proc.wait()
            except BaseException:  # Ctrl-C: stop the child too
                proc.kill()
                proc.wait()
                raise
            finally:
                bar.close()
        if rc != 0:
            tail = "".join(lines[-25:])
            raise StageError(f"stage {stage.name!r} failed (exit status {rc}): "
                             f"{shlex.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")


# -------------------------------------------------------------------------- helpers
def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summarize(results: Dict) -> str:
    """A short text of the headline numbers in a stage's results."""
    parts = []
    for task, key, label in (("bbox", "AP", "box AP"), ("segm", "AP", "mask AP"),
                             ("sem_seg", "mIoU", "mIoU")):
        value = results.get(task, {}).get(key)
        if value is not None:
            parts.append(f"{label} {value:.1f}")
    if "final_loss" in results:
        parts.append(f"loss {results['first_loss']:.3f} -> {results['final_loss']:.3f}")
    return ", ".join(parts)


def source_hash(repo: Path, *folders: str) -> str:
    """Short sha256 of the ``*.py`` files under ``folders`` (relative to the checkout ``repo``):
    part of a stage's settings, so that a stage reruns after the code it runs changed."""
    repo = Path(repo)
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted((repo / folder).rglob("*.py")):
            digest.update(str(path.relative_to(repo)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: how a stage's settings name a checkpoint it starts from, so
    that a new file under the same path reruns the stage."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` if PyTorch sees a GPU, else ``"cpu"``; other names as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def toy_env(data_root: Path, threads: Optional[int]) -> Dict[str, str]:
    """Environment of stage commands: the toy dataset root and, if given, the CPU threads."""
    env = {"ITPN_TOY_ROOT": str(data_root)}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def python() -> str:
    return sys.executable


def read_json_lines(path: Path) -> List[Dict]:
    """One JSON object per line: pretrain/main.py's ``log.txt`` (one per epoch), Detectron2's
    ``metrics.json`` (one per logged iteration or evaluation)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows



def pretrain_summary(out_dir: Path, losses: Sequence[str] = ("loss",)) -> Dict[str, float]:
    """Epochs and first / final ``train_<name>`` of each loss name, from ``out_dir/log.txt``."""
    rows = read_json_lines(Path(out_dir) / "log.txt")
    summary: Dict[str, float] = {"epochs": len(rows)}
    for name in losses:
        summary[f"first_{name}"] = rows[0][f"train_{name}"]
        summary[f"final_{name}"] = rows[-1][f"train_{name}"]
    return summary


def eval_metrics(stage: Stage, tasks: Sequence[str], required: Sequence[str] = ()) -> Dict:
    """``{task: metrics}`` of ``tasks`` from the ``eval_results.json`` the train tool wrote in
    ``stage.out_dir``; a task of ``required`` missing from it (or no file) is a
    :class:`StageError` naming the file."""
    path = stage.out_dir / EVAL_RESULTS
    try:
        results = read_eval_results(stage.out_dir)
    except (OSError, ValueError) as e:
        raise StageError(f"stage {stage.name!r}: no readable evaluation results in {path} "
                         f"({e})") from None
    missing = [t for t in required if t not in results]
    if missing:
        raise StageError(f"stage {stage.name!r}: no {', '.join(missing)} results in {path}")
    return {t: results[t] for t in tasks if t in results}


def eval_history(metrics_json: Path, max_iter: int, task: str = "bbox",
                 metric: str = "AP") -> List[Dict]:
    """``[{"iteration": i, "value": v}]`` of every evaluation Detectron2's ``EvalHook`` put into
    ``metrics.json`` (keys ``<task>/<metric>``), ``i`` = iterations trained before it.

    Args:
        metrics_json: the run's ``metrics.json``.
        max_iter: the run's ``train.max_iter``. A periodic evaluation is logged at the 0-based
            iteration it follows (``i - 1``), the one after the last iteration at ``max_iter``.
    """
    key = f"{task}/{metric}"
    return [{"iteration": min(row["iteration"] + 1, max_iter), "value": row[key]}
            for row in read_json_lines(metrics_json) if key in row]


def mean_std_ci(values: Iterable[float]) -> Dict[str, float]:
    """Mean, sample standard deviation and the half width of a two-sided 95% t interval."""
    values = [v for v in values if not math.isnan(v)]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": math.nan}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci95": math.nan}
    std = statistics.stdev(values)
    return {"n": n, "mean": mean, "std": std, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n)}


# Two-sided 95% quantiles of Student's t (df 1..30); beyond that the normal value is close.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def toy_size_overrides(kind: str, image_size: int) -> Dict[str, object]:
    """Overrides of a ``configs/toy`` recipe for toy images of ``image_size`` pixels, with a
    backbone pre-trained at that size (its position table has (size / 16)^2 entries): the
    test-time resize to the images' own size (the recipes assume 128 px) and, for UPerNet
    (``kind="seg"``), a window of the whole image, as the recipe's."""
    s = image_size
    common = {"model.backbone.net.img_size": s,
              "dataloader.test.mapper.augmentations.0.short_edge_length": s}
    if kind == "det":
        return {**common, "dataloader.test.mapper.augmentations.0.max_size": max(s * 5 // 3, s)}
    if kind == "seg":
        return {**common, "dataloader.test.mapper.augmentations.0.max_size": s * 4,
                "model.window_size": s, "model.window_stride": s}  # whole images
    raise ValueError(f"kind must be 'det' or 'seg', got {kind!r}")


_PLAIN = re.compile(r"^[A-Za-z0-9_/.\-+@%:]+$")


def d2_overrides(values: Dict[str, object]) -> List[str]:
    """``key=value`` arguments of the Detectron2 train tool, which parses values with Hydra's
    override grammar: strings other than plain words/paths are single-quoted."""
    out = []
    for key, value in values.items():
        if isinstance(value, str) and not _PLAIN.match(value):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}={value}")
    return out


__all__ = ["D2_CODE", "PRETRAIN_CODE", "Progress", "Runner", "Stage", "StageError",
           "d2_eval_progress", "d2_overrides", "d2_train_progress", "eval_history",
           "eval_metrics", "format_duration", "mean_std_ci", "pretrain_progress",
           "pretrain_summary", "python", "read_json_lines", "resolve_device",
           "source_hash", "summarize", "t_quantile_975", "toy_env", "toy_size_overrides"]


class Experiment:
    """What the demo and the transfer study share: ``args``, the output folder, the toy data
    folder, one :class:`Runner` over it, and the hashes of the code their stages run.

    Args:
        args: the experiment's parsed arguments (``output``, ``threads``, ``force``,
            ``dry_run``, ``no_progress``).
        repo: the checkout whose tools the stages run.
        total_stages: shown as ``[i/total]`` in the progress lines (``None``: ``[i]``).
    """

    def __init__(self, args, repo: Path, total_stages: Optional[int] = None):
        require_checkout(repo)
        self.args = args
        self.out = args.output
        self.data_root = self.out / "data"
        self.runner = Runner(repo, self.out / "logs", env=toy_env(self.data_root, args.threads),
                             force=args.force, dry_run=args.dry_run,
                             progress=not args.no_progress, total_stages=total_stages)
        # hashed once: part of the settings of the stages that run this code
        self.pretrain_code = source_hash(repo, *PRETRAIN_CODE)
        self.d2_code = source_hash(repo, *D2_CODE)

    def toy_data(self) -> Stage:
        """The toy dataset in ``data_root`` (``args``: ``num_train``, ``num_val``,
        ``num_pool``, ``image_size``), made by ``tools/make_toy_dataset.py``."""
        a = self.args
        sizes = dict(num_train=a.num_train, num_val=a.num_val, num_pool=a.num_pool,
                     image_size=a.image_size)
        if getattr(a, "num_probe", 0):  # the labelled split of itpn-probe
            sizes["num_probe"] = a.num_probe
        stage = Stage("data", "toy data", self.data_root, dict(**sizes, seed=0),
                      outputs=["meta.json"])

        def work(stage: Stage) -> Dict:
            flags = [x for key, value in sizes.items()
                     for x in (f"--{key.replace('_', '-')}", value)]
            self.runner.command(stage, [python(), self.runner.script("tools/make_toy_dataset.py"),
                                        stage.out_dir, *flags])
            return {}

        return self.runner.run(stage, work)

"""Training loop: schedules, AMP, gradient accumulation, DDP, checkpoints, exact resume, logging.

:func:`train` is :func:`setup` (settings, data, model, optimizer, resumed state), then
:func:`train_one_epoch` per epoch, each a sequence of :func:`train_step` (one optimizer step;
``tools/benchmark.py`` times this same function), then :func:`end_epoch` (``log.txt``,
reconstruction grid, :func:`save_training_state`). Messages go to the ``pretrain`` logger:
progress on stdout, notes on stderr.

Counting: a *step* is one optimizer update (``accum_iter`` data iterations). An epoch has
``steps_per_epoch = (images per process // batch_size) // accum_iter`` steps; leftover images
of an epoch are not used. The learning rate follows a per-step linear warm-up over
``warmup_epochs`` then a cosine decay to ``min_lr``; the EMA momentum follows a cosine from
``ema_momentum`` to 1 over all steps.

Checkpoints (rank 0, atomic) hold the iTPN ``model`` state dict plus the metadata of
:func:`itpn_d2.checkpoint.model_metadata`, ``decoder``, ``mfm_heads``, ``teacher`` (the EMA
backbone; ``None`` for the frozen CLIP teacher, which is reloaded from ``--teacher_checkpoint``),
``optimizer``, ``scaler``, ``epoch`` (the epoch in progress, 0-based), ``iter_in_epoch`` (data
iterations of that epoch already consumed, 0 at an epoch boundary), ``step``, ``args``, the random
states of every rank (``rng``: torch, CUDA, numpy, python and the masking generator) and the
running sums of the epoch in progress. Because the data order and augmentation follow
``(seed, epoch, position)`` (see :mod:`pretrain.data`), a resumed run continues exactly where the
interrupted one stopped, also in the middle of an epoch.

Interruptions and failures: rank 0 holds :func:`~itpn_d2.checkpoint.lock_run_dir` on
``output_dir`` (a second run into it stops; the lock ends with the process), removes temporaries
of interrupted saves at the start, and trims ``log.txt`` to the epochs of the checkpoint it
resumes (so no epoch is logged twice). A full disk while saving stops training with
:class:`~itpn_d2.errors.DiskFullError` and keeps the last complete checkpoint. With several
processes, an error in one rank stops all ranks together (:func:`raise_if_any_failed`) and is
reported once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from itpn_d2.checkpoint import (D2_LOAD_FLAGS, TEMP_SUFFIX, CheckpointError, OutputDirError,
                                check_state_dict, load_checkpoint, lock_run_dir, model_metadata,
                                remove_stale_temporaries, save_checkpoint, trim_json_lines)
from itpn_d2.errors import UserError

from .config import PretrainConfig
from .data import DataError, ResumableSampler, build_dataset, normalize
from .gpu_data import GPUDecoder, build_encoded_dataset, check_decode_device, collate_encoded
from .models import (PATCH_SIZE, EMATeacher, PretrainModel, SettingsError,
                     build_pretrain_model, decoder_size, ema_momentum, random_masking)
from .visualize import reconstruction_grid, save_image

log = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
DEFAULT_INPUT_SIZE = 224
TOY_INPUT_SIZE = 128  # the toy images' native size
# Settings that change the networks: a checkpoint made with other values cannot be resumed.
ARCH_ARGS = ("model", "input_size", "pyramid", "rpe", "fpn_depth", "layer_scale_init", "mfm",
             "mfm_loss")
# Settings that fix which images a step sees: resuming in the middle of an epoch needs them equal.
LAYOUT_ARGS = ("batch_size", "accum_iter", "world_size", "seed")


class ResumeError(CheckpointError):
    """The checkpoint to resume from belongs to another model or incompatible settings."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


class PeerStopped(UserError):
    """Another process of a multi-process job failed; that process reports the error."""


def raise_if_any_failed(error: Optional[BaseException], info: "DistInfo") -> None:
    """Collective: stop every rank together when any rank failed (no rank waits forever).

    The lowest failing rank raises its own ``error`` (so the job prints it once); the other
    ranks raise :class:`PeerStopped`.
    """
    if info.world_size > 1:
        failed: List[Any] = [None] * info.world_size
        dist.all_gather_object(failed, error is not None)
        first = next((r for r, f in enumerate(failed) if f), None)
        if first is not None and first != info.rank:
            raise PeerStopped(f"rank {first} stopped with an error")
    if error is not None:
        raise error


@dataclass
class TrainResult:
    """What :func:`train` returns (used by tests and scripts)."""

    model: PretrainModel  # unwrapped, on its device
    step: int
    epoch: int
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per logged step
    checkpoint: Optional[Path] = None


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: Optional[str]) -> Tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_name = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device cuda requested but CUDA is not available; "
                                "use --device cpu")
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        device, backend = torch.device("cuda", info.local_rank), "nccl"
    else:
        device, backend = torch.device(device_name), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
        info.initialized_here = True
    return info, device


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


# --------------------------------------------------------------------------- schedules


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: PretrainModel, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters split into decay / no-decay (norms, biases, positions, layer scale,
    mask tokens). Teacher parameters are frozen and not included."""
    skip = set(model.no_weight_decay_names())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: PretrainModel, config: PretrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused where the device has the kernels) over :func:`param_groups`."""
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=tuple(config.opt_betas))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused kernels unavailable for this device / dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


# --------------------------------------------------------------------------- random states


def rng_state(mask_gen: torch.Generator, device: torch.device) -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "mask": mask_gen.get_state(),
    }


def set_rng_state(state: Dict[str, Any], mask_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    mask_gen.set_state(state["mask"])


def gather_rng_states(state: Dict[str, Any], info: DistInfo) -> List[Dict[str, Any]]:
    if info.world_size == 1:
        return [state]
    states: List[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- checkpoints


def find_resume(config: PretrainConfig) -> Optional[Path]:
    """The checkpoint to continue from (None: a new run). A new run, or one resumed from
    another run's file, must not replace the checkpoint-last.pth of the run in output_dir
    unless ``--overwrite`` says so (resuming one of that run's own snapshots may)."""
    last = Path(config.output_dir) / LAST
    path = None
    if config.resume:
        path = Path(config.resume).expanduser()
        if not path.is_file():
            raise ResumeError(f"--resume: checkpoint not found: {path}")
    elif config.auto_resume and last.is_file():
        path = last
    if last.is_file() and not config.overwrite \
            and (path is None or not path.parent.samefile(last.parent)):
        raise ResumeError(f"--output_dir {config.output_dir} holds a pretraining run ({LAST}); "
                          f"pass --auto_resume to continue it, --overwrite to replace it, or "
                          f"choose another --output_dir")
    return path


def check_resume_compatible(ckpt: Dict[str, Any], config: PretrainConfig, path: Path) -> None:
    """One :class:`ResumeError` naming every architecture setting that differs."""
    old, args = ckpt.get("args"), config.to_dict()
    if not isinstance(old, dict) or "decoder" not in ckpt:
        raise ResumeError(f"{path} is not a pretraining checkpoint of pretrain/main.py "
                          f"(no 'args'/'decoder'); it cannot be resumed")
    diffs = [f"{k}: checkpoint {old.get(k)!r} vs now {args.get(k)!r}"
             for k in ARCH_ARGS if old.get(k) != args.get(k)]
    if args["mfm"] == "clip" and old.get("teacher") != args.get("teacher"):
        diffs.append(f"teacher: checkpoint {old.get('teacher')!r} vs now {args.get('teacher')!r}")
    if not diffs:  # the same model: its decoder sizes are known
        before, now = decoder_size(PretrainConfig.from_dict(old)), decoder_size(config)
        if tuple(before) != tuple(now):
            diffs.append(f"decoder size: checkpoint {tuple(before)} vs now {tuple(now)} "
                         f"(dim, depth, heads, mfm_dim, mfm_heads)")
    if diffs:
        raise ResumeError(f"cannot resume from {path}: it was trained with other settings:\n  "
                          + "\n  ".join(diffs))


def load_training_state(ckpt: Dict[str, Any], model: PretrainModel, path: Path) -> None:
    parts = [(model.encoder, ckpt["model"], "model"), (model.decoder, ckpt["decoder"], "decoder"),
             (model.mfm_heads, ckpt.get("mfm_heads") or {}, "mfm_heads")]
    if isinstance(model.teacher, EMATeacher):
        if ckpt.get("teacher") is None:
            raise ResumeError(f"{path} has no EMA teacher state")
        parts.append((model.teacher.backbone, ckpt["teacher"], "teacher"))
    for module, sd, what in parts:
        check_state_dict(module, sd, f"{path} [{what}]")
        module.load_state_dict(sd)


def _lock_output_dir(out_dir: Path):
    """:func:`~itpn_d2.checkpoint.lock_run_dir` with one-line errors for unusable folders."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"--output_dir {out_dir} is a file, not a folder")
    try:
        return lock_run_dir(out_dir)
    except OutputDirError as e:
        raise SettingsError(f"--output_dir: {e}") from None


# --------------------------------------------------------------------------- logging


def trim_log(path: Path, epochs_done: int) -> int:
    """Drop the ``log.txt`` lines of epochs ``>= epochs_done`` and any incomplete line.

    An interrupted run may have logged epochs after its last checkpoint (``--save_every`` > 1,
    or a kill between the log line and the save); the resumed run logs them again. Returns
    the number of lines dropped; the file is replaced atomically.
    """
    return trim_json_lines(path, "epoch", epochs_done)


class Logger:
    """log.txt (JSON lines per epoch), TensorBoard scalars, and a progress bar, on rank 0."""

    def __init__(self, config: PretrainConfig, info: DistInfo, total: int, initial: int):
        self.enabled = info.is_main
        self.out = Path(config.output_dir)
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(config.log_dir or self.out) / "tensorboard"
            self.tb = SummaryWriter(log_dir=str(tb_dir))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard scalars")
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)
        self.plain = self.bar.disable  # no terminal: print a line per log interval instead

    def step(self, values: Dict[str, float], step: int, epoch: int, eta_s: float, n: int) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.plain:
            log.info(f"epoch {epoch} step {step}: loss {values['loss']:.4f} mim "
                     f"{values['mim']:.4f} mfm {values['mfm']:.4f} lr {values['lr']:.3e} "
                     f"{values['img_per_s']:.1f} img/s eta {_fmt_time(eta_s)}")
        else:
            self.bar.update(n)
            self.bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}",
                                 img_s=f"{values['img_per_s']:.1f}", lr=f"{values['lr']:.2e}")

    def epoch(self, stats: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "log.txt", "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.tb is not None:
            for k, v in stats.items():
                if k.startswith("train_"):
                    self.tb.add_scalar(f"epoch/{k[6:]}", v, stats["epoch"])
            self.tb.flush()
        msg = (f"epoch {stats['epoch']} done: loss {stats['train_loss']:.4f} "
               f"(mim {stats['train_mim']:.4f}, mfm {stats['train_mfm']:.4f}), "
               f"{stats['img_per_s']:.1f} img/s")
        if self.plain:
            log.info(msg)
        else:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- console


class _ConsoleHandler(logging.Handler):
    """Messages as plain lines: INFO on stdout, warnings on stderr. The stream is looked up at
    each message, so redirections (``contextlib.redirect_stderr``, pytest's capture) see it."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def setup_logging() -> logging.Logger:
    """The ``pretrain`` logger with its console handler (added once)."""
    logger = logging.getLogger("pretrain")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line per message, whatever the root logger holds
    return logger


# --------------------------------------------------------------------------- setup


def resolve_config(config: PretrainConfig, info: DistInfo,
                   device: torch.device) -> PretrainConfig:
    """Fill derived settings (effective batch, absolute lr, AMP, workers) and check the rest."""
    input_size = config.input_size
    if input_size is None:
        input_size = TOY_INPUT_SIZE if config.data_path is None else DEFAULT_INPUT_SIZE
    if input_size % 16:
        raise SettingsError(f"--input_size must be a multiple of 16, got {input_size}")
    if not 0.0 < config.mask_ratio < 1.0:
        raise SettingsError(f"--mask_ratio must be in (0, 1), got {config.mask_ratio}")
    for key in ("batch_size", "accum_iter", "epochs"):
        if getattr(config, key) < 1:
            raise SettingsError(f"--{key} must be >= 1, got {getattr(config, key)}")
    eff_batch = config.batch_size * config.accum_iter * info.world_size
    amp = config.amp or ("bf16" if device.type == "cuda" else "off")
    if amp == "fp16" and device.type != "cuda":
        raise SettingsError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    decode = config.decode or "cpu"
    check_decode_device(decode, device)
    num_workers = config.num_workers
    if num_workers is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = (os.cpu_count() or 1) // max(per_node, 1)
        num_workers = min(8, cores) if device.type == "cuda" else 0
    return config.replace(
        input_size=input_size, world_size=info.world_size, eff_batch_size=eff_batch,
        lr=config.blr * eff_batch / 256 if config.lr is None else config.lr, amp=amp,
        device=str(device), decode=decode, num_workers=num_workers)


def _prepare_output_dir(out_dir: Path, info: DistInfo, stack: contextlib.ExitStack) -> None:
    """Rank 0: one run per output folder, then clean up after interrupted saves."""
    if info.is_main:
        stack.enter_context(_lock_output_dir(out_dir))
        for tmp in remove_stale_temporaries(out_dir):
            log.warning(f"removed {tmp.name}, left by an interrupted checkpoint save")


def _seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seeds the global generators; returns the masking generator (CPU, saved in checkpoints)."""
    if device.type == "cuda":  # fixed input size; TF32 for the fp32 matmuls autocast leaves
        # Autotuning may pick other kernels in another run: off where runs must repeat bit
        # for bit (torch.use_deterministic_algorithms, as the CUDA exact-resume test does).
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003)


@dataclass
class Schedule:
    """Step counts of a run (see the module docstring)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    end_step: int  # total_steps, or --max_steps when smaller


def build_schedule(config: PretrainConfig, samples_per_rank: int) -> Schedule:
    steps_per_epoch = samples_per_rank // config.batch_size // config.accum_iter
    total = steps_per_epoch * config.epochs
    end = min(total, config.max_steps) if config.max_steps else total
    return Schedule(steps_per_epoch, total, int(round(config.warmup_epochs * steps_per_epoch)),
                    end)


@dataclass
class ResumeState:
    """Where training continues: 0 everywhere for a new run."""

    epoch: int = 0
    iter_in_epoch: int = 0  # data iterations of ``epoch`` already consumed
    step: int = 0
    meter: Optional[Dict[str, Any]] = None  # running sums of the interrupted epoch
    rng: Optional[Dict[str, Any]] = None  # this rank's random states


def restore_training_state(ckpt: Dict[str, Any], path: Path, config: PretrainConfig,
                           info: DistInfo, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, steps_per_epoch: int) -> ResumeState:
    """Optimizer, scaler and position of a checkpoint (the networks are loaded already).

    If the data layout changed (batch size, accumulation, world size, seed, steps per epoch),
    training restarts at the beginning of the interrupted epoch; in the middle of one that is
    an error, since other images would follow.
    """
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = ResumeState(ckpt["epoch"], ckpt.get("iter_in_epoch", 0), ckpt["step"])
    old, now = ckpt["args"], config.to_dict()
    changed = [k for k in LAYOUT_ARGS if old.get(k) != now.get(k)]
    changed += ["steps_per_epoch"] if ckpt.get("steps_per_epoch") != steps_per_epoch else []
    if changed and state.iter_in_epoch:
        raise ResumeError(
            f"cannot resume {path} in the middle of epoch {state.epoch}: "
            f"{', '.join(changed)} differ from the interrupted run")
    if changed:
        state.step = state.epoch * steps_per_epoch
        log.warning(f"note: {', '.join(changed)} changed; resuming at the start of epoch "
                    f"{state.epoch} (step {state.step})")
    else:
        state.meter = ckpt.get("epoch_meter")
        states = ckpt.get("rng") or []
        if len(states) == info.world_size:
            state.rng = states[info.rank]
    notes = sorted(k for k in old if k not in ARCH_ARGS + LAYOUT_ARGS and k in now
                   and old[k] != now[k]
                   and k not in ("resume", "auto_resume", "overwrite", "max_steps"))
    if info.is_main:
        log.info(f"resuming from {path}: epoch {state.epoch}, step {state.step}"
                 + (f"; settings now different: {', '.join(notes)}" if notes else ""))
    return state


@dataclass
class Trainer:
    """Everything one training process holds (built by :func:`setup`)."""

    config: PretrainConfig  # resolved (resolve_config)
    info: DistInfo
    device: torch.device
    schedule: Schedule
    model: PretrainModel  # unwrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mask_gen: torch.Generator  # masking noise (CPU, so its state is saved exactly)
    forward: Optional[torch.nn.Module] = None  # what the step calls: the model, DDP, compiled
    ddp: Optional[DistributedDataParallel] = None
    # Training only (train_step needs none of them: the benchmark leaves them unset)
    out_dir: Path = Path(".")
    dataset: Any = None  # PretrainImages or EncodedImages
    sampler: Optional[ResumableSampler] = None
    loader: Optional[DataLoader] = None
    decoder: Optional[GPUDecoder] = None  # --decode gpu
    start: ResumeState = field(default_factory=ResumeState)
    last_ckpt: Optional[Path] = None  # the last good checkpoint of this run (or the one resumed)

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.model

    def autocast(self):
        dtype = self.config.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def setup(config: PretrainConfig, info: DistInfo, device: torch.device,
          stack: contextlib.ExitStack) -> Trainer:
    """Data, model, optimizer and resumed state; everything that can fail on bad input.

    Every rank's setup must succeed before the first collective (DDP's broadcast): a failure
    in any rank stops all of them here (:func:`raise_if_any_failed`).
    """
    error: Optional[BaseException] = None
    trainer = None
    try:
        config = resolve_config(config, info, device)
        out_dir = Path(config.output_dir)
        _prepare_output_dir(out_dir, info, stack)
        mask_gen = _seed_everything(config.seed + info.rank, device)
        # --decode gpu: workers read bytes, this process decodes on the GPU
        dataset = (build_encoded_dataset if config.decode == "gpu" else build_dataset)(
            config.data_path, config.input_size)
        sampler = ResumableSampler(dataset, info.world_size, info.rank, shuffle=True,
                                   seed=config.seed)
        schedule = build_schedule(config, sampler.num_samples)
        if schedule.steps_per_epoch < 1:
            raise DataError(
                f"{len(dataset)} images under {dataset.root} give {sampler.num_samples} per "
                f"process, fewer than batch_size x accum_iter = "
                f"{config.batch_size * config.accum_iter}")
        model = build_pretrain_model(config)
        resume_path = find_resume(config)
        ckpt = None
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            check_resume_compatible(ckpt, config, resume_path)
            load_training_state(ckpt, model, resume_path)
        model.to(device)
        optimizer = build_optimizer(model, config, device)
        scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        start = ResumeState()
        if ckpt is not None:
            start = restore_training_state(ckpt, resume_path, config, info, optimizer, scaler,
                                           schedule.steps_per_epoch)
            del ckpt
        if info.is_main:  # log.txt then holds the epochs of the checkpoint resumed, if any
            dropped = trim_log(out_dir / "log.txt", start.epoch)
            if dropped:
                log.warning(f"note: dropped {dropped} line(s) of log.txt of epochs >= "
                            f"{start.epoch} (written after the last checkpoint, or by an "
                            f"earlier run)")
        trainer = Trainer(config, info, device, schedule, model, optimizer, scaler, mask_gen,
                          out_dir=out_dir, dataset=dataset, sampler=sampler, start=start,
                          last_ckpt=resume_path)
    except Exception as e:
        error = e
    raise_if_any_failed(error, info)
    return trainer


def wrap_model(trainer: Trainer) -> None:
    """DDP (several processes) and ``torch.compile`` around the model, the data loader."""
    config, device = trainer.config, trainer.device
    if trainer.info.world_size > 1:
        with warnings.catch_warnings():  # torch 2.14 deprecates it; its successor differs
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            trainer.ddp = DistributedDataParallel(
                trainer.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        trainer.forward = trainer.ddp
    if config.compile:
        trainer.forward = torch.compile(trainer.forward)
    gpu_decode = config.decode == "gpu"
    trainer.loader = DataLoader(
        trainer.dataset, batch_size=config.batch_size, sampler=trainer.sampler, drop_last=True,
        num_workers=config.num_workers, pin_memory=device.type == "cuda" and not gpu_decode,
        persistent_workers=config.num_workers > 0,
        collate_fn=collate_encoded if gpu_decode else None,
        generator=torch.Generator().manual_seed(config.seed))
    trainer.decoder = GPUDecoder(device, config.input_size) if gpu_decode else None


# --------------------------------------------------------------------------- one step


def train_step(trainer: Trainer, batches: Iterator[torch.Tensor], step: int) -> torch.Tensor:
    """One optimizer step over ``accum_iter`` micro-batches; returns ``[loss, mim, mfm]``
    (means over the micro-batches, on the device, not synchronised).

    Each micro-batch (ImageNet-normalised images on the device, taken from ``batches`` as it is
    needed) is masked, run forward under autocast and backward (DDP synchronises gradients on
    the last one only); then the learning rate of ``step`` is set, gradients clipped, AdamW
    steps and the EMA teacher follows the student.
    """
    config, model, optimizer, scaler = trainer.config, trainer.model, trainer.optimizer, \
        trainer.scaler
    accum = config.accum_iter
    num_tokens = (config.input_size // PATCH_SIZE) ** 2
    acc = torch.zeros(3, device=trainer.device)
    for i in range(accum):
        images = next(batches)
        masks = random_masking(images.shape[0], num_tokens, config.mask_ratio, trainer.mask_gen,
                               trainer.device)
        sync = (trainer.ddp.no_sync() if trainer.ddp is not None and i + 1 < accum
                else contextlib.nullcontext())
        with sync:
            with trainer.autocast():
                out = trainer.forward(images, masks)
            scaler.scale(out.loss / accum).backward()
        acc += torch.stack([out.loss.detach(), out.mim, out.mfm]) / accum

    schedule = trainer.schedule
    lr = lr_at(step, config.lr, config.min_lr, schedule.warmup_steps, schedule.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if config.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], config.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model.teacher, EMATeacher):
        model.teacher.update(model.encoder.backbone,
                             ema_momentum(step, schedule.total_steps, config.ema_momentum))
    return acc


# --------------------------------------------------------------------------- one epoch


class StepLog:
    """Per-step ``[loss, mim, mfm]`` kept on the device between log points, where they are
    averaged over ranks in one host sync, checked for NaN and logged."""

    def __init__(self, trainer: Trainer, logger: Logger, history: List[Dict[str, float]],
                 t_start: float, steps_before: int):
        self.trainer, self.logger, self.history = trainer, logger, history
        self.t_start, self.steps_before = t_start, steps_before
        self.values: List[torch.Tensor] = []
        self.steps: List[int] = []
        self.lrs: List[float] = []
        self.t_last, self.images = time.time(), 0

    def add(self, values: torch.Tensor, step: int, lr: float, images: int) -> None:
        self.values.append(values)
        self.steps.append(step)
        self.lrs.append(lr)
        self.images += images

    def __len__(self) -> int:
        return len(self.values)

    def flush(self, epoch: int, step: int) -> None:
        trainer = self.trainer
        values = all_reduce_mean(torch.stack(self.values), trainer.info).cpu()  # one host sync
        check_finite(values, self.steps, epoch, trainer.last_ckpt)
        now = time.time()
        img_s = self.images / max(now - self.t_last, 1e-9)
        done_here = max(step - self.steps_before, 1)
        eta = (now - self.t_start) / done_here * (trainer.schedule.end_step - step)
        for s, lr, row in zip(self.steps, self.lrs, values.tolist()):
            self.history.append({"step": s, "epoch": epoch, "loss": row[0], "mim": row[1],
                                 "mfm": row[2], "lr": lr})
        last = self.history[-1]
        self.logger.step({"loss": last["loss"], "mim": last["mim"], "mfm": last["mfm"],
                          "lr": last["lr"], "img_per_s": img_s}, step, epoch, eta,
                         len(self.values))
        self.values, self.steps, self.lrs = [], [], []
        self.t_last, self.images = now, 0


def check_finite(values: torch.Tensor, steps: List[int], epoch: int,
                 last_ckpt: Optional[Path]) -> None:
    """:class:`TrainingDiverged` at the first step of ``values`` ``(S, 3)`` that is not finite."""
    bad = ~torch.isfinite(values).all(dim=1)
    if bool(bad.any()):
        first = steps[int(bad.nonzero()[0, 0])]
        kept = (f"the last good checkpoint {last_ckpt} was kept" if last_ckpt is not None
                else "no checkpoint of this run had been written yet")
        raise TrainingDiverged(
            f"non-finite loss at step {first} (epoch {epoch}); stopping ({kept}). "
            f"Try a lower --blr, --clip_grad, or --amp bf16 instead of fp16.")


@dataclass
class EpochMeter:
    """Running sums of an epoch (rank-averaged in checkpoints, so a resumed mean is exact)."""

    sums: torch.Tensor  # loss, mim, mfm summed over steps
    count: int = 0
    bad: int = 0  # unreadable images

    def state(self, info: DistInfo) -> Dict[str, Any]:
        return {"sums": all_reduce_mean(self.sums, info).cpu().tolist(), "count": self.count,
                "bad": self.bad}


def _image_batches(trainer: Trainer, loader_iter: Iterator, meter: EpochMeter, epoch: int,
                   errors: List[DataError]) -> Iterator[torch.Tensor]:
    """Normalised images on the device; counts unreadable images against --max_bad_fraction."""
    config, info = trainer.config, trainer.info
    max_bad = config.max_bad_fraction * trainer.sampler.num_samples
    for images, bad in loader_iter:
        meter.bad += int(bad.sum())
        if meter.bad > max_bad and not errors:
            errors.append(DataError(
                f"{meter.bad} unreadable images in epoch {epoch}, more than "
                f"--max_bad_fraction {config.max_bad_fraction} of "
                f"{trainer.sampler.num_samples}; check the data under {trainer.dataset.root}"))
            if info.world_size == 1:
                raise errors[0]
            # Several processes: all stop together at the next log point (one message).
        images = (trainer.decoder(images) if trainer.decoder is not None
                  else images.to(trainer.device, non_blocking=True))
        yield normalize(images)


def train_one_epoch(trainer: Trainer, epoch: int, step: int, step_log: StepLog
                    ) -> Tuple[int, EpochMeter, int]:
    """Train ``epoch`` from where it stands (``trainer.start`` for the first epoch of a resumed
    run) until its end or ``--max_steps``. Returns the step reached, the epoch's meter and the
    data iterations of the epoch consumed."""
    config, info, schedule = trainer.config, trainer.info, trainer.schedule
    accum = config.accum_iter
    resumed = trainer.start if epoch == trainer.start.epoch else ResumeState()
    skip = resumed.iter_in_epoch
    trainer.sampler.set_epoch(epoch, skip=skip * config.batch_size)
    trainer.forward.train()
    meter = EpochMeter(torch.zeros(3, device=trainer.device))
    if resumed.meter is not None and skip:
        meter.sums += torch.tensor(resumed.meter["sums"], device=trainer.device)
        meter.count, meter.bad = resumed.meter["count"], resumed.meter["bad"]
    errors: List[DataError] = []
    batches = _image_batches(trainer, iter(trainer.loader), meter, epoch, errors)
    images_per_step = config.batch_size * accum * info.world_size
    iters = skip
    for _ in range(skip // accum, schedule.steps_per_epoch):
        values = train_step(trainer, batches, step)
        lr = trainer.optimizer.param_groups[0]["lr"]
        step += 1
        iters += accum
        meter.sums += values
        meter.count += 1
        step_log.add(values, step, lr, images_per_step)
        stop = step >= schedule.end_step
        if len(step_log) >= config.log_every or stop or iters == schedule.steps_per_epoch * accum:
            if info.world_size > 1:
                raise_if_any_failed(errors[0] if errors else None, info)
            step_log.flush(epoch, step)
        if stop:
            break
    batches.close()
    return step, meter, iters


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dict(trainer: Trainer, epoch: int, iter_in_epoch: int, step: int,
                    meter: Dict[str, Any], rng: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What a checkpoint holds (see the module docstring); ``args`` is a plain dict."""
    model = trainer.model
    return {
        **model_metadata(trainer.config.model, model.encoder.model_overrides),
        **D2_LOAD_FLAGS,  # stock Detectron2 loads "model" into backbone.net
        "model": model.encoder.state_dict(),
        "decoder": model.decoder.state_dict(),
        "mfm_heads": model.mfm_heads.state_dict(),
        "teacher": model.teacher_state(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "epoch": epoch, "iter_in_epoch": iter_in_epoch, "step": step,
        "steps_per_epoch": trainer.schedule.steps_per_epoch,
        "args": trainer.config.to_dict(),
        "rng": rng,
        "epoch_meter": meter,
    }


def save_training_state(trainer: Trainer, epoch: int, iter_in_epoch: int, step: int,
                        meter: Dict[str, Any], names: List[str]) -> None:
    """Collective: rank 0 writes the checkpoint under each of ``names``; an error there (a
    full disk) stops every rank and the last good file stays."""
    info = trainer.info
    states = gather_rng_states(rng_state(trainer.mask_gen, trainer.device), info)
    error = None
    if info.is_main:
        try:
            obj = checkpoint_dict(trainer, epoch, iter_in_epoch, step, meter, states)
            for name in names:
                save_checkpoint(obj, trainer.out_dir / name)
        except Exception as e:
            error = e
    raise_if_any_failed(error, info)
    trainer.last_ckpt = trainer.out_dir / LAST


def _checkpoint_names(config: PretrainConfig, epoch: int, stop: bool) -> List[str]:
    """The files to write after ``epoch``, in order: a kept snapshot before ``LAST``, so that a
    kill between the two leaves ``LAST`` at the epoch before, whose resume writes the snapshot
    again (the other order would resume past a snapshot never written)."""
    names = []
    if config.keep_every and (epoch + 1) % config.keep_every == 0:
        names.append(f"checkpoint-{epoch}.pth")
    if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs or stop:
        names.append(LAST)
    return names


# --------------------------------------------------------------------------- training


def train(config: PretrainConfig) -> TrainResult:
    """Run pretraining with the settings of ``pretrain/main.py``."""
    setup_logging()
    info, device = init_distributed(config.device)
    try:
        with contextlib.ExitStack() as stack:  # holds the output folder's lock
            return _train(config, info, device, stack)
    except RuntimeError as e:
        # A peer stopped (its own error line is above) or the network failed: no traceback.
        # gloo reports a peer that exited as a plain RuntimeError.
        lost = isinstance(e, dist.DistError) or "closed by peer" in str(e) \
            or "reset by peer" in str(e)
        if info.world_size == 1 or not lost:
            raise
        raise UserError(f"rank {info.rank} lost contact with the other processes of the job "
                        f"({type(e).__name__}); if another rank stopped with an error, its "
                        f"message is above") from e
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: PretrainConfig, info: DistInfo, device: torch.device,
           stack: contextlib.ExitStack) -> TrainResult:
    trainer = setup(config, info, device, stack)
    wrap_model(trainer)
    config, schedule, start = trainer.config, trainer.schedule, trainer.start
    if info.is_main:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        log.info(f"pretraining {config.model} (pyramid {config.pyramid}, mfm {config.mfm}) on "
                 f"{len(trainer.dataset)} images from {trainer.dataset.root}; "
                 f"{n_train / 1e6:.2f}M trainable params; effective batch "
                 f"{config.eff_batch_size}, lr {config.lr:.3e}, {schedule.steps_per_epoch} "
                 f"steps/epoch, {schedule.total_steps} steps; device {device}, amp "
                 f"{config.amp}, world size {info.world_size}")
    vis_batch = None
    if info.is_main and config.vis_images > 0:
        vis_batch = trainer.dataset.fixed_batch(config.vis_images)
    logger = Logger(config, info, total=schedule.end_step,
                    initial=min(start.step, schedule.end_step))
    history: List[Dict[str, float]] = []
    step_log = StepLog(trainer, logger, history, time.time(), start.step)
    if start.rng is not None:
        set_rng_state(start.rng, trainer.mask_gen, device)

    step, epoch = start.step, start.epoch
    for epoch in range(start.epoch, config.epochs):
        if step >= schedule.end_step:
            break
        t_epoch, step_before = time.time(), step
        step, meter, iters = train_one_epoch(trainer, epoch, step, step_log)
        stop = step >= schedule.end_step
        if iters == schedule.steps_per_epoch * config.accum_iter:  # the epoch is complete
            end_epoch(trainer, logger, epoch, step, meter, stop, vis_batch,
                      (step - step_before) * config.batch_size * config.accum_iter
                      * info.world_size / max(time.time() - t_epoch, 1e-9), t_epoch)
        else:  # stopped by --max_steps in the middle of the epoch
            if vis_batch is not None:
                write_reconstruction(trainer, vis_batch, trainer.out_dir / "reconstruction"
                                     / f"step_{step:07d}.png")
            save_training_state(trainer, epoch, iters, step, meter.state(info), [LAST])

    logger.close()
    if info.is_main:
        log.info(f"done: step {step} of {schedule.total_steps}; checkpoint {trainer.last_ckpt}")
        if trainer.decoder is not None:
            log.info(f"--decode gpu: {trainer.decoder.cpu_fallbacks} of "
                     f"{trainer.decoder.images} images were decoded on the CPU (CMYK / "
                     f"grayscale JPEGs, other formats)")
    return TrainResult(model=trainer.model, step=step, epoch=epoch, history=history,
                       checkpoint=trainer.last_ckpt)


def end_epoch(trainer: Trainer, logger: Logger, epoch: int, step: int, meter: EpochMeter,
              stop: bool, vis_batch: Optional[torch.Tensor], img_per_s: float,
              t_epoch: float) -> None:
    """The epoch's line in log.txt, its reconstruction grid and its checkpoints."""
    totals = meter.state(trainer.info)["sums"]
    n = max(meter.count, 1)
    logger.epoch({
        "epoch": epoch, "step": step, "train_loss": totals[0] / n,
        "train_mim": totals[1] / n, "train_mfm": totals[2] / n,
        "lr": trainer.optimizer.param_groups[0]["lr"], "unreadable_images": meter.bad,
        "img_per_s": img_per_s, "time_s": time.time() - t_epoch,
    })
    if vis_batch is not None:
        write_reconstruction(trainer, vis_batch,
                             trainer.out_dir / "reconstruction" / f"epoch_{epoch:04d}.png")
    names = _checkpoint_names(trainer.config, epoch, stop)
    if names:
        save_training_state(trainer, epoch + 1, 0, step, {"sums": [0.0] * 3, "count": 0, "bad": 0},
                            names)


def write_reconstruction(trainer: Trainer, images: torch.Tensor, path: Path) -> None:
    model = trainer.model
    was_training = model.training
    model.eval()
    with trainer.autocast():
        grid = reconstruction_grid(model, images.to(trainer.device), trainer.config.mask_ratio,
                                   seed=0)
    model.train(was_training)
    save_image(grid, path)


__all__ = ["train", "train_step", "train_one_epoch", "setup", "resolve_config", "Trainer",
           "TrainResult", "ResumeError", "TrainingDiverged", "PeerStopped", "trim_log", "lr_at",
           "param_groups", "init_distributed", "LAST"]

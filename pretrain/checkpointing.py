"""Training checkpoints: what they hold, writing them, the random states, and exact resume.

Checkpoints (rank 0, atomic) hold the iTPN ``model`` state dict plus the metadata of
:func:`itpn_d2.checkpoint.model_metadata`, ``decoder``, ``mfm_heads``, ``teacher`` (the EMA
backbone; ``None`` for the frozen CLIP teacher, which is reloaded from ``--teacher_checkpoint``),
``optimizer``, ``scaler``, ``epoch`` (the epoch in progress, 0-based), ``iter_in_epoch`` (data
iterations of that epoch already consumed, 0 at an epoch boundary), ``step``, ``args``, the random
states of every rank (``rng``: torch, CUDA, numpy, python and the masking generator) and the
running sums of the epoch in progress. Because the data order and augmentation follow
``(seed, epoch, position)`` (see :mod:`pretrain.data`), a resumed run continues exactly where the
interrupted one stopped, also in the middle of an epoch.

Interruptions: rank 0 holds :func:`~itpn_d2.checkpoint.lock_run_dir` on ``output_dir`` (a second
run into it stops; the lock ends with the process) and removes temporaries of interrupted saves
at the start. A full disk while saving stops training with
:class:`~itpn_d2.errors.DiskFullError` and keeps the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import torch

from itpn_d2.checkpoint import (D2_LOAD_FLAGS, CheckpointError, OutputDirError, check_state_dict,
                                lock_run_dir, model_metadata, remove_stale_temporaries,
                                save_checkpoint)

from .config import PretrainConfig
from .distributed import DistInfo, gather_rng_states, raise_if_any_failed
from .flags import SettingsError
from .models import EMATeacher, PretrainModel, decoder_size

if TYPE_CHECKING:  # annotations only (pretrain.engine imports this module)
    from .engine import Trainer

log = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
# Settings that change the networks: a checkpoint made with other values cannot be resumed.
ARCH_ARGS = ("model", "input_size", "pyramid", "rpe", "fpn_depth", "layer_scale_init", "mfm",
             "mfm_loss")
# Settings that fix which images a step sees: resuming in the middle of an epoch needs them equal.
LAYOUT_ARGS = ("batch_size", "accum_iter", "world_size", "seed")


class ResumeError(CheckpointError):
    """The checkpoint to resume from belongs to another model or incompatible settings."""


# --------------------------------------------------------------------------- random states


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


# --------------------------------------------------------------------------- resume


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
    old = {**old, **PretrainConfig.from_dict(old).to_dict()}  # typed as now ("on" -> True)
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


def _prepare_output_dir(out_dir: Path, info: DistInfo, stack: contextlib.ExitStack) -> None:
    """Rank 0: one run per output folder, then clean up after interrupted saves."""
    if info.is_main:
        stack.enter_context(_lock_output_dir(out_dir))
        for tmp in remove_stale_temporaries(out_dir):
            log.warning(f"removed {tmp.name}, left by an interrupted checkpoint save")


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


# --------------------------------------------------------------------------- saving


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

"""Training loop: schedules, AMP, gradient accumulation, DDP, checkpoints, exact resume, logging.

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
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from itpn_d2.checkpoint import (D2_LOAD_FLAGS, TEMP_SUFFIX, CheckpointError, _plain,
                                check_state_dict, load_checkpoint, lock_run_dir, model_metadata,
                                remove_stale_temporaries, save_checkpoint)
from itpn_d2.errors import UserError

from .data import DataError, ResumableSampler, build_dataset, normalize
from .gpu_data import GPUDecoder, build_encoded_dataset, check_decode_device, collate_encoded
from .models import (EMATeacher, PretrainModel, SettingsError, build_pretrain_model,
                     decoder_size, ema_momentum, random_masking)
from .visualize import reconstruction_grid, save_image

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


def build_optimizer(model: PretrainModel, args: Dict[str, Any], device: torch.device):
    groups = param_groups(model, args["weight_decay"])
    kwargs = dict(lr=args["lr"], betas=tuple(args["opt_betas"]))
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


def find_resume(args: Dict[str, Any]) -> Optional[Path]:
    if args.get("resume"):
        path = Path(args["resume"]).expanduser()
        if not path.is_file():
            raise ResumeError(f"--resume: checkpoint not found: {path}")
        return path
    if args.get("auto_resume"):
        path = Path(args["output_dir"]) / LAST
        return path if path.is_file() else None
    return None


def check_resume_compatible(ckpt: Dict[str, Any], args: Dict[str, Any], path: Path) -> None:
    """One :class:`ResumeError` naming every architecture setting that differs."""
    old = ckpt.get("args")
    if not isinstance(old, dict) or "decoder" not in ckpt:
        raise ResumeError(f"{path} is not a pretraining checkpoint of pretrain/main.py "
                          f"(no 'args'/'decoder'); it cannot be resumed")
    diffs = [f"{k}: checkpoint {old.get(k)!r} vs now {args.get(k)!r}"
             for k in ARCH_ARGS if old.get(k) != args.get(k)]
    if args["mfm"] == "clip" and old.get("teacher") != args.get("teacher"):
        diffs.append(f"teacher: checkpoint {old.get('teacher')!r} vs now {args.get('teacher')!r}")
    if not diffs and tuple(decoder_size(old)) != tuple(decoder_size(args)):
        diffs.append(f"decoder size: checkpoint {tuple(decoder_size(old))} vs now "
                     f"{tuple(decoder_size(args))} (dim, depth, heads, mfm_dim, mfm_heads)")
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
    except PermissionError as e:
        raise SettingsError(f"--output_dir {out_dir} is not writable ({e.strerror}); choose "
                            f"another folder") from None


# --------------------------------------------------------------------------- logging


def trim_log(path: Path, epochs_done: int) -> int:
    """Drop the ``log.txt`` lines of epochs ``>= epochs_done`` and any incomplete line.

    An interrupted run may have logged epochs after its last checkpoint (``--save_every`` > 1,
    or a kill between the log line and the save); the resumed run logs them again. Returns
    the number of lines dropped; the file is replaced atomically.
    """
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            entry = json.loads(line)
            epoch = int(entry["epoch"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
        if epoch < epochs_done and line.endswith("\n"):
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.trim{TEMP_SUFFIX}")  # removed at the next start
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


class Logger:
    """log.txt (JSON lines per epoch), TensorBoard scalars, and a progress bar, on rank 0."""

    def __init__(self, args: Dict[str, Any], info: DistInfo, total: int, initial: int):
        self.enabled = info.is_main
        self.out = Path(args["output_dir"])
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(args.get("log_dir") or self.out) / "tensorboard"
            self.tb = SummaryWriter(log_dir=str(tb_dir))
        except ImportError:
            print("tensorboard is not installed: no TensorBoard scalars", file=sys.stderr)
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
            print(f"epoch {epoch} step {step}: loss {values['loss']:.4f} mim {values['mim']:.4f} "
                  f"mfm {values['mfm']:.4f} lr {values['lr']:.3e} {values['img_per_s']:.1f} img/s "
                  f"eta {_fmt_time(eta_s)}", flush=True)
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
            print(msg, flush=True)
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


# --------------------------------------------------------------------------- training


def resolve_args(args: Dict[str, Any], info: DistInfo, device: torch.device) -> Dict[str, Any]:
    """Fill derived settings (effective batch, absolute lr, AMP) and check the rest."""
    args = dict(args)
    if args.get("input_size") is None:
        args["input_size"] = TOY_INPUT_SIZE if args.get("data_path") is None else DEFAULT_INPUT_SIZE
    if args["input_size"] % 16:
        raise SettingsError(f"--input_size must be a multiple of 16, got {args['input_size']}")
    if not 0.0 < args["mask_ratio"] < 1.0:
        raise SettingsError(f"--mask_ratio must be in (0, 1), got {args['mask_ratio']}")
    for key in ("batch_size", "accum_iter", "epochs"):
        if args[key] < 1:
            raise SettingsError(f"--{key} must be >= 1, got {args[key]}")
    args["world_size"] = info.world_size
    args["eff_batch_size"] = args["batch_size"] * args["accum_iter"] * info.world_size
    if args.get("lr") is None:
        args["lr"] = args["blr"] * args["eff_batch_size"] / 256
    amp = args.get("amp") or ("bf16" if device.type == "cuda" else "off")
    if amp == "fp16" and device.type != "cuda":
        raise SettingsError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    args["amp"] = amp
    args["device"] = str(device)
    args["decode"] = args.get("decode") or "cpu"
    check_decode_device(args["decode"], device)
    if args.get("num_workers") is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = (os.cpu_count() or 1) // max(per_node, 1)
        args["num_workers"] = min(8, cores) if device.type == "cuda" else 0
    return args


def train(args: Dict[str, Any]) -> TrainResult:
    """Run pretraining with the settings of ``pretrain/main.py`` (a dict)."""
    info, device = init_distributed(args.get("device"))
    try:
        with contextlib.ExitStack() as stack:  # holds the output folder's lock
            return _train(args, info, device, stack)
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


def _train(args: Dict[str, Any], info: DistInfo, device: torch.device,
           stack: contextlib.ExitStack) -> TrainResult:
    setup_error: Optional[BaseException] = None
    try:  # every rank's setup must succeed before the first collective (DDP's broadcast)
        args = resolve_args(args, info, device)
        out_dir = Path(args["output_dir"])
        if info.is_main:  # one run per output folder; then clean up after interrupted saves
            stack.enter_context(_lock_output_dir(out_dir))
            for tmp in remove_stale_temporaries(out_dir):
                print(f"removed {tmp.name}, left by an interrupted checkpoint save",
                      file=sys.stderr)
        if device.type == "cuda":  # fixed input size; TF32 for the fp32 matmuls autocast leaves
            # Autotuning may pick other kernels in another run: off where runs must repeat bit
            # for bit (torch.use_deterministic_algorithms, as the CUDA exact-resume test does).
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed = args["seed"] + info.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        mask_gen = torch.Generator().manual_seed(seed + 1_000_003)

        # ---- everything that can fail on bad input happens before the first step
        gpu_decode = args["decode"] == "gpu"  # workers read bytes, this process decodes on GPU
        dataset = (build_encoded_dataset if gpu_decode else build_dataset)(
            args.get("data_path"), args["input_size"])
        sampler = ResumableSampler(dataset, info.world_size, info.rank, shuffle=True,
                                   seed=args["seed"])
        iters_per_epoch = sampler.num_samples // args["batch_size"]
        steps_per_epoch = iters_per_epoch // args["accum_iter"]
        if steps_per_epoch < 1:
            raise DataError(
                f"{len(dataset)} images under {dataset.root} give {sampler.num_samples} per "
                f"process, fewer than batch_size x accum_iter = "
                f"{args['batch_size'] * args['accum_iter']}")
        total_steps = steps_per_epoch * args["epochs"]
        warmup_steps = int(round(args["warmup_epochs"] * steps_per_epoch))

        model = build_pretrain_model(args)
        resume_path = find_resume(args)
        ckpt = None
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            check_resume_compatible(ckpt, args, resume_path)
            load_training_state(ckpt, model, resume_path)
        model.to(device)
        optimizer = build_optimizer(model, args, device)
        scaler = torch.amp.GradScaler(device.type, enabled=args["amp"] == "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args["amp"])

        start_epoch, start_iter, step = 0, 0, 0
        meter_init = None
        rng_restore = None
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, start_iter = ckpt["epoch"], ckpt.get("iter_in_epoch", 0)
            step = ckpt["step"]
            old = ckpt["args"]
            changed = [k for k in LAYOUT_ARGS if old.get(k) != args.get(k)]
            changed += ["steps_per_epoch"] if ckpt.get("steps_per_epoch") != steps_per_epoch else []
            if changed and start_iter:
                raise ResumeError(
                    f"cannot resume {resume_path} in the middle of epoch {start_epoch}: "
                    f"{', '.join(changed)} differ from the interrupted run")
            if changed:
                step = start_epoch * steps_per_epoch
                print(f"note: {', '.join(changed)} changed; resuming at the start of epoch "
                      f"{start_epoch} (step {step})", file=sys.stderr)
            else:
                meter_init = ckpt.get("epoch_meter")
                states = ckpt.get("rng") or []
                if len(states) == info.world_size:
                    rng_restore = states[info.rank]
            now = _plain(args)
            notes = sorted(k for k in old if k not in ARCH_ARGS + LAYOUT_ARGS and k in now
                           and old[k] != now[k] and k not in ("resume", "auto_resume", "max_steps"))
            if info.is_main:
                print(f"resuming from {resume_path}: epoch {start_epoch}, step {step}"
                      + (f"; settings now different: {', '.join(notes)}" if notes else ""))
            del ckpt
        if info.is_main:  # log.txt then holds the epochs of the checkpoint resumed, if any
            dropped = trim_log(out_dir / "log.txt", start_epoch)
            if dropped:
                print(f"note: dropped {dropped} line(s) of log.txt of epochs >= {start_epoch} "
                      f"(written after the last checkpoint, or by an earlier run)",
                      file=sys.stderr)
    except Exception as e:
        setup_error = e
    raise_if_any_failed(setup_error, info)

    raw_model = model
    ddp_model: torch.nn.Module = model
    if info.world_size > 1:
        with warnings.catch_warnings():  # torch 2.14 deprecates it; its successor differs
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            ddp_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
    fwd_model = torch.compile(ddp_model) if args.get("compile") else ddp_model

    loader = DataLoader(
        dataset, batch_size=args["batch_size"], sampler=sampler, drop_last=True,
        num_workers=args["num_workers"], pin_memory=device.type == "cuda" and not gpu_decode,
        persistent_workers=args["num_workers"] > 0,
        collate_fn=collate_encoded if gpu_decode else None,
        generator=torch.Generator().manual_seed(args["seed"]))
    decoder = GPUDecoder(device, args["input_size"]) if gpu_decode else None

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"pretraining {args['model']} (pyramid {args['pyramid']}, mfm {args['mfm']}) on "
              f"{len(dataset)} images from {dataset.root}; {n_train / 1e6:.2f}M trainable params; "
              f"effective batch {args['eff_batch_size']}, lr {args['lr']:.3e}, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps; device {device}, "
              f"amp {args['amp']}, world size {info.world_size}", flush=True)

    vis_batch = None
    if info.is_main and args.get("vis_images", 0) > 0:
        vis_batch = dataset.fixed_batch(args["vis_images"])

    max_steps = args.get("max_steps")
    end_step = min(total_steps, max_steps) if max_steps else total_steps
    logger = Logger(args, info, total=end_step, initial=min(step, end_step))
    history: List[Dict[str, float]] = []
    grid = (args["input_size"] // 16,) * 2
    num_tokens = grid[0] * grid[1]
    accum = args["accum_iter"]
    max_bad = args.get("max_bad_fraction", 0.01) * sampler.num_samples
    last_ckpt: Optional[Path] = resume_path  # the last good checkpoint of this run

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def save(epoch: int, iter_in_epoch: int, meter: Dict[str, Any], names: List[str]) -> None:
        nonlocal last_ckpt
        states = gather_rng_states(rng_state(mask_gen, device), info)
        error = None
        if info.is_main:
            try:
                obj = checkpoint_dict(epoch, iter_in_epoch, meter, states)
                for name in names:
                    save_checkpoint(obj, out_dir / name)
            except Exception as e:  # a full disk: stop every rank, the last good file stays
                error = e
        raise_if_any_failed(error, info)
        last_ckpt = out_dir / LAST

    def checkpoint_dict(epoch: int, iter_in_epoch: int, meter: Dict[str, Any],
                        states: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            **model_metadata(args["model"], raw_model.encoder.model_overrides),
            **D2_LOAD_FLAGS,  # stock Detectron2 loads "model" into backbone.net
            "model": raw_model.encoder.state_dict(),
            "decoder": raw_model.decoder.state_dict(),
            "mfm_heads": raw_model.mfm_heads.state_dict(),
            "teacher": raw_model.teacher_state(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch, "iter_in_epoch": iter_in_epoch, "step": step,
            "steps_per_epoch": steps_per_epoch,
            "args": _plain({k: v for k, v in args.items()}),
            "rng": states,
            "epoch_meter": meter,
        }

    def check_finite(values: torch.Tensor, steps: List[int], epoch: int) -> None:
        bad = ~torch.isfinite(values).all(dim=1)
        if bool(bad.any()):
            first = steps[int(bad.nonzero()[0, 0])]
            kept = (f"the last good checkpoint {last_ckpt} was kept" if last_ckpt is not None
                    else "no checkpoint of this run had been written yet")
            raise TrainingDiverged(
                f"non-finite loss at step {first} (epoch {epoch}); stopping ({kept}). "
                f"Try a lower --blr, --clip_grad, or --amp bf16 instead of fp16.")

    if rng_restore is not None:
        set_rng_state(rng_restore, mask_gen, device)

    stop = step >= end_step
    epoch = start_epoch
    t_start = time.time()
    steps_done_here = 0
    for epoch in range(start_epoch, args["epochs"]):
        if stop:
            break
        skip_iters = start_iter if epoch == start_epoch else 0
        sampler.set_epoch(epoch, skip=skip_iters * args["batch_size"])
        fwd_model.train()
        sums = torch.zeros(3, device=device)  # loss, mim, mfm summed over steps
        count, epoch_bad = 0, 0
        bad_error: Optional[DataError] = None
        if meter_init is not None and epoch == start_epoch and skip_iters:
            sums += torch.tensor(meter_init["sums"], device=device)
            count, epoch_bad = meter_init["count"], meter_init["bad"]
        # Per-step [loss, mim, mfm] on the device since the last log point (synced there only).
        pending: List[torch.Tensor] = []
        pending_steps: List[int] = []
        pending_lrs: List[float] = []
        step_acc = torch.zeros(3, device=device)
        t_log, n_log = time.time(), 0
        t_epoch, n_epoch = time.time(), 0
        it = iter(loader)
        for i in range(skip_iters, steps_per_epoch * accum):
            images, bad = next(it)
            epoch_bad += int(bad.sum())
            if epoch_bad > max_bad and bad_error is None:
                bad_error = DataError(
                    f"{epoch_bad} unreadable images in epoch {epoch}, more than "
                    f"--max_bad_fraction {args.get('max_bad_fraction', 0.01)} of "
                    f"{sampler.num_samples}; check the data under {dataset.root}")
                if info.world_size == 1:
                    raise bad_error
                # Several processes: all stop together at the next log point (one message).
            images = normalize(decoder(images) if decoder is not None
                               else images.to(device, non_blocking=True))
            masks = random_masking(images.shape[0], num_tokens, args["mask_ratio"], mask_gen,
                                   device)
            last_micro = (i + 1) % accum == 0
            sync = (contextlib.nullcontext() if last_micro or info.world_size == 1
                    else ddp_model.no_sync())
            with sync:
                with autocast():
                    out = fwd_model(images, masks)
                scaler.scale(out.loss / accum).backward()
            step_acc += torch.stack([out.loss.detach(), out.mim, out.mfm]) / accum
            if not last_micro:
                continue

            lr = lr_at(step, args["lr"], args["min_lr"], warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if args.get("clip_grad"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], args["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if isinstance(raw_model.teacher, EMATeacher):
                raw_model.teacher.update(
                    raw_model.encoder.backbone,
                    ema_momentum(step, total_steps, args["ema_momentum"]))
            step += 1
            steps_done_here += 1
            sums += step_acc
            count += 1
            pending.append(step_acc)
            pending_steps.append(step)
            pending_lrs.append(lr)
            step_acc = torch.zeros(3, device=device)
            n_log += images.shape[0] * accum * info.world_size
            n_epoch += images.shape[0] * accum * info.world_size
            stop = step >= end_step

            if len(pending) >= args["log_every"] or stop or i + 1 == steps_per_epoch * accum:
                if info.world_size > 1:
                    raise_if_any_failed(bad_error, info)
                values = all_reduce_mean(torch.stack(pending), info).cpu()  # one host sync
                check_finite(values, pending_steps, epoch)
                now = time.time()
                img_s = n_log / max(now - t_log, 1e-9)
                eta = (now - t_start) / max(steps_done_here, 1) * (end_step - step)
                for s, lr_s, row in zip(pending_steps, pending_lrs, values.tolist()):
                    history.append({"step": s, "epoch": epoch, "loss": row[0], "mim": row[1],
                                    "mfm": row[2], "lr": lr_s})
                last = history[-1]
                logger.step({"loss": last["loss"], "mim": last["mim"], "mfm": last["mfm"],
                             "lr": last["lr"], "img_per_s": img_s}, step, epoch, eta,
                            len(pending))
                pending, pending_steps, pending_lrs = [], [], []
                t_log, n_log = now, 0
            if stop:
                break
        del it

        epoch_done = not stop or i + 1 == steps_per_epoch * accum
        totals = all_reduce_mean(sums, info).cpu().tolist()
        # Rank-averaged sums: each rank resumes from the mean, so the epoch mean stays exact.
        meter = {"sums": totals, "count": count, "bad": epoch_bad}
        if epoch_done:
            n = max(count, 1)
            logger.epoch({
                "epoch": epoch, "step": step, "train_loss": totals[0] / n,
                "train_mim": totals[1] / n, "train_mfm": totals[2] / n,
                "lr": optimizer.param_groups[0]["lr"], "unreadable_images": epoch_bad,
                "img_per_s": n_epoch / max(time.time() - t_epoch, 1e-9),
                "time_s": time.time() - t_epoch,
            })
            if vis_batch is not None:
                write_reconstruction(raw_model, vis_batch, args, device, autocast,
                                     out_dir / "reconstruction" / f"epoch_{epoch:04d}.png")
            last_epoch = epoch + 1 == args["epochs"]
            names = []
            if (epoch + 1) % args["save_every"] == 0 or last_epoch or stop:
                names.append(LAST)
            if args.get("keep_every") and (epoch + 1) % args["keep_every"] == 0:
                names.append(f"checkpoint-{epoch}.pth")
            if names:
                save(epoch + 1, 0, {"sums": [0.0] * 3, "count": 0, "bad": 0}, names)
        else:  # stopped by --max_steps in the middle of the epoch
            if vis_batch is not None:
                write_reconstruction(raw_model, vis_batch, args, device, autocast,
                                     out_dir / "reconstruction" / f"step_{step:07d}.png")
            save(epoch, i + 1, meter, [LAST])
        start_iter = 0

    logger.close()
    if info.is_main:
        print(f"done: step {step} of {total_steps}; checkpoint {last_ckpt}", flush=True)
        if decoder is not None:
            print(f"--decode gpu: {decoder.cpu_fallbacks} of {decoder.images} images were "
                  f"decoded on the CPU (CMYK / grayscale JPEGs, other formats)", flush=True)
    return TrainResult(model=raw_model, step=step, epoch=epoch, history=history,
                       checkpoint=last_ckpt)


def write_reconstruction(model: PretrainModel, images: torch.Tensor, args: Dict[str, Any],
                         device: torch.device, autocast, path: Path) -> None:
    was_training = model.training
    model.eval()
    with autocast():
        grid = reconstruction_grid(model, images.to(device), args["mask_ratio"], seed=0)
    model.train(was_training)
    save_image(grid, path)


__all__ = ["train", "TrainResult", "ResumeError", "TrainingDiverged", "PeerStopped", "trim_log",
           "lr_at", "param_groups", "init_distributed", "LAST"]

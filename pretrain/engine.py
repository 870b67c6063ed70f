"""Training loop: AMP, gradient accumulation, DDP, progress at log points and epoch ends.

:func:`train` is :func:`setup` (settings, data, model, optimizer, resumed state), then
:func:`train_one_epoch` per epoch, each a sequence of :func:`train_step` (one optimizer step;
``tools/benchmark.py`` times this same function), then :func:`end_epoch` (``log.txt``,
reconstruction grid, :func:`~pretrain.checkpointing.save_training_state`). Derived settings,
schedules, checkpoints, the process group and logs are in :mod:`pretrain.config`,
:mod:`pretrain.optim`, :mod:`pretrain.checkpointing`, :mod:`pretrain.distributed` and
:mod:`pretrain.logs` (``__all__`` re-exports the names imported from here before the split).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from itpn_d2.checkpoint import load_checkpoint
from itpn_d2.errors import UserError

from .checkpointing import (LAST, ResumeError, ResumeState, _checkpoint_names,
                            _prepare_output_dir, _seed_everything, check_resume_compatible,
                            find_resume, load_training_state, restore_training_state,
                            save_training_state, set_rng_state)
from .config import PretrainConfig, resolve_config
from .data import DataError, ResumableSampler, build_dataset, normalize
from .distributed import (DistInfo, PeerStopped, all_reduce_mean, init_distributed,
                          raise_if_any_failed)
from .gpu_data import GPUDecoder, build_encoded_dataset, collate_encoded
from .logs import EpochMeter, Logger, setup_logging, trim_log
from .models import (PATCH_SIZE, EMATeacher, PretrainModel, build_pretrain_model, ema_momentum,
                     random_masking)
from .optim import Schedule, build_optimizer, build_schedule, lr_at, param_groups
from .visualize import reconstruction_grid, save_image

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` returns (used by tests and scripts)."""

    model: PretrainModel  # unwrapped, on its device
    step: int
    epoch: int
    history: List[Dict[str, float]] = field(default_factory=list)  # one entry per logged step
    checkpoint: Optional[Path] = None


# --------------------------------------------------------------------------- setup


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
        dataset = (build_encoded_dataset(config.data_path, config.input_size)
                   if config.decode == "gpu" else
                   build_dataset(config.data_path, config.input_size, config.cache_images))
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
        log.info(f"pretraining {config.model} (pyramid {'on' if config.pyramid else 'off'}, "
                 f"mfm {config.mfm}) on {len(trainer.dataset)} images from {trainer.dataset.root}; "
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
           "param_groups", "init_distributed", "LAST", "DistInfo", "build_optimizer",
           "build_schedule", "setup_logging"]

"""Pretraining settings: one typed record built from the command line of ``pretrain/main.py``.

Field names are the flags' (MAE's names: ``blr``, ``accum_iter``, ``warmup_epochs`` ...); the
flags' ranges are checked where they are parsed (``pretrain/main.py``). ``world_size`` and
``eff_batch_size`` are derived by :func:`resolve_config`, which also fills the
``None`` defaults that depend on the device or the data (``input_size``, ``lr``, ``amp``,
``num_workers``). Checkpoints store :meth:`PretrainConfig.to_dict` (plain values, loadable with
``weights_only``) under ``args``; :meth:`PretrainConfig.from_dict` reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from itpn_d2.checkpoint import _plain

from .distributed import DistInfo
from .flags import SettingsError
from .gpu_data import check_decode_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_INPUT_SIZE = 224
TOY_INPUT_SIZE = 128  # the toy images' native size


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (see ``python pretrain/main.py --help``)."""

    # model
    model: str = "itpn_base"
    input_size: Optional[int] = None
    drop_path: float = 0.0
    rpe: bool = False
    fpn_depth: int = 2
    layer_scale_init: Optional[float] = None
    pyramid: str = "on"  # "on" / "off" as on the command line (checkpoints compare it)
    decoder_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_heads: Optional[int] = None
    # masked image / feature modeling
    mask_ratio: float = 0.75
    mfm: str = "ema"
    mfm_weight: float = 1.0
    mfm_loss: str = "smooth_l1"
    mfm_dim: Optional[int] = None
    ema_momentum: float = 0.996
    teacher: str = "ViT-B-16"
    teacher_checkpoint: Optional[str] = None
    # optimisation
    batch_size: int = 64
    accum_iter: int = 1
    epochs: int = 1600
    warmup_epochs: float = 40
    blr: float = 1.5e-4
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    opt_betas: Tuple[float, float] = (0.9, 0.95)
    clip_grad: Optional[float] = None
    amp: Optional[str] = None
    compile: bool = False
    # data
    data_path: Optional[str] = None
    num_workers: Optional[int] = None
    decode: str = "cpu"
    max_bad_fraction: float = 0.01
    # run
    output_dir: str = "output/pretrain"
    log_dir: Optional[str] = None
    device: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    auto_resume: bool = False
    overwrite: bool = False
    save_every: int = 1
    keep_every: int = 0
    log_every: int = 20
    vis_images: int = 8
    max_steps: Optional[int] = None
    # derived (resolve_config)
    world_size: int = 1
    eff_batch_size: Optional[int] = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace,
                       ignore: Tuple[str, ...] = ("debug",)) -> "PretrainConfig":
        """From the parsed flags; a flag without a field is a ``TypeError`` (every flag must
        reach the engine)."""
        values = {k: v for k, v in vars(args).items() if k not in ignore}
        if "opt_betas" in values:
            values["opt_betas"] = tuple(values["opt_betas"])
        return cls(**values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PretrainConfig":
        """From a checkpoint's ``args`` (or a partial mapping): unknown keys are ignored,
        missing ones take their defaults, so checkpoints of other versions still read."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        if "opt_betas" in known:
            known["opt_betas"] = tuple(known["opt_betas"])
        return cls(**known)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values in field order (tuples become lists): a checkpoint's ``args``."""
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def replace(self, **changes: Any) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def use_pyramid(self) -> bool:
        return self.pyramid == "on"

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """Autocast dtype, ``None`` for ``--amp off`` (or not yet resolved)."""
        return AMP_DTYPES.get(self.amp or "off")


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


__all__ = ["PretrainConfig", "AMP_DTYPES", "resolve_config"]

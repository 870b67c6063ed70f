"""Pretraining settings: the one definition of every flag of ``pretrain/main.py``.

Each field of :class:`PretrainConfig` holds a flag's name (MAE's names: ``blr``, ``accum_iter``,
``warmup_epochs`` ...), default, help and range; :func:`build_parser` makes the command line
from them and :func:`validate` checks a config, parsed or built in code, in one place (ranges
with the same checks as the parser, then the settings that involve several flags).
``world_size`` and ``eff_batch_size`` are derived by :func:`resolve_config`, which also fills the
``None`` defaults that depend on the device or the data (``input_size``, ``lr``, ``amp``,
``num_workers``). Checkpoints store :meth:`PretrainConfig.to_dict` (plain values, loadable with
``weights_only``) under ``args``; :meth:`PretrainConfig.from_dict` reads it back, also from
checkpoints written before ``pyramid`` became a bool (``"on"`` / ``"off"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from itpn_d2.checkpoint import _plain
from itpn_d2.errors import DEBUG_ENV
from itpn_d2.modeling.itpn import DECODER_SIZES

from .distributed import DistInfo
from .flags import FlagParser, SettingsError, device_type, number_type, on_off
from .gpu_data import DECODE_CHOICES, check_decode_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_INPUT_SIZE = 224
TOY_INPUT_SIZE = 128  # the toy images' native size
MFM_MODES = ("ema", "clip", "none")
MFM_LOSSES = ("smooth_l1", "cosine")


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens left visible by ``mask_ratio``; ``ValueError`` unless at least one is visible
    and one masked."""
    keep = int(num_tokens * (1 - mask_ratio))
    if not 0 < keep < num_tokens:
        raise ValueError(f"mask_ratio {mask_ratio} leaves {keep} of {num_tokens} tokens visible; "
                         f"need at least one visible and one masked token")
    return keep


def setting(default: Any, help: str, group: str, **flag: Any) -> Any:
    """A dataclass field that is also a flag of ``pretrain/main.py``: its default, help and
    argparse keywords (``type=`` checks ranges, see :func:`pretrain.flags.number_type`)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group,
                                                        "flag": flag})


POSITIVE_INT = number_type(int, 1)
COUNT = number_type(int, 0)  # >= 0
FRACTION = number_type(float, 0, 1)  # [0, 1)
POSITIVE = number_type(float, 0, low_open=True)
NON_NEGATIVE = number_type(float, 0)
MODEL, MIM, OPTIM, DATA, RUN = ("model", "masked image / feature modeling", "optimisation",
                                "data", "run")


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run: each field is a flag of ``pretrain/main.py``, with
    its default, help and range (see ``--help``), except the derived ones at the end."""

    model: str = setting("itpn_base", "iTPN size", MODEL, choices=sorted(DECODER_SIZES))
    input_size: Optional[int] = setting(
        None, "image side, a multiple of 16 (default: 224; 128 on the toy dataset, whose images "
              "are 128 px)", MODEL, type=number_type(int, 16, multiple_of=16))
    drop_path: float = setting(0.0, "stochastic depth rate", MODEL, type=FRACTION)
    rpe: bool = setting(False, "relative position bias in the attention blocks", MODEL,
                        action=argparse.BooleanOptionalAction)
    fpn_depth: int = setting(2, "MLP blocks after each top-down fusion of the pyramid", MODEL,
                             type=POSITIVE_INT)
    layer_scale_init: Optional[float] = setting(
        None, "initial layer-scale value (default: no layer scale)", MODEL, type=POSITIVE)
    pyramid: bool = setting(
        True, "'off': the HiViT + MAE baseline without pyramid (needs --mfm none); its "
              "checkpoint then holds a backbone only (default: on)", MODEL, type=on_off,
        metavar="{on,off}")
    decoder_dim: Optional[int] = setting(
        None, "pixel decoder width (default per model: nano 128, tiny 256, else 512)", MODEL,
        type=POSITIVE_INT)
    decoder_depth: Optional[int] = setting(
        None, "pixel decoder blocks (default per model: nano 2, tiny 4, else 8)", MODEL,
        type=POSITIVE_INT)
    decoder_heads: Optional[int] = setting(
        None, "pixel decoder heads (default per model: nano 4, tiny 8, else 16)", MODEL,
        type=POSITIVE_INT)
    # masked image / feature modeling
    mask_ratio: float = setting(0.75, "fraction of 16x16 tokens masked (dropped from the "
                                      "encoder)", MIM,
                                type=number_type(float, 0, 1, low_open=True))
    norm_pix_loss: bool = setting(
        True, "MIM target: each 16x16 patch normalised to zero mean and unit variance (MAE's "
              "norm_pix_loss, better features); 'off': the pixels themselves, whose "
              "reconstructions can be viewed as they are (default: on)", MIM, type=on_off,
        metavar="{on,off}")
    mfm: str = setting("ema", "teacher of masked feature modeling: 'ema' momentum copy of the "
                              "backbone, 'clip' frozen open_clip image encoder, 'none' pixels "
                              "only", MIM, choices=MFM_MODES)
    mfm_weight: float = setting(1.0, "total loss = MIM + mfm_weight x mean over levels of MFM",
                                MIM, type=NON_NEGATIVE)
    mfm_loss: str = setting("smooth_l1", "MFM loss on layer-normalised teacher features", MIM,
                            choices=MFM_LOSSES)
    mfm_dim: Optional[int] = setting(None, "MFM head width (default per model: nano 128, else "
                                           "256)", MIM, type=POSITIVE_INT)
    ema_momentum: float = setting(0.996, "EMA teacher momentum at step 0, cosine-scheduled to "
                                         "1.0", MIM, type=FRACTION)
    teacher: str = setting("ViT-B-16", "open_clip model name of the CLIP teacher (--mfm clip)",
                           MIM)
    teacher_checkpoint: Optional[str] = setting(
        None, "local file with the CLIP teacher's weights (whole CLIP model or its image "
              "tower); required by --mfm clip, never downloaded (default: none)", MIM)
    # optimisation
    batch_size: int = setting(64, "images per process per iteration; effective batch = "
                                  "batch_size x accum_iter x world size", OPTIM,
                              type=POSITIVE_INT)
    accum_iter: int = setting(1, "gradient accumulation iterations", OPTIM, type=POSITIVE_INT)
    epochs: int = setting(1600, "training epochs (sets the LR and EMA schedules)", OPTIM,
                          type=POSITIVE_INT)
    warmup_epochs: float = setting(40, "linear warm-up (epochs)", OPTIM, type=NON_NEGATIVE)
    blr: float = setting(1.5e-4, "base learning rate: lr = blr x effective batch / 256", OPTIM,
                         type=POSITIVE)
    lr: Optional[float] = setting(None, "absolute learning rate (default: derived from --blr)",
                                  OPTIM, type=POSITIVE)
    min_lr: float = setting(0.0, "end of the cosine schedule", OPTIM, type=NON_NEGATIVE)
    weight_decay: float = setting(0.05, "AdamW weight decay (not on norms, biases, positions, "
                                        "layer scale)", OPTIM, type=NON_NEGATIVE)
    opt_betas: Tuple[float, float] = setting((0.9, 0.95), "AdamW betas", OPTIM, type=FRACTION,
                                             nargs=2, metavar=("B1", "B2"))
    clip_grad: Optional[float] = setting(None, "max gradient norm (default: no clipping)", OPTIM,
                                         type=POSITIVE)
    amp: Optional[str] = setting(None, "autocast precision (default: bf16 on GPU, off on CPU); "
                                       "fp16 uses a gradient scaler", OPTIM,
                                 choices=("bf16", "fp16", "off"))
    compile: bool = setting(False, "torch.compile the model", OPTIM, action="store_true")
    # data
    data_path: Optional[str] = setting(
        None, "ImageFolder tree (its train/ subfolder if present) or flat folder of images; "
              "default: the toy dataset (written on first use)", DATA)
    num_workers: Optional[int] = setting(
        None, "data loading processes per training process (default: 0 on the CPU, where "
              "decoding in the training process costs less than competing for the cores; "
              "min(8, CPU cores / processes per node) on GPU)", DATA, type=COUNT)
    decode: str = setting(
        "cpu", "where JPEGs are decoded and cropped: 'cpu' in the loader workers (PIL), 'gpu' "
               "in the training process with nvjpeg (needs CUDA; workers only read file bytes; "
               "other files fall back to PIL)", DATA, choices=DECODE_CHOICES)
    max_bad_fraction: float = setting(
        0.01, "stop when more than this fraction of an epoch's images are unreadable (each one "
              "is skipped with a warning)", DATA,
        type=number_type(float, 0, 1, high_open=False))
    cache_images: bool = setting(
        False, "keep each image decoded in memory after its first read (each loader process "
               "holds its own copy: for small pools such as the toy one, 4096 images = 200 MB, "
               "not ImageNet)", DATA, action="store_true")
    # run
    output_dir: str = setting("output/pretrain", "checkpoints, log.txt, reconstruction grids",
                              RUN)
    log_dir: Optional[str] = setting(None, "TensorBoard folder parent (default: output_dir)",
                                     RUN)
    device: Optional[str] = setting(None, "cuda or cpu (default: cuda if available; torchrun: "
                                          "cuda:LOCAL_RANK)", RUN, type=device_type)
    seed: int = setting(0, "seed of initialisation, data order, augmentation and masking (rank "
                           "r uses seed + r for its own random streams)", RUN,
                        type=number_type(int, 0, 2 ** 31))
    resume: Optional[str] = setting(None, "checkpoint to continue from (default: none, or see "
                                          "--auto_resume)", RUN)
    auto_resume: bool = setting(False, "continue from output_dir/checkpoint-last.pth if it "
                                       "exists", RUN, action="store_true")
    overwrite: bool = setting(False, "start a new run in an output_dir that holds one (its "
                                     "checkpoint-last.pth is replaced)", RUN, action="store_true")
    save_every: int = setting(1, "write checkpoint-last.pth every N epochs (and always at the "
                                 "end)", RUN, type=POSITIVE_INT)
    keep_every: int = setting(0, "also keep checkpoint-EPOCH.pth every N epochs (0: never)", RUN,
                              type=COUNT)
    log_every: int = setting(20, "steps between log points (loss sync, TensorBoard, progress)",
                             RUN, type=POSITIVE_INT)
    vis_images: int = setting(8, "images in the reconstruction grid written each epoch (0: "
                                 "none)", RUN, type=COUNT)
    max_steps: Optional[int] = setting(
        None, "stop after this many optimizer steps (>= 1) in all, counted from the start of "
              "training, and save a checkpoint (default: run all epochs)", RUN,
        type=POSITIVE_INT)
    # derived (resolve_config)
    world_size: int = 1
    eff_batch_size: Optional[int] = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace,
                       ignore: Tuple[str, ...] = ("debug",)) -> "PretrainConfig":
        """From the parsed flags; a flag without a field is a ``TypeError`` (every flag must
        reach the engine)."""
        values = {k: v for k, v in vars(args).items() if k not in ignore}
        return cls(**_typed(values))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PretrainConfig":
        """From a checkpoint's ``args`` (or a partial mapping): unknown keys are ignored,
        missing ones take their defaults, so checkpoints of other versions still read."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**_typed({k: v for k, v in values.items() if k in names}))

    def to_dict(self) -> Dict[str, Any]:
        """Plain values in field order (tuples become lists): a checkpoint's ``args``."""
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def replace(self, **changes: Any) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """Autocast dtype, ``None`` for ``--amp off`` (or not yet resolved)."""
        return AMP_DTYPES.get(self.amp or "off")


def _typed(values: Dict[str, Any]) -> Dict[str, Any]:
    """Checkpoint / namespace values as the fields' types (lists -> tuples, "on"/"off")."""
    if "opt_betas" in values:
        values["opt_betas"] = tuple(values["opt_betas"])
    if isinstance(values.get("pyramid"), str):  # checkpoints written before it was a bool
        values["pyramid"] = on_off(values["pyramid"])
    return values


def _flag_fields():
    return [f for f in dataclasses.fields(PretrainConfig) if "flag" in f.metadata]


def build_parser() -> FlagParser:
    """The command line of ``pretrain/main.py``: one flag per field of :class:`PretrainConfig`
    (plus ``--debug``), grouped as in the dataclass."""
    p = FlagParser("iTPN pretraining", description=(
        "Train HiViT + the integral pyramid by masked image modeling (pixels) and masked "
        "feature modeling (every pyramid level predicts teacher features)."))
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in _flag_fields():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"],
                                   **f.metadata["flag"])
    groups[RUN].add_argument("--debug", action="store_true", help=(
        f"show the traceback of expected errors too (same as {DEBUG_ENV}=1)"))
    return p


def validate(config: PretrainConfig, given: Tuple[str, ...] = ()) -> None:
    """Every check of a pretraining config, on the command line or in code: each value's range
    (the parser's own checks) and the settings that involve several flags. ``given``: the
    flags written on the command line (the warm-up check only concerns a written one)."""
    for f in _flag_fields():
        check, value = f.metadata["flag"].get("type"), getattr(config, f.name)
        if getattr(check, "checks_range", False) and value is not None:
            for v in (value if isinstance(value, tuple) else (value,)):
                try:
                    check(str(v))
                except argparse.ArgumentTypeError as e:
                    raise SettingsError(f"--{f.name}: {e}") from None
        choices = f.metadata["flag"].get("choices")
        if choices is not None and value is not None and value not in choices:
            raise SettingsError(f"--{f.name}: invalid choice {value!r} (choose from "
                                f"{', '.join(map(str, choices))})")
    c = config
    if "warmup_epochs" in given and c.warmup_epochs > c.epochs:
        raise SettingsError(f"--warmup_epochs {c.warmup_epochs:g} is longer than --epochs "
                            f"{c.epochs}: the learning rate would never reach its peak; use "
                            f"--warmup_epochs <= --epochs")
    if c.lr is not None and c.min_lr > c.lr:
        raise SettingsError(f"--min_lr {c.min_lr:g} is above --lr {c.lr:g}")
    if c.input_size is not None:
        try:
            num_visible((c.input_size // 16) ** 2, c.mask_ratio)
        except ValueError as e:
            raise SettingsError(f"--input_size {c.input_size} with --mask_ratio "
                                f"{c.mask_ratio:g}: {e}; use a larger --input_size") from None
    if c.mfm != "clip" and c.teacher_checkpoint is not None:
        raise SettingsError(f"--teacher_checkpoint is only read by --mfm clip (now --mfm "
                            f"{c.mfm}); drop it or add --mfm clip")
    if not c.pyramid and c.mfm != "none":
        raise SettingsError(f"--mfm {c.mfm} supervises the pyramid levels, but --pyramid off "
                            f"trains without pyramid (the HiViT + MAE baseline): use --mfm none")
    if c.cache_images and c.decode == "gpu":
        raise SettingsError("--cache_images keeps CPU-decoded images; --decode gpu decodes on "
                            "the GPU each time: drop one of them")
    if os.path.exists(c.output_dir) and not os.path.isdir(c.output_dir):
        raise SettingsError(f"--output_dir {c.output_dir} is a file, not a folder")


def resolve_config(config: PretrainConfig, info: DistInfo,
                   device: torch.device) -> PretrainConfig:
    """Fill derived settings (effective batch, absolute lr, AMP, workers) after
    :func:`validate`."""
    input_size = config.input_size
    if input_size is None:
        input_size = TOY_INPUT_SIZE if config.data_path is None else DEFAULT_INPUT_SIZE
    validate(config.replace(input_size=input_size))
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


__all__ = ["AMP_DTYPES", "MFM_LOSSES", "MFM_MODES", "PretrainConfig", "build_parser",
           "num_visible", "resolve_config", "validate"]

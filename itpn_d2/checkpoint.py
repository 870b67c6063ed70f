"""Reading and writing checkpoints: safe loading, atomic saving, metadata to rebuild the model.

Every checkpoint this project writes holds ``model`` (the exact state dict of
``build_itpn(model_name, **model_overrides)``) and the metadata below, stored as plain types.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import DiskFullError, UserError, disk_full_message

FORMAT_VERSION = 1
# The command that converts published checkpoints (tools/convert_official_checkpoint.py in a
# checkout); error messages name the entry point, which an installed package has.
CONVERT_COMMAND = "itpn-convert-checkpoint"
# ImageNet statistics on the 0-255 scale (Detectron2's convention), RGB order: the one home of
# these numbers (pretraining divides them by 255). Detectron2's yacs defaults hold the same
# numbers in BGR order (cfg.MODEL.PIXEL_MEAN); this module must not import detectron2, and the
# recipes are RGB, so the recipes read them from here.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
METADATA_KEYS = ("model_name", "model_overrides", "pixel_mean", "pixel_std", "channel_order",
                 "format_version")

# Written into every file that holds an ITPN state dict: Detectron2's DetectionCheckpointer
# then matches ``model`` keys by suffix (``backbone.x`` -> ``backbone.net.backbone.x``), so a
# stock ``DetectionCheckpointer(model).load(path)`` fills the detector's backbone and pyramid
# while ``checkpoint["model"]`` stays the plain ITPN state dict that timm and our loaders read.
D2_LOAD_FLAGS = {"matching_heuristics": True}

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError, ValueError):
    """A file that is not a usable checkpoint, or weights that do not fit the model."""


def model_metadata(model_name: str, model_overrides: Mapping[str, Any],
                   pixel_mean: Sequence[float] = IMAGENET_MEAN,
                   pixel_std: Sequence[float] = IMAGENET_STD,
                   channel_order: str = "RGB") -> Dict[str, Any]:
    """Metadata every checkpoint carries; pixel statistics are on the 0-255 scale."""
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return {
        "model_name": model_name,
        "model_overrides": _plain(dict(model_overrides)),
        "pixel_mean": [float(v) for v in pixel_mean],
        "pixel_std": [float(v) for v in pixel_std],
        "channel_order": channel_order,
        "format_version": FORMAT_VERSION,
    }


def _plain(value: Any) -> Any:
    """Plain Python containers and scalars only (tuples become lists, Namespaces dicts)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata: {value!r}")


TEMP_SUFFIX = ".tmp"  # save_checkpoint's temporaries: ".<name>.<random>.tmp" beside the target


def save_checkpoint(obj: Dict[str, Any], path: PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    An existing ``path`` is replaced only by a complete file. A full disk raises
    :class:`~itpn_d2.errors.DiskFullError` (the old file stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide it from the group
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        message = disk_full_message(e, str(path)) if isinstance(e, (OSError, RuntimeError)) else None
        if message:
            raise DiskFullError(message) from e
        raise


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def trim_json_lines(path: PathLike, field: str, below: int, atomic: bool = True) -> int:
    """Keep the lines of the JSON-lines file ``path`` whose ``field`` is below ``below``, and
    drop any incomplete line: what a run resumed from a checkpoint at ``below`` will log again.

    ``atomic``: replace the file (a kill leaves the old or the new one); otherwise rewrite it
    in place, for a file that a writer already holds open for appending (Detectron2's
    ``JSONWriter``), whose later lines then follow the kept ones. Returns the lines dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            value = int(json.loads(line)[field])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
        if value < below and line.endswith("\n"):
            keep.append(line)
    if len(keep) == len(lines):
        return 0
    if atomic:
        tmp = path.with_name(f".{path.name}.trim{TEMP_SUFFIX}")  # removed at the next start
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    else:
        with open(path, "r+") as f:
            f.truncate(0)
            f.write("".join(keep))
    return len(lines) - len(keep)


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete temporaries that an interrupted :func:`save_checkpoint` left in ``folder``.

    Call it only where no other process saves into ``folder`` (under :func:`lock_run_dir`).
    Returns the removed paths.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


class OutputDirError(UserError, PermissionError):
    """An output folder that cannot be written (permissions, read-only file system)."""


class RunDirLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held while a run writes into ``folder``.

    The kernel drops it when the process dies, so a crashed run never leaves ``folder`` locked;
    a second run into the same folder gets a :class:`CheckpointError` naming the holder.
    """

    def __init__(self, folder: PathLike):
        import fcntl

        self.path = Path(folder) / ".lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise OutputDirError(f"output folder {folder} is not writable ({e.strerror}); "
                                 f"choose another output folder") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise CheckpointError(
                f"{folder} is in use by another run ({holder}); wait for it to end or choose "
                f"another output folder") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(folder: PathLike) -> RunDirLock:
    """Take :class:`RunDirLock` on ``folder`` (create it if needed)."""
    return RunDirLock(folder)


def _safe_globals() -> list:
    """Types that published iTPN checkpoints pickle besides tensors (their CLI args)."""
    import numpy as np

    allowed = [argparse.Namespace, np.dtype, np.ndarray]
    try:  # numpy >= 1.25 keeps scalar reconstruction in numpy.core / numpy._core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import _reconstruct, scalar
    allowed += [scalar, _reconstruct]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def _not_a_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    """One line naming ``path`` and what it is instead (never torch's ``weights_only`` advice)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        what = "it is empty (0 bytes)"
    elif head == b"PK\x03\x04":  # torch's format is a zip archive with <name>/data.pkl
        if not zipfile.is_zipfile(path):
            what = f"it is a truncated zip archive ({size} bytes)"
        else:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            what = ("its archive is damaged" if any(n.endswith("data.pkl") for n in names)
                    else "it is a zip archive without torch's data.pkl")
    elif head[:1] == b"\x80":
        what = "it is a pickle that is not in torch's format, or a truncated legacy checkpoint"
    else:
        what = "its content is not in any torch format"
    detail = str(error).splitlines()[0].strip() if str(error).strip() else ""
    if "weights_only" in detail or len(detail) > 120:
        detail = ""
    detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return CheckpointError(
        f"{path} is not a PyTorch checkpoint (or not a complete one): {what} ({detail}); an "
        f"interrupted save or copy? Use another checkpoint (e.g. an earlier "
        f"checkpoint-EPOCH.pth) or copy it again")


def load_torch_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` allowing only the types listed above.

    A missing file, a file that is not a (complete) PyTorch checkpoint or one holding other
    objects raise a one-line :class:`CheckpointError` naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes on foreign files
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise _not_a_checkpoint(path, e) from None
        raise CheckpointError(
            f"{path} holds objects this loader will not unpickle ({found.group(1)}; only "
            f"tensors, plain containers, argparse.Namespace and numpy scalars are allowed): "
            f"re-save its tensors as a plain dict, or convert it with "
            f"{CONVERT_COMMAND}") from None
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise _not_a_checkpoint(path, e) from None
    return obj


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with :func:`load_torch_file`.

    Returns a dict; a bare state dict is returned as ``{"model": state_dict}``.
    """
    path = Path(path)
    obj = load_torch_file(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = {"model": obj}
    if not isinstance(obj.get("model"), Mapping):
        raise CheckpointError(f"{path} has no 'model' state dict (keys: {sorted(obj)[:10]})")
    return obj


def state_dict_differences(expected: Mapping[str, torch.Tensor],
                           given: Mapping[str, torch.Tensor]
                           ) -> Tuple[List[str], List[str], List[str]]:
    """Keys of ``expected`` missing from ``given``, keys of ``given`` not in ``expected``, and
    keys in both whose shapes differ (the one strict-loading check of the project)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected
                  if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatched


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     what: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointError` naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing, unexpected, bad = state_dict_differences(expected, state_dict)
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in bad]
    if missing or unexpected or mismatched:
        lines = [f"{what} does not fit the model (another architecture or size?)"]
        for title, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))


def model_from_checkpoint(ckpt: Union[PathLike, Mapping[str, Any]], **extra_overrides: Any
                          ) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild ``build_itpn(model_name, **model_overrides, **extra_overrides)`` and load weights."""
    from .modeling import build_itpn

    if not isinstance(ckpt, Mapping):
        ckpt = load_checkpoint(ckpt)
    if "model_name" not in ckpt:
        raise CheckpointError(
            f"checkpoint has no 'model_name' metadata; convert published checkpoints first "
            f"({CONVERT_COMMAND})")
    overrides = {**ckpt.get("model_overrides", {}), **extra_overrides}
    model = build_itpn(ckpt["model_name"], **overrides)
    check_state_dict(model, ckpt["model"])
    model.load_state_dict(ckpt["model"])
    return model, dict(ckpt)


def metadata_of(ckpt: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The metadata part of a checkpoint dict, or ``None`` if it has none."""
    if "model_name" not in ckpt:
        return None
    return {k: ckpt[k] for k in METADATA_KEYS if k in ckpt}

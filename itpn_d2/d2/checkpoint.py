"""``ITPNCheckpointer``: loads pretraining, exported and published iTPN checkpoints into a detector.

Accepted files (``train.init_checkpoint``, or ``--resume``):

* this project's checkpoints (``pretrain/main.py`` or ``tools/export_backbone.py``): ``model``
  is an ITPN state dict (``backbone.*``, ``pyramid.*``); other entries (``decoder``,
  ``mfm_heads``, ``teacher``, ``optimizer``...) are skipped and listed;
* published iTPN checkpoints, converted on the fly (:mod:`itpn_d2.convert`);
* Detectron2 checkpoints of the detector itself (``last_checkpoint`` when resuming; trainer
  state such as optimizer, scheduler and iteration is then restored by the trainer). One that
  lacks most of the backbone/pyramid tensors (a detector with another backbone) is an error.

A stock ``DetectionCheckpointer`` also loads this project's files (they carry
``matching_heuristics``, see :data:`itpn_d2.checkpoint.D2_LOAD_FLAGS`) but checks nothing.

Saving (``PeriodicCheckpointer``, ``model_final``) goes through
:func:`itpn_d2.checkpoint.save_checkpoint` (temporary file, fsync, rename) and ``last_checkpoint``
is replaced the same way once the checkpoint is complete, so a kill or a full disk never
leaves a truncated file or a ``last_checkpoint`` naming one.

Files are read with ``weights_only=True`` (:func:`itpn_d2.checkpoint.load_checkpoint`). ITPN
weights go to ``<backbone module>.net.``; they must fit exactly: unlike fvcore, mismatched
shapes or missing/unexpected backbone or pyramid keys are an error, not a skipped warning. The
one exception is a checkpoint without any pyramid (e.g. classification fine-tuning), whose
pyramid starts random with a loud warning. One table logs what was loaded, skipped and newly
initialised.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from tabulate import tabulate

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import _IncompatibleKeys
from iopath.common.file_io import PathHandler

from ..checkpoint import (CONVERT_COMMAND, D2_LOAD_FLAGS, METADATA_KEYS, TEMP_SUFFIX,
                          CheckpointError, default_file_mode, load_checkpoint, metadata_of,
                          model_metadata, save_checkpoint, state_dict_differences)
from ..convert import PUBLISHED_HEADS, convert_official_state_dict, is_official_state_dict
from ..modeling import ARCHS, ITPN
from ..modeling.itpn import itpn_arguments
from ..zoo import ZOO_PREFIX, zoo_path
from .optim import find_itpn_backbones

logger = logging.getLogger(__name__)

# Settings that do not change what the weights mean.
_TRAINING_ONLY = ("drop_path_rate", "use_checkpoint", "pyramid")


def resolved_arch(model_name: str, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Every ``ITPN`` argument of ``build_itpn(model_name, **overrides)`` except training ones."""
    full = itpn_arguments(model_name, **overrides)
    if isinstance(full.get("img_size"), (list, tuple)) and len(set(full["img_size"])) == 1:
        full["img_size"] = full["img_size"][0]
    return {k: v for k, v in full.items() if k not in _TRAINING_ONLY}


def check_input_format(model: torch.nn.Module, metadata: Optional[Mapping[str, Any]],
                       source: str = "checkpoint") -> List[str]:
    """Problems between the model's input format / pixel stats and the pretraining metadata.

    Returns a list of messages (empty: consistent, or nothing to compare).
    """
    if not metadata or not hasattr(model, "pixel_mean"):
        return []
    problems = []
    order = metadata.get("channel_order")
    input_format = getattr(model, "input_format", None)
    if order and input_format and order != input_format:
        problems.append(f"{source} was pretrained on {order} input but the model reads "
                        f"{input_format} (set model.input_format={order!r})")
    for key in ("pixel_mean", "pixel_std"):
        if key not in metadata:
            continue
        want = torch.tensor([float(v) for v in metadata[key]])
        have = getattr(model, key).detach().flatten().cpu().float()
        if have.shape != want.shape or not torch.allclose(have, want, atol=1e-3):
            problems.append(f"model.{key}={[round(v, 3) for v in have.tolist()]} but {source} "
                            f"was pretrained with {[round(v, 3) for v in want.tolist()]} "
                            f"(set model.{key}={[float(v) for v in metadata[key]]})")
    return problems


def _count(value: Any) -> Tuple[int, int]:
    """(tensors, elements) in a nested container."""
    if isinstance(value, torch.Tensor):
        return 1, value.numel()
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        counts = [_count(v) for v in value]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return 0, 0


def _group(keys: List[str], depth: int) -> str:
    groups: "OrderedDict[str, int]" = OrderedDict()
    for k in keys:
        g = ".".join(k.split(".")[:depth])
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items())


def _shorten(keys: List[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by a complete file holding ``text`` (temporary file, fsync, rename)."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ITPNCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads iTPN checkpoints into an ``ITPNBackbone``.

    Args:
        model, save_dir, save_to_disk, checkpointables: as for ``DetectionCheckpointer``.
        check_inputs: what to do when the model's ``input_format`` / ``pixel_mean`` /
            ``pixel_std`` differ from the checkpoint's pretraining metadata: ``"error"``,
            ``"warn"`` or ``"ignore"``.
    """

    def __init__(self, model, save_dir: str = "", *, check_inputs: str = "error",
                 save_to_disk: Optional[bool] = None, **checkpointables):
        if check_inputs not in ("error", "warn", "ignore"):
            raise ValueError(f"check_inputs must be 'error', 'warn' or 'ignore', got {check_inputs!r}")
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.check_inputs = check_inputs
        self.last_report: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ writing

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (model, checkpointables, ``kwargs`` to ``<save_dir>/<name>.pth``),
        written atomically; a full disk raises :class:`~itpn_d2.errors.DiskFullError` and
        keeps the earlier checkpoints and ``last_checkpoint``."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # a remote PathManager folder: fvcore's own writer
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        save_checkpoint(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        _write_text_atomic(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ------------------------------------------------------------------ reading

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path.split("?")[0]):
            raise CheckpointError(f"checkpoint file not found: {path}")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):  # Detectron2 / pycls model zoo formats
            return super()._load_file(filename)
        ckpt = load_checkpoint(filename)
        sd = {k[len("module."):] if k.startswith("module.") else k: v
              for k, v in ckpt["model"].items()}
        model_keys = set(self.model.state_dict())
        if any(k in model_keys for k in sd):  # a checkpoint of this detector
            self._check_detector_backbone(filename, sd, model_keys)
            ckpt["model"] = sd
            ckpt["__itpn__"] = {"kind": "detectron2", "path": filename}
            return ckpt

        backbones = find_itpn_backbones(self.model)
        if len(backbones) != 1:
            raise CheckpointError(f"the model has {len(backbones)} ITPN backbones "
                                  f"({list(backbones)}); cannot tell where {filename} goes")
        (prefix, backbone), = backbones.items()
        if is_official_state_dict(sd):
            sd, name, overrides, skipped_keys = convert_official_state_dict(
                sd, num_heads=self._heads_hint(sd, backbone.net))
            kind = "published iTPN checkpoint (converted)"
            metadata = model_metadata(name, overrides)  # published models: ImageNet RGB
            skipped = {f"model: {g}": n for g, n in self._group_counts(skipped_keys).items()}
            skipped.update({k: _count(v)[0] for k, v in ckpt.items() if k != "model"})
        else:
            if not all(k.startswith(("backbone.", "pyramid.")) for k in sd):
                odd = [k for k in sd if not k.startswith(("backbone.", "pyramid."))]
                raise CheckpointError(
                    f"{filename} is neither an iTPN checkpoint (keys backbone.*, pyramid.*), a "
                    f"published iTPN checkpoint nor a checkpoint of this detector; unexpected "
                    f"keys: {_shorten(odd)}")
            metadata = metadata_of(ckpt)
            kind = "iTPN pretraining checkpoint" if "decoder" in ckpt or "mfm_heads" in ckpt \
                else "iTPN checkpoint"
            skipped = {k: _count(v)[0] for k, v in ckpt.items()
                       if k != "model" and k not in METADATA_KEYS and k not in D2_LOAD_FLAGS}
        return {"model": {prefix + k: v for k, v in sd.items()},
                "__itpn__": {"kind": kind, "path": filename, "prefix": prefix,
                             "metadata": metadata, "skipped": skipped,
                             "net": backbone.net}}

    def _check_detector_backbone(self, filename: str, sd: Mapping[str, torch.Tensor],
                                 model_keys: set) -> None:
        """A file that shares keys with this detector but lacks most of its backbone/pyramid
        tensors is a checkpoint of another model (e.g. the same heads on another backbone):
        loading it would start the backbone from random weights with a long list of missing
        keys. Stop instead."""
        prefixes = tuple(find_itpn_backbones(self.model)) if self._has_itpn() else ()
        net_keys = [k for k in model_keys if prefixes and k.startswith(prefixes)]
        found = sum(k in sd for k in net_keys)
        if net_keys and found * 2 < len(net_keys):
            shared = sorted(k for k in sd if k in model_keys)
            raise CheckpointError(
                f"{filename} looks like a Detectron2 checkpoint of a detector (it has keys of "
                f"this model such as {_shorten(shared, 3)}) but holds only {found} of the "
                f"{len(net_keys)} backbone/pyramid tensors ({prefixes[0]}*): it was trained with "
                f"another backbone. Start from an iTPN checkpoint instead (itpn-pretrain, "
                f"itpn-export-backbone or {CONVERT_COMMAND} output), or "
                f"give a model_final.pth of this recipe.")

    @staticmethod
    def _heads_hint(sd: Mapping[str, torch.Tensor], net: ITPN) -> Optional[int]:
        """The config's head count when a published state dict cannot tell (no relative
        position table and a width outside the published architectures)."""
        width = sd["patch_embed.proj.weight"].shape[0] * 4
        if any(k.endswith("relative_position_bias_table") for k in sd) or width in PUBLISHED_HEADS:
            return None
        if not len(net.backbone.blocks):
            return None
        heads = net.backbone.blocks[0].attn.num_heads
        logger.info("published checkpoint of width %d does not record num_heads; using the "
                    "config's %d", width, heads)
        return heads

    @staticmethod
    def _group_counts(keys: List[str]) -> Dict[str, int]:
        counts: Dict[str, int] = OrderedDict()
        for k in keys:
            g = k.split(".")[0]
            counts[g] = counts.get(g, 0) + 1
        return counts

    # ------------------------------------------------------------------ loading

    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        info = checkpoint.pop("__itpn__", None)
        if info is None or info["kind"] == "detectron2":
            return self._load_detector(checkpoint, info)
        return self._load_itpn(checkpoint, info)

    def _load_detector(self, checkpoint: Dict[str, Any], info) -> _IncompatibleKeys:
        incompatible = super()._load_model(checkpoint)
        if incompatible.incorrect_shapes:
            raise CheckpointError(
                "checkpoint does not fit the detector (shape mismatch): " + "; ".join(
                    f"{k}: {tuple(c)} in checkpoint vs {tuple(m)} in model"
                    for k, c, m in incompatible.incorrect_shapes[:12]))
        loaded = [k for k in self.model.state_dict() if k not in incompatible.missing_keys]
        self.last_report = {
            "kind": "Detectron2 checkpoint" if info else "checkpoint",
            "path": info["path"] if info else "", "loaded": loaded,
            "skipped": {k: 1 for k in incompatible.unexpected_keys},
            "new": list(incompatible.missing_keys),
            "trainer_state": [k for k in checkpoint if k != "model"],
        }
        return incompatible

    def _load_itpn(self, checkpoint: Dict[str, Any], info: Dict[str, Any]) -> _IncompatibleKeys:
        prefix, net, path = info["prefix"], info["net"], info["path"]
        sd = checkpoint.pop("model")
        model_sd = self.model.state_dict()
        net_keys = [k for k in model_sd if k.startswith(prefix)]
        pyramid_prefix = prefix + "pyramid."
        has_pyramid = any(k.startswith(pyramid_prefix) for k in sd)
        missing, _, bad = state_dict_differences({k: model_sd[k] for k in net_keys}, sd)
        missing = [k for k in missing if has_pyramid or not k.startswith(pyramid_prefix)]
        unexpected = [k for k in sd if k not in model_sd]
        mismatched = [f"{k}: {tuple(sd[k].shape)} in checkpoint vs {tuple(model_sd[k].shape)} in "
                      f"model" for k in bad]
        arch_diff = self._arch_difference(net, info["metadata"])
        trained_as = (info["metadata"] or {}).get("model_name")
        if trained_as in ARCHS and net.model_name in ARCHS and trained_as != net.model_name \
                and (missing or unexpected or mismatched or arch_diff):
            raise CheckpointError(
                f"{path} holds {trained_as} weights but the config builds {net.model_name}; "
                f"set model.backbone.net.name={trained_as} (or give a checkpoint of "
                f"{net.model_name})")
        if missing or unexpected or mismatched or arch_diff:
            lines = [f"{path} ({info['kind']}) does not fit the model's backbone/pyramid:"]
            for title, keys in (("missing in checkpoint", missing),
                                ("not in model", unexpected), ("shape mismatch", mismatched)):
                if keys:
                    lines.append(f"  {title}: {_shorten(keys)}")
            if arch_diff:
                lines.append("  the checkpoint was built with " + ", ".join(
                    f"{k}={c!r}" for k, (c, _) in arch_diff.items()) + " but the config has "
                    + ", ".join(f"{k}={m!r}" for k, (_, m) in arch_diff.items())
                    + "; set model.backbone.net.<arg> to match (or pick another checkpoint)")
            raise CheckpointError("\n".join(lines))

        problems = check_input_format(self.model, info["metadata"], source=path)
        if problems and self.check_inputs != "ignore":
            msg = "input format differs from pretraining:\n  " + "\n  ".join(problems)
            if self.check_inputs == "error":
                raise CheckpointError(msg + "\n(pass check_inputs='warn' to proceed anyway)")
            logger.warning(msg)

        self.model.load_state_dict(sd, strict=False)
        new = [k for k in model_sd if k not in sd]
        self.last_report = {
            "kind": info["kind"], "path": path, "loaded": list(sd),
            "skipped": info["skipped"], "new": new, "prefix": prefix,
            "no_pyramid": not has_pyramid and net.pyramid is not None,
        }
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])

    @staticmethod
    def _arch_difference(net: ITPN, metadata: Optional[Mapping[str, Any]]
                         ) -> Dict[str, Tuple[Any, Any]]:
        """Architecture arguments that differ between the checkpoint and the model."""
        if not metadata or net.model_name is None or metadata.get("model_name") not in ARCHS:
            return {}
        ckpt = resolved_arch(metadata["model_name"], metadata.get("model_overrides", {}))
        mine = resolved_arch(net.model_name, net.model_overrides)
        return {k: (ckpt[k], mine[k]) for k in mine if k in ckpt and ckpt[k] != mine[k]}

    # ------------------------------------------------------------------ report

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        report = self.last_report
        if report is None:
            return super()._log_incompatible_keys(incompatible)
        logger.info(self.format_report(report))
        if report.get("no_pyramid"):
            logger.warning(
                "!!! %s has NO feature pyramid: the detector's pyramid (%spyramid.*) starts from "
                "RANDOM weights, so the neck is not pre-trained. Use a checkpoint with a pyramid "
                "(itpn-pretrain or a published pretraining checkpoint) to reuse it. !!!",
                report["path"], report["prefix"])

    def format_report(self, report: Dict[str, Any]) -> str:
        sd = self.model.state_dict()
        prefix = report.get("prefix")
        if prefix is None:
            prefixes = list(find_itpn_backbones(self.model)) if self._has_itpn() else []
            prefix = prefixes[0] if prefixes else "\0"

        def numel(keys):
            return sum(sd[k].numel() for k in keys if k in sd)

        loaded = report["loaded"]
        parts = [("backbone", [k for k in loaded if k.startswith(prefix + "backbone.")]),
                 ("pyramid", [k for k in loaded if k.startswith(prefix + "pyramid.")]),
                 ("heads", [k for k in loaded if not k.startswith(prefix)])]
        rows = [[f"loaded: {name}", len(keys), f"{numel(keys) / 1e6:.2f}M",
                 _group(keys, 2) if name == "heads" else f"{prefix}{name}.*"]
                for name, keys in parts if keys]
        if report["skipped"]:
            rows.append(["skipped (not in detector)", sum(report["skipped"].values()), "",
                         ", ".join(f"{k} ({n})" if n else k for k, n in report["skipped"].items())])
        new = report["new"]
        rows.append(["newly initialised", len(new), f"{numel(new) / 1e6:.2f}M",
                     _group(new, 2) or "-"])
        if report.get("trainer_state"):
            rows.append(["trainer state", "", "", ", ".join(report["trainer_state"])])
        table = tabulate(rows, headers=["", "tensors", "params", "names"], tablefmt="pipe")
        return f"Loaded {report['path']} ({report['kind']}):\n{table}"

    def left_random(self) -> Dict[str, List[str]]:
        """The model's tensors that the last :meth:`load` did not fill, by part (``backbone``,
        ``pyramid``, ``heads``); empty when every tensor came from the checkpoint."""
        if self.last_report is None:
            raise RuntimeError("left_random() needs a load() first")
        prefix = self.last_report.get("prefix")
        if prefix is None:
            prefixes = list(find_itpn_backbones(self.model)) if self._has_itpn() else []
            prefix = prefixes[0] if prefixes else "\0"
        parts: Dict[str, List[str]] = {}
        for key in self.last_report["new"]:
            part = next((p for p in ("backbone", "pyramid") if key.startswith(f"{prefix}{p}.")),
                        "heads")
            parts.setdefault(part, []).append(key)
        return parts

    def require_trained(self, how_to_allow: str) -> None:
        """Raise :class:`CheckpointError` when the last load left part of the model random
        (inference and export need a trained model); ``how_to_allow`` names the opt-out."""
        parts = self.left_random()
        if parts:
            report = self.last_report
            listed = "; ".join(f"{part} ({len(keys)} tensors: {_group(keys, 2)})"
                               for part, keys in parts.items())
            raise CheckpointError(
                f"{report['path']} ({report['kind']}) leaves part of the model random: {listed}; "
                f"give the model_final.pth that training this recipe wrote (or {how_to_allow} "
                f"to run with random weights)")

    def _has_itpn(self) -> bool:
        try:
            find_itpn_backbones(self.model)
        except ValueError:
            return False
        return True


RANDOM_WEIGHTS_FLAG = "--allow-random-weights"


def load_for_inference(model, checkpoint: Optional[str], allow_random: bool = False,
                       check_inputs: str = "error") -> Optional[ITPNCheckpointer]:
    """Load ``checkpoint`` into ``model`` for inference or export: a
    :class:`~itpn_d2.checkpoint.CheckpointError` when there is none or it leaves part of the
    model random, unless ``allow_random`` (the tools' ``--allow-random-weights``)."""
    if not checkpoint:
        if not allow_random:
            raise CheckpointError(f"no weights: give --checkpoint model_final.pth (or "
                                  f"{RANDOM_WEIGHTS_FLAG} to run with random weights)")
        logger.warning("no checkpoint: the model has random weights")
        return None
    checkpointer = ITPNCheckpointer(model, check_inputs=check_inputs)
    checkpointer.load(checkpoint)
    if not allow_random:
        checkpointer.require_trained(f"{RANDOM_WEIGHTS_FLAG} / allow_random=True")
    return checkpointer


class ZooHandler(PathHandler):
    """``itpn-zoo://<name>``: a checkpoint shipped with the package (:mod:`itpn_d2.zoo`), for
    Detectron2's ``PathManager`` (registered by ``import itpn_d2.d2``)."""

    PREFIX = ZOO_PREFIX

    def _get_supported_prefixes(self) -> List[str]:
        return [self.PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        return str(zoo_path(path))

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs: Any) -> bool:
        return os.path.isfile(self._get_local_path(path))

    _isfile = _exists


def register_zoo_handler() -> None:
    """Let Detectron2's ``PathManager`` open ``itpn-zoo://`` paths (once per process)."""
    if ZOO_PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(ZooHandler())

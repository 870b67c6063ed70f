"""Loading a LazyConfig recipe with checked overrides and checked ``train.*`` values.

Detectron2's ``LazyConfig.apply_overrides`` creates any key it is given, so a typo
(``trian.max_iter=1``) is accepted and ignored. :func:`load_config` accepts an override only
if its key exists in the config or is a parameter of the enclosing ``LazyCall`` target (its
signature; for ``build_itpn`` and the named builders, :data:`itpn_d2.modeling.itpn.BUILD_ARGS`),
and names the closest valid key otherwise. :func:`check_train_config` range-checks the values
the train tool reads. Every problem is a :class:`ConfigError` (a ``UserError``).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate

from ..checkpoint import CheckpointError
from ..errors import UserError, one_line
from ..modeling.itpn import BUILD_ARGS

__all__ = ["CHECK_INPUTS", "ConfigError", "check_train_config", "eval_checkpoint_problem",
           "finished_run_problem",
           "load_config", "move_trailing_flags", "validate_override_key"]

CHECK_INPUTS = ("error", "warn", "ignore")
AMP_PRECISIONS = ("auto", "bfloat16", "float16")
# Flags of default_argument_parser that users write after the overrides by mistake; its
# REMAINDER ``opts`` would swallow them as overrides.
TRAILING_FLAGS = ("--resume", "--eval-only")


class ConfigError(UserError, ValueError):
    """A config file, override or config value that cannot be used."""


def move_trailing_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Accept ``--resume`` / ``--eval-only`` written after the ``key=value`` overrides.

    ``default_argument_parser`` collects everything after the first override into
    ``args.opts``; these two flags are taken out of it and set. Any other ``--flag`` there is
    a :class:`ConfigError` (flags go before the overrides).
    """
    opts = []
    for token in args.opts or []:
        if token in TRAILING_FLAGS:
            setattr(args, token[2:].replace("-", "_"), True)
        elif token.startswith("--"):
            raise ConfigError(f"{token} comes after the key=value overrides, where it is read "
                              f"as an override; put flags before the overrides")
        else:
            opts.append(token)
    args.opts = opts
    return args


def _target(node: DictConfig) -> Any:
    target = node.get("_target_") if "_target_" in node else None
    return locate(target) if isinstance(target, str) else target


def _parameters(target: Any) -> Optional[List[str]]:
    """Keyword parameters of a LazyCall target; ``None`` if it takes any keyword."""
    if target is None:
        return []
    module = getattr(target, "__module__", "") or ""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        if module.startswith("itpn_d2.modeling"):  # build_itpn(name, **overrides), itpn_nano(...)
            return [p.name for p in params if p.kind is not p.VAR_KEYWORD] + list(BUILD_ARGS)
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _keys(node: Any) -> List[str]:
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys() if k != "_target_"]
    return []


def validate_override_key(cfg: DictConfig, key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` exists in ``cfg`` or names a parameter of the
    ``LazyCall`` target that would receive it."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if isinstance(node, ListConfig):
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node._get_node(int(part))
                continue
            raise ConfigError(f"override {key}: {prefix} is a list of {len(node)} entries, "
                              f"{part!r} is not an index of it")
        if not isinstance(node, DictConfig):
            raise ConfigError(f"override {key}: {prefix} is a value ({node!r}), not a config "
                              f"with entries")
        if part in node:
            node = node._get_node(part)
            if isinstance(node, (DictConfig, ListConfig)):
                continue
            node = node._value()
            continue
        params = _parameters(_target(node))
        if params is None or (part in params and i == len(parts) - 1):
            return  # a new argument of the target (a target taking **kwargs accepts any)
        choices = sorted(set(_keys(node)) | set(params))
        candidates = [".".join(parts[:i] + [c]) for c in choices]
        close = difflib.get_close_matches(key, _all_keys(cfg) + candidates, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        where = f"{prefix} has no entry {part!r}" if prefix else f"the config has no {part!r}"
        raise ConfigError(f"unknown config key {key} ({where}){hint}")


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    """Every dotted key of ``node`` (dict entries; list indices are not expanded)."""
    keys = []
    if isinstance(node, DictConfig):
        for k in _keys(node):
            child = node._get_node(k)
            full = f"{prefix}{k}"
            keys.append(full)
            if isinstance(child, DictConfig):
                keys += _all_keys(child, full + ".")
    return keys


def load_config(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.load(path)`` with every override key checked, then applied.

    Raises:
        ConfigError: the file is missing or not a config, an override is malformed or names
            an unknown key.
    """
    if not path:
        raise ConfigError("no config file given: pass --config-file configs/<recipe>.py")
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"config file {path} {what}; recipes are under configs/ (e.g. "
                          f"configs/toy/mask_rcnn_itpn_nano.py)")
    if os.path.splitext(path)[1] not in (".py", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must be a .py or .yaml LazyConfig recipe")
    try:
        cfg = LazyConfig.load(path)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: "
                          f"{e.msg}") from None
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.apply_overrides`` after checking every key (see :func:`load_config`)."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_iter=100)")
        validate_override_key(cfg, item.split("=", 1)[0].strip().lstrip("+~"))
    try:
        return LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # hydra's grammar errors, OmegaConf type errors
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        for item in overrides:  # name the one that fails, with the usual fix
            key, value = item.split("=", 1)
            needs_quotes = not value.isascii() or any(c in value for c in " \t,()[]{}'\"")
            if needs_quotes and value[:1] not in "'\"[{":
                raise ConfigError(f"override {item!r}: hydra's override grammar needs this "
                                  f"value quoted, e.g. \"{key}='{value}'\" on the command "
                                  f"line") from None
        raise ConfigError(f"cannot apply overrides {' '.join(overrides)}: "
                          f"{type(e).__name__}: {one_line(e)}") from None


def _writable(folder: str) -> bool:
    """Whether ``folder`` (or, if it does not exist yet, its nearest existing parent) takes
    new files."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _require(ok: bool, key: str, value: Any, rule: str) -> Optional[str]:
    return None if ok else f"{key}={value!r}: {rule}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_train_config(cfg: DictConfig, world_size: int = 1, eval_only: bool = False) -> None:
    """Range-check the ``train.*`` and ``dataloader.train`` values the train tool reads.

    Raises one :class:`ConfigError` listing every problem.
    """
    problems: List[Optional[str]] = []
    t = lambda key, default=None: _select(cfg, f"train.{key}", default)  # noqa: E731
    if "train" not in cfg:
        raise ConfigError("the config has no `train` settings (import them from "
                          "configs/common/train.py)")
    max_iter = t("max_iter")
    problems.append(_require(_is_int(max_iter) and max_iter >= 1, "train.max_iter", max_iter,
                             "must be an integer >= 1"))
    for key, low in (("eval_period", 0), ("log_period", 1), ("checkpointer.period", 1)):
        value = t(key, low)
        problems.append(_require(_is_int(value) and value >= low, f"train.{key}", value,
                                 f"must be an integer >= {low}"))
    keep = t("checkpointer.max_to_keep", None)
    problems.append(_require(keep is None or (_is_int(keep) and keep >= 1),
                             "train.checkpointer.max_to_keep", keep, "must be None or >= 1"))
    check = t("check_inputs", "error")
    problems.append(_require(check in CHECK_INPUTS, "train.check_inputs", check,
                             f"must be one of {', '.join(CHECK_INPUTS)}"))
    precision = t("amp.precision", "auto")
    problems.append(_require(precision in AMP_PRECISIONS, "train.amp.precision", precision,
                             f"must be one of {', '.join(AMP_PRECISIONS)}"))
    fraction = t("max_bad_image_fraction", 0.0)
    problems.append(_require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                             and 0.0 <= fraction <= 1.0, "train.max_bad_image_fraction",
                             fraction, "must be a fraction in [0, 1]"))
    if not eval_only:
        for key in ("optimizer.lr", "optimizer.weight_decay"):
            value = _select(cfg, key)
            if value is not None:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and value >= 0 and (value > 0 or key != "optimizer.lr")
                problems.append(_require(ok, key, value, "must be a number > 0" if key ==
                                         "optimizer.lr" else "must be a number >= 0"))
        batch = _select(cfg, "dataloader.train.total_batch_size")
        if batch is not None:
            ok = _is_int(batch) and batch >= 1 and batch % world_size == 0
            problems.append(_require(ok, "dataloader.train.total_batch_size", batch,
                                     f"must be an integer >= 1 divisible by the number of "
                                     f"processes ({world_size})"))
    out = t("output_dir", "")
    if out and os.path.exists(out) and not os.path.isdir(out):
        problems.append(f"train.output_dir={out!r} is a file, not a folder; choose another "
                        f"train.output_dir")
    elif out and not eval_only and not _writable(out):
        problems.append(f"train.output_dir={out!r} is not writable; choose another "
                        f"train.output_dir or fix its permissions")
    init = t("init_checkpoint", "")
    if init and "://" not in init:
        if os.path.isdir(init):
            problems.append(f"train.init_checkpoint={init!r} is a folder, not a checkpoint file")
        elif os.path.exists(init) and not os.access(init, os.R_OK):
            problems.append(f"train.init_checkpoint={init!r} is not readable (permissions)")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
    if init and "://" not in init and not os.path.exists(init):
        raise CheckpointError(f"checkpoint file not found: {init} (train.init_checkpoint)")


def finished_run_problem(cfg: DictConfig, resume: bool) -> Optional[str]:
    """Why training would replace a finished run's ``model_final.pth`` (or ``None``)."""
    out = _select(cfg, "train.output_dir", "")
    if resume or _select(cfg, "train.overwrite", False) \
            or not os.path.isfile(os.path.join(out, "model_final.pth")):
        return None
    return (f"train.output_dir {out} holds a finished run (model_final.pth); pass --resume to "
            f"continue it, train.overwrite=True to train again there, or choose another "
            f"train.output_dir")


def eval_checkpoint_problem(cfg: DictConfig, resume_available: bool) -> Optional[str]:
    """Why ``--eval-only`` would evaluate random weights (or ``None`` if it would not)."""
    if resume_available or _select(cfg, "train.init_checkpoint", ""):
        return None
    if _select(cfg, "train.eval_random_init", False):
        return None
    return ("--eval-only with an empty train.init_checkpoint would evaluate random weights; "
            "pass train.init_checkpoint=<model_final.pth> (or train.eval_random_init=True to "
            "evaluate an untrained model on purpose)")


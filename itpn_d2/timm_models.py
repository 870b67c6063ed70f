"""iTPN in timm: ``import itpn_d2.timm_models`` registers ``itpn_nano`` ... ``itpn_large``.

timm (1.0 or later: ``forward_intermediates`` and its getter wrapper) has no plugin discovery,
so this import must run before ``timm.create_model``::

    import timm
    import itpn_d2.timm_models  # noqa: F401  (registers the models)

    model = timm.create_model("itpn_base", checkpoint_path="backbone.pth")
    p4, p8, p16 = model(images)  # the pyramid levels (strides 4, 8, 16), NCHW
    features = timm.create_model("itpn_nano", features_only=True, img_size=128)

The network has **no classifier**: ``model(x)`` returns the three pyramid levels (a model built
with ``pyramid=False`` has none and ``model(x)`` fails; use ``features_only=True``, which then
returns the backbone stages). ``features_only=True`` goes through ``forward_intermediates`` and
``model.feature_info`` (:mod:`itpn_d2.modeling.features`). No weights are hosted:
``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)`` (or ``checkpoint_path=``)
loads this project's files (pretraining checkpoints, exports, Detectron2 ``model_final.pth`` of
our recipes, converted published ones); pass the checkpoint's architecture arguments (e.g.
``img_size=128`` for the toy pretraining), which a file that does not fit names. The overlay
reads the file with this project's loader; ``checkpoint_path=`` reads it with timm's, whose
own messages describe a file that is not a checkpoint at all.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .checkpoint import CheckpointError, load_checkpoint, state_dict_differences
from .convert import convert_official_state_dict, is_official_state_dict
from .modeling import ITPN, build_itpn

__all__ = ["checkpoint_filter_fn", "load_itpn_file"]


DETECTRON2_PREFIX = "backbone.net."  # ITPNBackbone's parameters in a Detectron2 model


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ITPN) -> Dict[str, torch.Tensor]:
    """timm's hook for ``pretrained=True`` files: our checkpoints (``model`` entry or a bare
    state dict, a ``module.`` prefix from DDP), a Detectron2 ``model_final.pth`` of our recipes
    (its backbone + pyramid) and published iTPN checkpoints (converted)."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith(DETECTRON2_PREFIX) for k in sd):
        sd = {k[len(DETECTRON2_PREFIX):]: v for k, v in sd.items()
              if k.startswith(DETECTRON2_PREFIX)}
    if is_official_state_dict(sd):
        heads = model.backbone.blocks[0].attn.num_heads if len(model.backbone.blocks) else None
        sd = convert_official_state_dict(sd, num_heads=heads)[0]
    return sd


def _fit_problem(model: ITPN, sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why ``sd`` does not fit ``model`` (None: it does), with the ``create_model`` argument
    that would fix it where one does."""
    own = model.state_dict()
    missing, _, bad = state_dict_differences(own, sd)
    if not bad and not missing:
        return None
    pos = "backbone.pos_embed"
    if pos in bad:
        side = round(math.sqrt(sd[pos].shape[1])) * 16  # stride-16 tokens of a square image
        return (f"the checkpoint was pre-trained at img_size={side}, the model is built at "
                f"{tuple(model.backbone.img_size)}: pass img_size={side} to timm.create_model")
    if bad:
        return (f"{len(bad)} tensors do not fit, e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} in the "
                f"checkpoint vs {tuple(own[bad[0]].shape)} in the model; is it another iTPN "
                f"model (itpn_nano ... itpn_large) or built with other arguments?")
    if all(k.startswith("pyramid.") for k in missing):
        return ("the checkpoint has no pyramid (a pretraining with --pyramid off): pass "
                "pyramid=False to timm.create_model")
    return (f"the checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[0]}; "
            f"is it an iTPN checkpoint (pretraining, export, Detectron2 model_final.pth)?")


def _prepare_state_dict(module: ITPN, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of timm-built models (``checkpoint_path=`` loads the file
    with timm's reader, then here): the keys of our other formats mapped to the model's, and a
    :class:`~itpn_d2.checkpoint.CheckpointError` naming the fix instead of torch's list."""
    mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    own = module.state_dict()
    if not any(k in own for k in mine):  # another layout of ours: map it
        mine = checkpoint_filter_fn(mine, module)
        for k in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[k]
        state_dict.update({prefix + k: v for k, v in mine.items()})
    problem = _fit_problem(module, mine)
    if problem:
        raise CheckpointError(f"{problem}")


def load_itpn_file(model: ITPN, path: str) -> None:
    """Load one of our files into ``model`` with this project's loader (its one-line errors)."""
    ckpt = load_checkpoint(path)
    sd = checkpoint_filter_fn(ckpt, model)
    problem = _fit_problem(model, sd)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    model.load_state_dict(sd)


def _load_plain_itpn_state_dict(module, state_dict, prefix, *args) -> None:
    """``timm.create_model(..., features_only=True, checkpoint_path=...)`` loads the file into
    the wrapper, whose keys carry ``model.``; our files hold the ITPN keys without it."""
    if prefix == "" and state_dict and not any(k.startswith("model.") for k in state_dict):
        for k in list(state_dict):
            state_dict["model." + k] = state_dict.pop(k)


def _cfg() -> Dict[str, Any]:
    return dict(url="", num_classes=0, input_size=(3, 224, 224), pool_size=None,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bicubic",
                first_conv="backbone.patch_embed.proj", classifier=None, license="apache-2.0")


default_cfgs = generate_default_cfgs({name: _cfg() for name in (
    "itpn_nano", "itpn_tiny", "itpn_small", "itpn_base", "itpn_large")})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ITPN:
    if kwargs.get("num_classes"):
        raise ValueError(f"{variant} has no classifier (model(x) returns the pyramid levels); "
                         f"got num_classes={kwargs['num_classes']}")
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    file = overlay.pop("file", None)
    if pretrained and not (file or overlay.get("state_dict")):
        raise ValueError(f"no {variant} weights are hosted: pass checkpoint_path=FILE (or "
                         f"pretrained_cfg_overlay=dict(file=FILE)) with an itpn-pretrain "
                         f"checkpoint, an itpn-export-backbone export or a converted "
                         f"published checkpoint")

    def build(**kw: Any) -> ITPN:
        net = build_itpn(variant, **kw)
        if file:  # our loader, before timm wraps the model (features_only)
            load_itpn_file(net, file)
        net.register_load_state_dict_pre_hook(_prepare_state_dict)
        return net

    model = build_model_with_cfg(
        build, variant, pretrained and not file, pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
        kwargs_filter=("num_classes", "global_pool"), **kwargs)
    if kwargs.get("features_only"):  # timm's getter wrapper: checkpoint_path= loads into it
        model.register_load_state_dict_pre_hook(_load_plain_itpn_state_dict)
    return model


@register_model
def itpn_nano(pretrained: bool = False, **kwargs: Any) -> ITPN:
    return _create("itpn_nano", pretrained, **kwargs)


@register_model
def itpn_tiny(pretrained: bool = False, **kwargs: Any) -> ITPN:
    return _create("itpn_tiny", pretrained, **kwargs)


@register_model
def itpn_small(pretrained: bool = False, **kwargs: Any) -> ITPN:
    return _create("itpn_small", pretrained, **kwargs)


@register_model
def itpn_base(pretrained: bool = False, **kwargs: Any) -> ITPN:
    return _create("itpn_base", pretrained, **kwargs)


@register_model
def itpn_large(pretrained: bool = False, **kwargs: Any) -> ITPN:
    return _create("itpn_large", pretrained, **kwargs)

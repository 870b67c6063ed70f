"""Detectron2 integration: backbone, checkpointer, optimizer helpers, data helpers, inference
(:class:`Predictor`) and export.

Importing this package imports detectron2. Models are built from LazyConfig recipes
(``configs/``); yacs configs (``get_cfg()``, ``DefaultPredictor``) are not supported:
:class:`Predictor` is the one-call inference.
"""

import warnings

with warnings.catch_warnings():
    # fvcore and detectron2 script functions at import time, which torch 2.14 flags as
    # deprecated: a warning on every tool's stderr that nobody here can act on.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                            category=FutureWarning)
    import detectron2.modeling  # noqa: F401

from .backbone import DEFAULT_OUT_FEATURES, PYRAMID_STRIDES, STAGE_STRIDES, ITPNBackbone
from .checkpoint import ITPNCheckpointer, check_input_format, register_zoo_handler
from .export import BackboneOutputs, export_model
from .optim import (find_itpn_backbones, itpn_layer_id, itpn_lr_factor_func,
                    no_weight_decay_overrides, no_weight_decay_param_names)
from .predictor import Predictor, predict_files

# Like Detectron2's own detectron2:// handler: itpn-zoo://<name> opens a shipped checkpoint.
register_zoo_handler()

__all__ = [
    "BackboneOutputs", "DEFAULT_OUT_FEATURES", "ITPNBackbone", "ITPNCheckpointer",
    "PYRAMID_STRIDES", "Predictor", "STAGE_STRIDES", "check_input_format", "export_model",
    "find_itpn_backbones", "itpn_layer_id", "itpn_lr_factor_func", "no_weight_decay_overrides",
    "no_weight_decay_param_names", "predict_files", "register_zoo_handler",
]

"""Finished pretraining checkpoints: export the backbone + pyramid, or rebuild the model.

:func:`export_backbone` writes the backbone + pyramid of a checkpoint with its metadata. The output holds ``model`` (exactly ``build_itpn(model_name, **model_overrides).state_dict()``)
and the metadata keys of :func:`itpn_d2.checkpoint.model_metadata`, nothing else but
``matching_heuristics`` (:data:`itpn_d2.checkpoint.D2_LOAD_FLAGS`): it is what Detectron2 (a
stock ``DetectionCheckpointer`` or ``ITPNCheckpointer``) and
:func:`itpn_d2.checkpoint.model_from_checkpoint` load.
Training-time settings that do not change the weights (``drop_path_rate``, ``use_checkpoint``)
are left out of ``model_overrides``; downstream configs choose their own.

    itpn-export-backbone output/pretrain/checkpoint-last.pth itpn_nano_backbone.pth
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from itpn_d2.checkpoint import (CONVERT_COMMAND, D2_LOAD_FLAGS, CheckpointError,
                                load_checkpoint, metadata_of, model_from_checkpoint,
                                model_metadata, save_checkpoint)
from itpn_d2.errors import DiskFullError, UserError, run_cli

from .checkpointing import load_training_state
from .models import PretrainModel, build_pretrain_model

TRAINING_ONLY = ("drop_path_rate", "use_checkpoint")


def export_backbone(src: str, dst: str) -> Dict[str, Any]:
    """Write the backbone + pyramid of the checkpoint ``src`` to ``dst``; return what was written.

    Args:
        src: a checkpoint with model metadata (``pretrain/main.py``, or an export or conversion).
        dst: the output file (not a folder).
    """
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise UserError(f"output {dst} is the input checkpoint; exporting over it would replace "
                        f"the training checkpoint with its backbone: give another file name")
    ckpt = load_checkpoint(src)
    meta = metadata_of(ckpt)
    if meta is None:
        raise CheckpointError(f"{src} has no model metadata (model_name); convert published "
                              f"checkpoints with {CONVERT_COMMAND}")
    overrides = {k: v for k, v in meta["model_overrides"].items() if k not in TRAINING_ONLY}
    out = {"model": ckpt["model"],
           **model_metadata(meta["model_name"], overrides, meta["pixel_mean"],
                            meta["pixel_std"], meta["channel_order"]),
           **D2_LOAD_FLAGS}
    model_from_checkpoint(out)  # the exact keys and shapes build_itpn expects
    if os.path.isdir(dst):
        raise UserError(f"output {dst} is a folder; give a file name, e.g. {dst}/backbone.pth")
    try:
        save_checkpoint(out, dst)
    except DiskFullError:
        raise
    except OSError as e:
        raise UserError(f"cannot write {dst}: {e.strerror or e}; choose another output "
                        f"path") from None
    return out


def load_pretrain_model(path: Union[str, Path]) -> Tuple[PretrainModel, Dict[str, Any]]:
    """Encoder + pixel decoder of a pretraining checkpoint, in eval mode, and its settings.

    The model is built with ``mfm="none"`` (no teacher, no MFM heads: reconstruction does not use
    them) and loaded as a resumed run loads it
    (:func:`pretrain.checkpointing.load_training_state`).

    Args:
        path: a checkpoint written by ``pretrain/main.py`` (an exported backbone has no decoder).
    """
    ckpt = load_checkpoint(path)
    if not ckpt.get("decoder") or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"{path} has no pixel decoder: it is not a pretraining checkpoint "
                              f"of itpn-pretrain (an exported backbone cannot reconstruct)")
    args = dict(ckpt["args"], mfm="none")
    model = build_pretrain_model(args)
    load_training_state({**ckpt, "mfm_heads": {}}, model, Path(path))
    return model.eval(), args


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint (pretrain/main.py)")
    p.add_argument("output", help="where to write the backbone + pyramid checkpoint")
    args = p.parse_args(argv)
    out = export_backbone(args.checkpoint, args.output)
    n = sum(v.numel() for v in out["model"].values())
    pyramid = "with" if any(k.startswith("pyramid.") for k in out["model"]) else "without"
    print(f"wrote {args.output}: {out['model_name']} {out['model_overrides']}, "
          f"{n / 1e6:.2f}M parameters, {pyramid} pyramid")
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    """The command line; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: main(argv))

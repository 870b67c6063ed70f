#!/usr/bin/env python
"""Export the backbone + pyramid of a pretraining checkpoint, with its metadata.

The output holds ``model`` (exactly ``build_itpn(model_name, **model_overrides).state_dict()``)
and the metadata keys of :func:`itpn_d2.checkpoint.model_metadata`, nothing else but
``matching_heuristics`` (:data:`itpn_d2.checkpoint.D2_LOAD_FLAGS`): it is what Detectron2 (a
stock ``DetectionCheckpointer`` or ``ITPNCheckpointer``) and
:func:`itpn_d2.checkpoint.model_from_checkpoint` load.
Training-time settings that do not change the weights (``drop_path_rate``, ``use_checkpoint``)
are left out of ``model_overrides``; downstream configs choose their own.

    python tools/export_backbone.py output/pretrain/checkpoint-last.pth itpn_nano_backbone.pth
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from itpn_d2.checkpoint import (D2_LOAD_FLAGS, CheckpointError, load_checkpoint,  # noqa: E402
                                metadata_of, model_from_checkpoint, model_metadata,
                                save_checkpoint)
from itpn_d2.errors import DiskFullError, UserError, run_cli  # noqa: E402

TRAINING_ONLY = ("drop_path_rate", "use_checkpoint")


def export_backbone(src: str, dst: str) -> dict:
    ckpt = load_checkpoint(src)
    meta = metadata_of(ckpt)
    if meta is None:
        raise CheckpointError(f"{src} has no model metadata (model_name); convert published "
                              f"checkpoints with tools/convert_official_checkpoint.py")
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


def main(argv=None) -> int:
    """The command line; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: _main(argv))


def _main(argv=None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())

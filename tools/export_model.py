#!/usr/bin/env python
"""Export a recipe's backbone + pyramid (and, for TorchScript, the whole R-CNN) and check it.

    python tools/export_model.py --config-file configs/coco/mask_rcnn_itpn_b.py \
        --checkpoint output/mask_rcnn_itpn_b/model_final.pth --format torchscript --output export/
    python tools/export_model.py --config-file configs/toy/mask_rcnn_itpn_nano.py \
        --checkpoint output/toy/model_final.pth --format onnx --output export_onnx/ \
        model.backbone.net.img_size=128

Formats: ``torchscript`` (``backbone.ts`` and, for Mask / Cascade R-CNN recipes, ``model.ts``
through Detectron2's ``TracingAdapter``), ``onnx`` (``backbone.onnx``, dynamic H and W; needs
``pip install -e '.[export]'``) and ``torch_export`` (``backbone.pt2``, ``torch.export`` with
dynamic H and W). The exported graphs run at any size (multiples of 32 from 64 to 1344 for the
dynamic ones), not only the trace size (``--size``, default: the pretraining size). Every
export is compared with the eager model at several sizes; ``export.json`` records the inputs,
outputs and the differences, and the tool fails if one exceeds 1e-4. Trailing ``key=value``
arguments override the config. See ``itpn_d2.d2.export`` for the input and output layouts.
"""

import argparse
import sys
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

from itpn_d2.d2.config import load_config
from itpn_d2.d2.export import EXPORT_FORMATS, export_model
from itpn_d2.errors import run_cli


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig recipe")
    parser.add_argument("--checkpoint", default=None,
                        help="weights: the model_final.pth that training wrote (default: the "
                             "config's train.init_checkpoint)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="export even when the weights leave part of the model random (no "
                             "checkpoint, or a pretraining one): to test the export only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --output")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="example input size for tracing (default: pretraining size)")
    parser.add_argument("--device", default="cpu", help="device for tracing and the checks")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    checkpoint = args.checkpoint if args.checkpoint is not None else cfg.train.init_checkpoint
    setup_logger(name="itpn_d2", abbrev_name="itpn")  # the checkpointer's load table
    report = export_model(cfg, args.output, args.format, checkpoint=checkpoint or None,
                          size=args.size, device=args.device,
                          allow_random=args.allow_random_weights, overwrite=args.overwrite)
    for part, file in report["files"].items():
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in report["checks"][part].items())
        print(f"wrote {args.output}/{file}: max |exported - eager| at {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main()))

#!/usr/bin/env python
"""Speed and memory of iTPN-D2: pretraining steps, Detectron2 training iterations, inference.

    tools/benchmark.py pretrain --model itpn_base --device cuda --batch-size 256 [--compile]
    tools/benchmark.py pretrain --model itpn_nano --device cpu --batch-size 4 --input-size 128 \\
        --steps 2 --json
    tools/benchmark.py infer --model itpn_base --input-size 1024 --batch-size 8
    tools/benchmark.py infer --config configs/coco/mask_rcnn_itpn_b.py --input-size 1024
    tools/benchmark.py d2 --config configs/coco/mask_rcnn_itpn_b.py --input-size 1024 \\
        --batch-size 2 --vitdet
    tools/benchmark.py data --device cpu --threads 1 --batch-size 64 --steps 4 --warmup 1

Subcommands (each configuration is one row of the table, or one JSON line with ``--json``):

* ``pretrain``: one optimizer step of ``pretrain/main.py`` (masking, forward under autocast,
  backward, fused AdamW, EMA update), for MIM only, MIM+MFM(ema) and MIM+MFM(clip) (``--mfm``).
  The model and optimizer come from ``pretrain.models`` / ``pretrain.engine`` with the CLI
  defaults of ``pretrain/main.py``. The CLIP teacher has random weights (timing only): open_clip
  ``ViT-B-16`` on CUDA, a tiny ViT on the CPU (``--clip-teacher``).
* ``d2``: one Detectron2 training iteration (forward, losses, backward, optimizer step) of a
  LazyConfig's model and optimizer on synthetic images with boxes and masks; ``--vitdet`` adds
  the same detector with Detectron2's ViTDet-B backbone (``ViT`` + ``SimpleFeaturePyramid``,
  random weights) in place of iTPN, and reports the iTPN/ViTDet step-time ratio.
* ``infer``: iTPN backbone + pyramid (``--model``) and/or the full detector of ``--config``
  in eval mode under ``torch.inference_mode``.
* ``data``: the pretraining data paths on a folder of JPEGs (default: a generated corpus of
  ``--images`` JPEGs of ``--image-size`` at ``--quality``): ``pil`` (PIL decode + crop, the
  default loader's worker), ``read_bytes`` (the ``--decode gpu`` worker: bytes, header, crop
  box), ``decode`` (torchvision ``decode_jpeg`` of a batch on ``--device``) and ``gpu_path``
  (decode + orient + crop / resize / flip on ``--device``). ``cpu_ms_per_image`` is the process
  CPU time per image; with ``--device cpu`` the last two run torchvision's CPU decoder.

Timing, memory and the settings live in :mod:`itpn_d2.benchmark`; the pretraining and data
benchmarks in :mod:`pretrain.benchmark`, the Detectron2 ones in :mod:`itpn_d2.d2.benchmark`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

from itpn_d2.runtime import set_omp_wait_policy

if __name__ == "__main__":
    set_omp_wait_policy()  # before torch loads OpenMP (see itpn_d2.runtime)

from itpn_d2.benchmark import (BenchmarkError, format_table, get_parser,  # noqa: E402,F401
                               resolve)
from itpn_d2.errors import EXIT_USER_ERROR, UserError  # noqa: E402


def run(args, device) -> List[Any]:
    """The benchmark of the parsed ``args`` (detectron2 is imported only for d2 / --config)."""
    if args.command in ("pretrain", "data"):
        try:
            from pretrain.benchmark import bench_data, bench_pretrain
        except ModuleNotFoundError as e:
            if e.name != "pretrain":
                raise
            raise UserError("the pretrain package is not importable: install the repository "
                            "(pip install -e .) or set PYTHONPATH to its root") from None

        return (bench_pretrain if args.command == "pretrain" else bench_data)(args, device)
    if args.command == "d2" or args.config:
        from itpn_d2.d2.benchmark import bench_d2, bench_infer_config

        return (bench_d2 if args.command == "d2" else bench_infer_config)(args, device)
    from itpn_d2.benchmark import bench_infer

    return bench_infer(args, device)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Run the benchmark of ``argv``; print the table (or JSON lines) and return the rows."""
    args = get_parser(__doc__).parse_args(argv)
    device = resolve(args)
    rows = [r.as_dict() for r in run(args, device)]
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(format_table(rows), flush=True)
    return rows


def cli(argv: Optional[List[str]] = None) -> int:
    try:
        main(argv)
    except (BenchmarkError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    from itpn_d2.errors import run_cli

    sys.exit(run_cli(cli))

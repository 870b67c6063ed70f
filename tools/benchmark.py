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

Everything lives in :mod:`itpn_d2.benchmark` (this script is its command line).
"""

import sys

from itpn_d2.runtime import set_omp_wait_policy

if __name__ == "__main__":
    set_omp_wait_policy()  # before torch loads OpenMP (see itpn_d2.runtime)

from itpn_d2.benchmark import cli, main  # noqa: E402,F401  (main: the rows, for tests)
from itpn_d2.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(lambda: cli(description=__doc__)))

"""iTPN pretraining: HiViT + integral pyramid trained by masked image modeling (pixels) and masked
feature modeling (every pyramid level predicts teacher features).

Run ``itpn-pretrain --help`` (or ``python pretrain/main.py --help`` in a checkout). Modules:

* :mod:`pretrain.data`: image folders, deterministic per-sample augmentation, resumable sampler.
* :mod:`pretrain.models`: masking, pixel decoder, MFM heads, EMA / CLIP teachers.
* :mod:`pretrain.engine`: training loop, schedules, checkpoints, resume, logging, DDP.
* :mod:`pretrain.visualize`: original / masked / reconstruction grids
  (``itpn-visualize-reconstruction``).
* :mod:`pretrain.export`: backbone export (``itpn-export-backbone``) and loading a finished
  checkpoint's encoder + decoder.
"""

"""iTPN pretraining: HiViT + integral pyramid trained by masked image modeling (pixels) and masked
feature modeling (every pyramid level predicts teacher features).

Run ``python pretrain/main.py --help`` from the repository root. Modules:

* :mod:`pretrain.data`: image folders, deterministic per-sample augmentation, resumable sampler.
* :mod:`pretrain.models`: masking, pixel decoder, MFM heads, EMA / CLIP teachers.
* :mod:`pretrain.engine`: training loop, schedules, checkpoints, resume, logging, DDP.
* :mod:`pretrain.visualize`: original / masked / reconstruction grids.
"""

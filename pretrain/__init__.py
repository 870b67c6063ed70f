"""iTPN pretraining: HiViT + integral pyramid trained by masked image modeling (pixels) and masked
feature modeling (every pyramid level predicts teacher features).

Run ``itpn-pretrain --help`` (or ``python pretrain/main.py --help`` in a checkout). Modules:

* :mod:`pretrain.data`: image folders, deterministic per-sample augmentation, resumable sampler.
* :mod:`pretrain.models`: masking, pixel decoder, MFM heads, EMA / CLIP teachers.
* :mod:`pretrain.config`: settings (flags, checkpoint ``args``) and the settings derived from them.
* :mod:`pretrain.engine`: the training loop (setup, steps, epochs).
* :mod:`pretrain.optim`: learning-rate schedule, AdamW parameter groups, step counts.
* :mod:`pretrain.checkpointing`: checkpoints, random states, exact resume.
* :mod:`pretrain.distributed`: process group (torchrun), collectives, stopping all ranks together.
* :mod:`pretrain.logs`: ``log.txt``, TensorBoard, progress bar, console messages.
* :mod:`pretrain.flags`: command-line flag types.
* :mod:`pretrain.visualize`: original / masked / reconstruction grids
  (``itpn-visualize-reconstruction``).
* :mod:`pretrain.export`: backbone export (``itpn-export-backbone``) and loading a finished
  checkpoint's encoder + decoder.
"""

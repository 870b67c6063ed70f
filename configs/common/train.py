"""Training loop settings read by tools/lazyconfig_train_net.py (and Detectron2's own)."""

import torch

_CUDA = torch.cuda.is_available()

train = dict(
    output_dir="./output",
    init_checkpoint="",  # pretrain/main.py checkpoint, export, or published iTPN checkpoint
    max_iter=90000,
    # Mixed precision on CUDA only; precision "auto" picks bfloat16 where supported (read by
    # our tool; Detectron2's own AMPTrainer always uses float16 with a GradScaler).
    amp=dict(enabled=_CUDA, precision="auto"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,  # evaluate every N iterations and at the end; 0: not during training
    log_period=20,
    device="cuda" if _CUDA else "cpu",
    # Input format / pixel statistics vs. the checkpoint's pretraining metadata:
    # "error", "warn" or "ignore".
    check_inputs="error",
    # Unreadable / missing / truncated training images are skipped (and logged); training
    # stops once more than this fraction of max(dataset size, images read) failed.
    max_bad_image_fraction=0.01,
    # --eval-only with an empty init_checkpoint evaluates random weights only if True.
    eval_random_init=False,
    # Training into an output_dir that holds a finished run (model_final.pth) without
    # --resume replaces it only if True.
    overwrite=False,
    seed=-1,
)

#!/usr/bin/env python
"""Train or evaluate a LazyConfig recipe whose backbone is iTPN (Detectron2 style).

    python tools/lazyconfig_train_net.py --config-file configs/coco/mask_rcnn_itpn_b.py \
        --num-gpus 8 train.init_checkpoint=/path/to/checkpoint.pth
    python tools/lazyconfig_train_net.py --config-file configs/toy/mask_rcnn_itpn_nano.py \
        train.max_iter=20                       # CPU, toy dataset ($ITPN_TOY_ROOT)
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \
        train.init_checkpoint=output/model_final.pth

``train.init_checkpoint`` takes a ``pretrain/main.py`` checkpoint, an export, a published iTPN
checkpoint or a Detectron2 checkpoint of the detector (:class:`ITPNCheckpointer`). ``--resume``
continues from ``train.output_dir/last_checkpoint`` with optimizer, scheduler and iteration.
Mixed precision (``train.amp``) runs on CUDA; on CPU the plain ``SimpleTrainer`` is used.
Toy datasets (``itpn_toy_*``) are registered from ``$ITPN_TOY_ROOT`` when a config uses them.
"""

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (AMPTrainer, SimpleTrainer, create_ddp_model,  # noqa: E402
                               default_argument_parser, default_setup, default_writers, hooks,
                               launch)
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from itpn_d2.d2 import ITPNCheckpointer  # noqa: E402
from itpn_d2.d2.data import prepare_datasets  # noqa: E402

logger = logging.getLogger("itpn_d2")


def resolve_device(cfg) -> str:
    device = cfg.train.get("device", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%r but CUDA is not available: running on the CPU", device)
        device = "cpu"
    cfg.train.device = device
    return device


def make_trainer(cfg, model, data_loader, optimizer):
    amp = cfg.train.get("amp", {})
    if not amp.get("enabled", False) or not cfg.train.device.startswith("cuda"):
        if amp.get("enabled", False):
            logger.info("train.amp.enabled is ignored on %s: training in float32", cfg.train.device)
        return SimpleTrainer(model, data_loader, optimizer)
    precision = amp.get("precision", "auto")
    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if precision not in ("bfloat16", "float16"):
        raise ValueError(f"train.amp.precision must be auto, bfloat16 or float16, got {precision!r}")
    dtype = getattr(torch, precision)
    # bfloat16 has float32's range: no loss scaling needed.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    logger.info("Mixed precision training in %s", precision)
    return AMPTrainer(model, data_loader, optimizer, grad_scaler=scaler, precision=dtype)


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                               instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    return ret


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = make_trainer(cfg, model, train_loader, optimizer)
    checkpointer = ITPNCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                    check_inputs=cfg.train.get("check_inputs", "error"))
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        # eval_period > 0: every eval_period iterations and after the last; 0: never.
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model))
        if cfg.train.eval_period > 0 else None,
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    resolve_device(cfg)
    prepare_datasets(cfg, splits=("test",) if args.eval_only else ("train", "test"))

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        checkpointer = ITPNCheckpointer(model, cfg.train.output_dir,
                                        check_inputs=cfg.train.get("check_inputs", "error"))
        if args.resume and checkpointer.has_checkpoint():
            checkpointer.load(checkpointer.get_checkpoint_file(), checkpointables=[])
        else:
            checkpointer.load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()

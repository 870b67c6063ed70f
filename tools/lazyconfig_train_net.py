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

Overrides are checked (:func:`itpn_d2.d2.config.load_config`: unknown keys are an error naming
the closest one) and so are the ``train.*`` values; expected errors end as one ``error:`` line
(``ITPN_DEBUG=1``: traceback), also in the workers of ``--num-gpus`` > 1. ``--resume`` and
``--eval-only`` may also follow the overrides. Rank 0 locks ``train.output_dir`` for the run.
Unreadable training images are skipped up to ``train.max_bad_image_fraction``.
``--eval-only`` with an empty ``train.init_checkpoint`` needs ``train.eval_random_init=True``.
"""

import contextlib
import logging
import sys
from pathlib import Path

import torch

import itpn_d2.d2  # noqa: F401  (first: imports detectron2 without torch's warnings)
from detectron2.config import instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, create_ddp_model,
                               default_argument_parser, default_setup, default_writers, hooks)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from itpn_d2.checkpoint import lock_run_dir, remove_stale_temporaries, trim_json_lines
from itpn_d2.d2 import ITPNCheckpointer
from itpn_d2.d2.bad_images import (BadImageHook, evaluation_image_errors,
                                   instantiate_train_loader, json_errors_named)
from itpn_d2.d2.cli import launch_cli
from itpn_d2.d2.config import (ConfigError, check_train_config,
                               eval_checkpoint_problem, finished_run_problem, load_config,
                               move_trailing_flags)
from itpn_d2.d2.data import prepare_datasets
from itpn_d2.errors import run_cli
from itpn_d2.eval_results import write_eval_results

logger = logging.getLogger("itpn_d2")


def resolve_device(cfg) -> str:
    device = cfg.train.get("device", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%r but CUDA is not available: running on the CPU", device)
        device = "cpu"
    cfg.train.device = device
    return device


def ddp_options(cfg, model, **options):
    """Options of ``create_ddp_model``; CPU processes take no ``device_ids`` (DDP refuses them)."""
    if cfg.train.device.startswith("cuda") or comm.get_world_size() == 1:
        return options
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        raise ConfigError("the model has SyncBatchNorm layers (norm='SyncBN'), which need CUDA: "
                          "on the CPU run one process (--num-gpus 1) or use norm='BN'")
    return {**options, "device_ids": None}


def make_trainer(cfg, model, data_loader, optimizer):
    amp = cfg.train.get("amp", {})
    if not amp.get("enabled", False) or not cfg.train.device.startswith("cuda"):
        if amp.get("enabled", False):
            logger.info("train.amp.enabled is ignored on %s: training in float32", cfg.train.device)
        return SimpleTrainer(model, data_loader, optimizer)
    precision = amp.get("precision", "auto")  # checked by check_train_config
    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    dtype = getattr(torch, precision)
    # bfloat16 has float32's range: no loss scaling needed.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    logger.info("Mixed precision training in %s", precision)
    return AMPTrainer(model, data_loader, optimizer, grad_scaler=scaler, precision=dtype)


def do_test(cfg, model, iteration=None):
    """Evaluate; the results also go to ``train.output_dir/eval_results.json`` (read by the
    experiment stages). ``iteration``: iterations trained so far (``None``: --eval-only)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    with json_errors_named(cfg, "test"):
        loader = instantiate(cfg.dataloader.test)
    with evaluation_image_errors():
        ret = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(ret)
    if comm.is_main_process() and ret:
        write_eval_results(cfg.train.output_dir, ret, iteration)
    return ret


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    with json_errors_named(cfg, "train"):
        train_loader, bad_images = instantiate_train_loader(
            cfg.dataloader.train, cfg.train.get("max_bad_image_fraction", 0.01))

    model = create_ddp_model(model, **ddp_options(cfg, model, **cfg.train.ddp))
    trainer = make_trainer(cfg, model, train_loader, optimizer)
    checkpointer = ITPNCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                    check_inputs=cfg.train.get("check_inputs", "error"))
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        # eval_period > 0: every eval_period iterations and after the last; 0: never.
        # iterations trained: trainer.iter + 1 after a step, max_iter after the last one
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(
            cfg, model, min(trainer.iter + 1, cfg.train.max_iter)))
        if cfg.train.eval_period > 0 else None,
        BadImageHook(bad_images, period=cfg.train.log_period),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if comm.is_main_process():  # iterations logged after the checkpoint are trained again
        dropped = trim_json_lines(Path(cfg.train.output_dir) / "metrics.json", "iteration",
                                  start_iter, atomic=False)  # the JSONWriter holds it open
        if dropped:
            logger.info(f"dropped {dropped} line(s) of metrics.json logged after the "
                        f"checkpoint resumed from (iteration >= {start_iter})")
    trainer.train(start_iter, cfg.train.max_iter)


def load_checked_config(args):
    """The config with checked overrides and ``train.*`` values (raises ConfigError)."""
    move_trailing_flags(args)
    cfg = load_config(args.config_file, args.opts)
    check_train_config(cfg, world_size=args.num_gpus * args.num_machines,
                       eval_only=args.eval_only)
    problem = None if args.eval_only else finished_run_problem(cfg, args.resume)
    if problem:
        raise ConfigError(problem)
    return cfg


def main(args):
    cfg = load_checked_config(args)
    with contextlib.ExitStack() as stack:
        if comm.is_main_process():  # one run per output folder; the kernel frees it on exit
            stack.enter_context(lock_run_dir(cfg.train.output_dir))
            remove_stale_temporaries(cfg.train.output_dir)
        return run(args, cfg)


def run(args, cfg):
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="itpn_d2")
    resolve_device(cfg)
    prepare_datasets(cfg, splits=("test",) if args.eval_only else ("train", "test"))
    if args.eval_only:
        resume = args.resume and Path(cfg.train.output_dir, "last_checkpoint").is_file()
        problem = eval_checkpoint_problem(cfg, resume_available=resume)
        if problem:
            raise ConfigError(problem)
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model, **ddp_options(cfg, model))
        checkpointer = ITPNCheckpointer(model, cfg.train.output_dir,
                                        check_inputs=cfg.train.get("check_inputs", "error"))
        if args.resume and checkpointer.has_checkpoint():
            checkpointer.load(checkpointer.get_checkpoint_file(), checkpointables=[])
        elif cfg.train.init_checkpoint:
            checkpointer.load(cfg.train.init_checkpoint)
        else:
            logger.warning("train.eval_random_init=True: evaluating randomly initialised weights")
        return do_test(cfg, model)
    do_train(args, cfg)


def invoke_main() -> int:
    args = default_argument_parser().parse_args()
    if args.num_gpus * args.num_machines > 1:  # config errors once, before the workers start
        status = run_cli(lambda: load_checked_config(args) and None)
        if status:
            return status
    return launch_cli(main, args)


if __name__ == "__main__":
    sys.exit(invoke_main())

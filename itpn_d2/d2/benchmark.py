"""Detectron2 benchmarks: one training iteration of a LazyConfig's detector (and of the same
detector with Detectron2's ViTDet-B backbone), and the detector's inference.

Used by ``tools/benchmark.py d2`` / ``infer --config`` and ``tools/gpu_check.py``; the timing
core is :mod:`itpn_d2.benchmark`.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch

from itpn_d2.benchmark import (BenchmarkError, PeakMemory, Result, _rss_gib, autocast_ctx,
                               count_params, make_result, measure, time_pyramid)


def load_d2_config(path: str, overrides: Sequence[str], model_name: Optional[str]):
    from .config import load_config

    cfg = load_config(path, overrides)
    if model_name is not None:
        cfg.model.backbone.net.name = model_name
    return cfg


def vitdet_b_backbone(out_channels: int, img_size: int):
    """Detectron2's ViTDet-B backbone (its COCO recipe's ViT + SimpleFeaturePyramid) as a
    LazyCall, for ``img_size`` square inputs and ``out_channels`` pyramid channels."""
    import torch.nn as nn
    from detectron2.config import LazyCall as L
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT

    return L(SimpleFeaturePyramid)(
        net=L(ViT)(img_size=img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                   drop_path_rate=0.1, window_size=14, mlp_ratio=4, qkv_bias=True,
                   norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10], residual_block_indexes=[],
                   use_rel_pos=True, out_feature="last_feat"),
        in_feature="last_feat", out_channels=out_channels, scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=L(LastLevelMaxPool)(), norm="LN", square_pad=img_size)


def synthetic_d2_batch(batch: int, size: int, num_classes: int, instances: int,
                       device: torch.device, seed: int = 0) -> List[Dict[str, Any]]:
    """Detectron2 training inputs: random images with random boxes and rectangular masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = torch.randint(size // 16, size // 2, (instances, 2), generator=g)
        xy = (torch.rand(instances, 2, generator=g) * (size - wh)).long()
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        masks = torch.zeros(instances, size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst = Instances((size, size), gt_boxes=Boxes(boxes),
                         gt_classes=torch.randint(num_classes, (instances,), generator=g),
                         gt_masks=BitMasks(masks))
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": image.to(device), "height": size, "width": size,
                    "instances": inst.to(device)})
    return out


def _d2_model_name(cfg) -> str:
    try:
        return str(cfg.model.backbone.net.name)
    except Exception:  # a config without an iTPN backbone
        return type(cfg.model.backbone).__name__


def bench_d2(args, device: torch.device) -> List[Result]:
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.solver import get_default_optimizer_params
    from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
    from detectron2.utils.events import EventStorage

    cfg = load_d2_config(args.config, args.opts, args.model)
    if args.amp == "fp16" and device.type != "cuda":
        raise BenchmarkError("--amp fp16 needs CUDA")
    variants = [("itpn", cfg)]
    if args.vitdet:
        vcfg = copy.deepcopy(cfg)
        vcfg.model.backbone = vitdet_b_backbone(cfg.model.proposal_generator.head.in_channels,
                                                args.input_size)
        variants.append(("vitdet_b", vcfg))
    num_classes = cfg.model.roi_heads.num_classes
    batch = synthetic_d2_batch(args.batch_size, args.input_size, num_classes,
                               args.instances, device)
    results = []
    for label, vcfg in variants:
        PeakMemory(device).reset()
        base_rss = _rss_gib()
        model = instantiate(vcfg.model).to(device).train()
        if label == "itpn":
            vcfg.optimizer.params.model = model
            optimizer = instantiate(vcfg.optimizer)
        else:  # ViTDet-B recipe: layer decay 0.7 over 12 blocks, no decay on pos_embed / norms
            vcfg.optimizer.params = L(get_default_optimizer_params)(
                model=model, base_lr="${..lr}", weight_decay_norm=0.0,
                overrides={"pos_embed": {"weight_decay": 0.0}},
                lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7))
            optimizer = instantiate(vcfg.optimizer)
        if args.compile:
            model.backbone = torch.compile(model.backbone)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

        def step():  # detectron2's (AMP)Trainer.run_step on a fixed batch
            with autocast_ctx(device, args.amp):
                losses = sum(model(batch).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()

        with EventStorage(0):
            timing = measure(step, device, args.steps, args.warmup)
        name = _d2_model_name(vcfg) if label == "itpn" else "vitdet_b"
        results.append(make_result(
            "d2", f"train:{label}", args, args.batch_size, timing, device, name, base_rss,
            config=args.config, params_m=round(count_params(model), 3),
            instances_per_image=args.instances))
        del model, optimizer, step
    if len(results) == 2:
        results[0].extra["ratio_to_vitdet_b"] = round(results[0].step_ms / results[1].step_ms, 3)
    return results




def bench_infer_config(args, device: torch.device) -> List[Result]:
    """Backbone + pyramid of ``--config``'s backbone (``--model`` overrides its name), then the
    full detector."""
    from detectron2.config import instantiate

    cfg = load_d2_config(args.config, args.opts, args.model)
    name = args.model or _d2_model_name(cfg)
    S, B = args.input_size, args.batch_size
    PeakMemory(device).reset()
    base_rss = _rss_gib()
    # The detector's backbone settings (rpe, fpn_depth, ...).
    net = instantiate(cfg.model.backbone.net).to(device).eval()
    results = [time_pyramid(net, name, args, device, base_rss)]
    del net
    g = torch.Generator().manual_seed(args.seed + 1)

    # Random heads score below the default threshold; keep every detection (100 per image)
    # so that the box and mask heads do the work of a trained detector.
    heads = cfg.model.roi_heads
    for predictor in heads.get("box_predictors", None) or [heads.box_predictor]:
        predictor.test_score_thresh = 0.0
    PeakMemory(device).reset()
    base_rss = _rss_gib()
    model = instantiate(cfg.model).to(device).eval()
    if args.compile:
        model.backbone = torch.compile(model.backbone)
    inputs = [{"image": torch.randint(0, 256, (3, S, S), generator=g).float().to(device),
               "height": S, "width": S} for _ in range(B)]

    def detect():
        with torch.inference_mode(), autocast_ctx(device, args.amp):
            model(inputs)

    timing = measure(detect, device, args.steps, args.warmup)
    results.append(make_result("infer", "detector", args, B, timing, device,
                               _d2_model_name(cfg), base_rss, config=args.config,
                               params_m=round(count_params(model), 3)))
    return results



"""Pretraining benchmarks: one optimizer step of ``pretrain/main.py`` on synthetic inputs
(:func:`bench_pretrain`) and the CPU / device cost per image of the two data paths
(:func:`bench_data`), for ``tools/benchmark.py`` and ``tools/gpu_check.py``.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from itpn_d2.benchmark import (BenchmarkError, PeakMemory, Result, _rss_gib, count_params,
                               make_result, measure, sync)

TINY_CLIP = "itpn-benchmark-tiny-vit"
# A small open_clip ViT for CPU runs of the CLIP teacher (only its image tower is used).
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _clip_teacher_file(name: str, workdir: Path) -> Tuple[str, str]:
    """``(open_clip name, file)``: random weights of the open_clip model ``name`` saved to a
    file (``tiny``: a small ViT registered under :data:`TINY_CLIP`)."""
    import open_clip

    if name == "tiny":
        cfg_file = workdir / f"{TINY_CLIP}.json"
        cfg_file.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(cfg_file)
        name = TINY_CLIP
    if name not in open_clip.list_models():
        raise BenchmarkError(f"unknown open_clip model {name!r} (--clip-teacher)")
    clip = open_clip.create_model(name, pretrained=None)
    path = workdir / "clip_visual.pth"
    torch.save(clip.visual.state_dict(), path)
    return name, str(path)


def bench_pretrain(args, device: torch.device) -> List[Result]:
    """One optimizer step of training, :func:`pretrain.engine.train_step` itself, on a fixed
    synthetic batch already on the device (no data loading), per ``--mfm`` mode."""
    from pretrain.config import PretrainConfig, resolve_config
    from pretrain.data import normalize
    from pretrain.distributed import DistInfo
    from pretrain.engine import Trainer, train_step
    from pretrain.models import build_pretrain_model
    from pretrain.optim import build_optimizer, build_schedule

    results = []
    clip_name = args.clip_teacher
    if clip_name == "auto":
        clip_name = "ViT-B-16" if device.type == "cuda" else "tiny"
    with tempfile.TemporaryDirectory(prefix="itpn_bench_") as tmp:
        for mfm in args.mfm:
            teacher = {}
            if mfm == "clip":
                name, ckpt = _clip_teacher_file(clip_name, Path(tmp))
                teacher = dict(teacher=name, teacher_checkpoint=ckpt)
            cfg = resolve_config(PretrainConfig(
                model=args.model, input_size=args.input_size, batch_size=args.batch_size,
                mfm=mfm, mask_ratio=args.mask_ratio, amp=args.amp, device=str(device),
                compile=args.compile, **teacher), DistInfo(), device)

            PeakMemory(device).reset()
            base_rss = _rss_gib()
            model = build_pretrain_model(cfg).to(device)
            B = args.batch_size
            gen = torch.Generator().manual_seed(args.seed)
            trainer = Trainer(cfg, DistInfo(), device, build_schedule(cfg, B), model,
                              build_optimizer(model, cfg, device),
                              torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"), gen)
            if args.compile:
                trainer.forward = torch.compile(model)
            trainer.forward.train()
            pixels = torch.randint(0, 256, (B, 3, args.input_size, args.input_size),
                                   dtype=torch.uint8, generator=gen).to(device)

            def step():  # uint8 batch already on the device; normalised as the loader's
                train_step(trainer, iter([normalize(pixels)]), step=0)

            timing = measure(step, device, args.steps, args.warmup)
            label = "mim" if mfm == "none" else f"mim+mfm({mfm})"
            extra = {"params_m": round(count_params(model), 3), "mfm": mfm,
                     "mask_ratio": args.mask_ratio}
            if mfm == "clip":
                extra["clip_teacher"] = clip_name
            results.append(make_result("pretrain", label, args, B, timing, device, args.model,
                                       base_rss, **extra))
            del model, trainer, step
    if len(results) > 1 and results[0].extra["mfm"] == "none":
        for r in results[1:]:
            r.extra["vs_mim"] = round(r.step_ms / results[0].step_ms, 3)
    return results


# --------------------------------------------------------------------------- data path


def make_jpeg_corpus(folder: Path, count: int = 256, size: Tuple[int, int] = (500, 375),
                     quality: int = 90, seed: int = 0) -> List[Path]:
    """``count`` ImageNet-like JPEGs (``size`` = width, height) under ``folder``: smooth random
    colour fields plus grain (+-24 levels), about 80 KiB each at 500x375 and quality 90
    (ImageNet's are ~110 KiB), so decoding costs about what it costs on photos. ~6 ms each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    pad = 64  # one grain field for the corpus, cut at a random offset per image
    grain = rng.integers(-24, 25, (h + pad, w + pad, 3), dtype=np.int16)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        dy, dx = rng.integers(0, pad, 2)
        img = np.clip(img + grain[dy:dy + h, dx:dx + w], 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.JPEG"
        Image.fromarray(img).save(path, quality=quality)
        paths.append(path)
    return paths


def data_steps(dataset_pil, dataset_bytes, device: torch.device, batch: int, seed: int
               ) -> Tuple[Dict[str, Callable[[int], Any]], Callable[[int], Any]]:
    """One callable per data path, each processing batch ``k`` of the corpus (cycling), and
    the function that reads batch ``k``'s bytes for ``decode`` / ``gpu_path`` ahead."""
    from pretrain.gpu_data import GPUDecoder, collate_encoded, decode_jpegs

    n = len(dataset_pil)
    rng = random.Random(seed)
    seeds = [rng.getrandbits(62) for _ in range(n)]

    def items(k: int):
        return [((k * batch + j) % n, seeds[(k * batch + j) % n]) for j in range(batch)]

    decoder = GPUDecoder(device, dataset_pil.input_size)
    encoded = {}  # batch k -> EncodedBatch (decode / gpu_path time the device part only)

    def encoded_batch(k: int):
        if k not in encoded:
            encoded[k] = collate_encoded([dataset_bytes[it] for it in items(k)])[0]
        return encoded[k]

    def decode(k: int):
        b = encoded_batch(k)
        return decode_jpegs([b.data[b.offsets[i]:b.offsets[i + 1]] for i in range(len(b))],
                            device)

    return {
        "pil": lambda k: torch.stack([dataset_pil[it][0] for it in items(k)]),
        "read_bytes": lambda k: collate_encoded([dataset_bytes[it] for it in items(k)]),
        "decode": decode,
        "gpu_path": lambda k: decoder(encoded_batch(k)),
    }, encoded_batch


def time_data(step: Callable[[int], Any], device: torch.device, steps: int, warmup: int
              ) -> Dict[str, Any]:
    """As :func:`itpn_d2.benchmark.measure`, with the batch index handed to ``step`` and the
    process CPU time (``cpu_ms`` per step) on every device: the data path's cost is CPU."""
    for k in range(warmup):
        step(k)
    sync(device)
    mem = PeakMemory(device)
    mem.reset()
    times = []
    cpu0 = time.process_time()
    for k in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(k)
        sync(device)
        times.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) / steps * 1e3
    return {"step_ms": sum(times) / steps * 1e3, "step_ms_min": min(times) * 1e3,
            "step_ms_median": sorted(times)[steps // 2] * 1e3, "peak_mem_gib": mem.peak_gib(),
            "mem_kind": mem.kind, "cpu_ms": cpu_ms}


def bench_data(args, device: torch.device) -> List[Result]:
    """CPU milliseconds per image (``cpu_ms_per_image``, process CPU time of all threads) and
    wall time of each data path of ``--paths`` on a folder of JPEGs (``--data-path``, or a
    generated corpus). Each timed step is one batch; ``decode`` and ``gpu_path`` take bytes
    already read (their batches are read once, before timing)."""
    from pretrain.data import PretrainImages
    from pretrain.gpu_data import EncodedImages

    with tempfile.TemporaryDirectory(prefix="itpn_data_bench_") as tmp:
        root = args.data_path
        corpus = None
        if root is None:
            make_jpeg_corpus(Path(tmp), args.images, tuple(args.image_size), args.quality,
                             args.seed)
            root = tmp
            corpus = {"corpus_images": args.images, "corpus_size": list(args.image_size),
                      "corpus_quality": args.quality}
        files = sorted(p for p in Path(root).rglob("*") if p.is_file())
        mean_kib = sum(p.stat().st_size for p in files) / max(len(files), 1) / 1024
        pil = PretrainImages(root, args.input_size)
        raw = EncodedImages(root, args.input_size)
        steps, prefetch = data_steps(pil, raw, device, args.batch_size, args.seed)
        results = []
        for name in args.paths:
            if name in ("decode", "gpu_path"):  # their input: bytes already read
                for k in range(args.warmup + args.steps):
                    prefetch(k)
            timing = time_data(steps[name], device, args.steps, args.warmup)
            extra = {"cpu_ms": timing["cpu_ms"],
                     "cpu_ms_per_image": timing["cpu_ms"] / args.batch_size,
                     "wall_ms_per_image": timing["step_ms"] / args.batch_size,
                     "images_in_folder": len(pil), "mean_file_kib": round(mean_kib, 1),
                     **(corpus or {"data_path": str(root)})}
            results.append(make_result("data", name, args, args.batch_size, timing, device,
                                       "-", **extra))
    return results

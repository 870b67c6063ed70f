"""Every benchmark of iTPN-D2, for ``tools/benchmark.py`` (:func:`cli`) and
``tools/gpu_check.py`` (:func:`run_benchmark`): pretraining steps and data paths, Detectron2
training iterations (with Detectron2's ViTDet-B beside them) and inference. ``pretrain`` and
detectron2 are imported only by the benchmarks that need them.

Timing: ``--warmup`` untimed steps (they include ``torch.compile``), then ``--steps`` timed
steps, each ended by a device synchronisation. ``step_ms`` is the mean timed step, ``img_s``
= batch / mean step. Inputs are synthetic and already on the device: data loading is not timed
(``tools/benchmark.py data`` times the data paths on their own).
On CUDA, one more (untimed) step runs under ``torch.cuda.set_sync_debug_mode("warn")``:
``host_syncs_per_step`` counts the synchronising calls and ``host_sync_sites`` names their
lines. On the CPU, ``cpu_ms`` is the process CPU time (all threads) per timed step and
``loadavg_1m`` the load when the row was measured: on a shared machine ``step_ms`` grows with
the load, ``cpu_ms`` much less (``--threads 1`` gives the cost per core).

Peak memory (``peak_mem_gib``, how it was measured in ``mem_kind``):

* CUDA (``cuda_max_allocated``): ``torch.cuda.max_memory_allocated`` over the timed steps (reset
  after warm-up); tensors only, without the caching allocator's slack and the CUDA context.
* CPU (``cpu_peak_rss``): the process's peak resident set size (``VmHWM``) over the timed steps,
  reset after warm-up by writing 5 to ``/proc/self/clear_refs`` (after freeing cached heap with
  ``malloc_trim``). It includes the interpreter and libraries (``base_rss_gib``, the resident size
  before the model was built, is reported beside it) and, after an earlier configuration in the
  same process, heap that glibc kept. Where the reset is not allowed (``cpu_max_rss``) it is
  ``getrusage``'s ``ru_maxrss``: the peak over the whole process life.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from itpn_d2.errors import EXIT_USER_ERROR, UserError

GIB = 1024 ** 3
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
MFM_CHOICES = ("none", "ema", "clip")


class BenchmarkError(UserError, ValueError):
    """Bad benchmark settings (reported as one ``error:`` line)."""


# --------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class PeakMemory:
    """Peak memory over a section: CUDA allocator statistics, or the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back before the reset
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.kind = "cpu_max_rss"

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        if self.kind == "cpu_peak_rss":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / GIB
        # ru_maxrss is in KiB on Linux (bytes on macOS).
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


@dataclass
class Result:
    bench: str  # pretrain | d2 | infer
    name: str  # configuration label
    model: str
    batch_size: int
    input_size: int
    amp: str
    compile: bool
    step_ms: float
    img_s: float
    peak_mem_gib: float
    mem_kind: str
    device: str
    device_name: str
    torch: str = torch.__version__
    steps: int = 0
    warmup: int = 0
    step_ms_min: float = 0.0
    step_ms_median: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """Synchronising CUDA calls (``.item()``, blocking copies, ``nonzero``...) during one
    ``step``, from ``torch.cuda.set_sync_debug_mode``, with the lines that made them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync(device)
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})
    return {"host_syncs_per_step": len(hits), "host_sync_sites": sites[:20]}


def measure(step: Callable[[], Any], device: torch.device, steps: int, warmup: int
            ) -> Dict[str, Any]:
    """Run ``step`` ``warmup`` times, then time ``steps`` runs (each ended by a device sync);
    on CUDA, one more step counts host synchronisations (untimed)."""
    for _ in range(warmup):
        step()
    sync(device)
    mem = PeakMemory(device)
    mem.reset()
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    cpu_s = time.process_time() - cpu0
    mean = sum(times) / len(times)
    out = {"step_ms": mean * 1e3, "step_ms_min": min(times) * 1e3,
           "step_ms_median": statistics.median(times) * 1e3,
           "peak_mem_gib": mem.peak_gib(), "mem_kind": mem.kind}
    if device.type == "cuda":
        out["extra"] = count_host_syncs(step, device)
    else:
        # CPU seconds of all threads per step: unlike step_ms, barely affected by other
        # processes on a shared machine (a single-thread run gives the cost per core).
        out["extra"] = {"cpu_ms": cpu_s / steps * 1e3}
    return out


def host_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"threads": torch.get_num_threads()}
    if device.type == "cpu":
        # Benchmarks on a shared CPU are only as good as its load: record it.
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
        info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    return info


def make_result(bench: str, name: str, args, batch: int, timing: Dict[str, Any],
                device: torch.device, model: str, base_rss: Optional[float] = None,
                **extra) -> Result:
    step_s = timing["step_ms"] / 1e3
    if base_rss is not None and device.type == "cpu":
        extra["base_rss_gib"] = round(base_rss, 3)
    return Result(
        bench=bench, name=name, model=model, batch_size=batch, input_size=args.input_size,
        amp=args.amp, compile=bool(args.compile), step_ms=timing["step_ms"],
        img_s=batch / step_s, peak_mem_gib=timing["peak_mem_gib"], mem_kind=timing["mem_kind"],
        device=str(device), device_name=device_name(device), steps=args.steps,
        warmup=args.warmup, step_ms_min=timing["step_ms_min"],
        step_ms_median=timing["step_ms_median"],
        extra={**host_info(device), **timing.get("extra", {}), **extra})


def autocast_ctx(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def count_params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


# --------------------------------------------------------------------------- inference


def time_pyramid(net: torch.nn.Module, name: str, args, device: torch.device,
                 base_rss: Optional[float] = None) -> Result:
    """Backbone + pyramid (``net.forward_pyramid``) on a random batch, eval mode."""
    B, S = args.batch_size, args.input_size
    fwd = torch.compile(net.forward_pyramid) if args.compile else net.forward_pyramid
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(B, 3, S, S, generator=g).to(device)

    def step():
        with torch.inference_mode(), autocast_ctx(device, args.amp):
            fwd(images)

    timing = measure(step, device, args.steps, args.warmup)
    return make_result("infer", "backbone+pyramid", args, B, timing, device, name, base_rss,
                       params_m=round(count_params(net), 3))


def bench_infer(args, device: torch.device) -> List[Result]:
    """Backbone + pyramid of ``--model`` (default itpn_base); the ``--config`` variant, which
    also times the detector, is :func:`bench_infer_config`."""
    from itpn_d2.modeling import build_itpn

    name = args.model or "itpn_base"
    PeakMemory(device).reset()
    base_rss = _rss_gib()
    net = build_itpn(name).to(device).eval()
    return [time_pyramid(net, name, args, device, base_rss)]


# --------------------------------------------------------------------------- settings


TABLE = [("bench", "{}"), ("name", "{}"), ("model", "{}"), ("batch_size", "{}"),
         ("input_size", "{}"), ("amp", "{}"), ("compile", "{}"), ("step_ms", "{:.1f}"),
         ("img_s", "{:.2f}"), ("peak_mem_gib", "{:.3f}")]


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    cells = [[k for k, _ in TABLE]] + [[fmt.format(r[k]) for k, fmt in TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        r = rows[0]
        lines.append(f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, "
                     f"{r['steps']} timed steps after {r['warmup']} warm-up; memory: "
                     f"{r['mem_kind']}")
    for r in rows:
        for key in ("vs_mim", "ratio_to_vitdet_b", "cpu_ms_per_image"):
            if key in r:
                lines.append(f"{r['name']}: {key} = {r[key]:.3f}")
    return "\n".join(lines)


def get_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The settings of ``tools/benchmark.py`` (also parsed by ``tools/gpu_check.py``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    common.add_argument("--batch-size", type=int, default=None,
                        help="images per step (default: pretrain 256, d2 2, infer 8, "
                             "data 64)")
    common.add_argument("--input-size", type=int, default=None,
                        help="square image side (default: pretrain/data 224, d2/infer "
                             "1024)")
    common.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                        help="autocast dtype (default: bf16 on CUDA, off on the CPU)")
    common.add_argument("--compile", action="store_true",
                        help="torch.compile the model (d2: the backbone)")
    common.add_argument("--steps", type=int, default=10, help="timed steps")
    common.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--json", action="store_true",
                        help="print one JSON object per configuration instead of a table")

    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pretrain", parents=[common], help="pretraining step (MIM / MFM)")
    s.add_argument("--model", default="itpn_base", help="itpn_nano ... itpn_large")
    s.add_argument("--mfm", nargs="+", choices=MFM_CHOICES, default=list(MFM_CHOICES),
                   help="configurations: MIM only (none), MIM+MFM with the ema / clip teacher")
    s.add_argument("--mask-ratio", type=float, default=0.75)
    s.add_argument("--clip-teacher", default="auto",
                   help="open_clip model of the CLIP teacher (random weights), 'tiny' for a "
                        "small ViT (default auto: ViT-B-16 on CUDA, tiny on the CPU)")
    s = sub.add_parser("d2", parents=[common], help="Detectron2 training iteration")
    s.add_argument("--config", required=True, help="LazyConfig file (configs/...)")
    s.add_argument("--model", default=None, help="override model.backbone.net.name")
    s.add_argument("--vitdet", action="store_true",
                   help="also time Detectron2's ViTDet-B with the same heads, report the ratio")
    s.add_argument("--instances", type=int, default=8, help="ground-truth objects per image")
    s.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="LazyConfig overrides key=value")
    s = sub.add_parser("infer", parents=[common], help="inference throughput")
    s.add_argument("--model", default=None,
                   help="backbone + pyramid of this model (default itpn_base without --config)")
    s.add_argument("--config", default=None, help="also time this LazyConfig's full detector")
    s.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="LazyConfig overrides key=value")
    s = sub.add_parser("data", parents=[common],
                       help="pretraining data path: CPU ms per image of the PIL and GPU paths")
    s.add_argument("--data-path", default=None,
                   help="folder of images (default: a generated JPEG corpus, see --images)")
    s.add_argument("--images", type=int, default=256, help="generated corpus: image count")
    s.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="generated corpus: image width and height (a typical ImageNet size)")
    s.add_argument("--quality", type=int, default=90, help="generated corpus: JPEG quality")
    s.add_argument("--paths", nargs="+", choices=DATA_PATHS, default=list(DATA_PATHS),
                   help="pil: PIL decode + crop (the default loader's worker); read_bytes: the "
                        "GPU path's worker (bytes, header, crop box); decode: torchvision "
                        "decode_jpeg on --device; gpu_path: decode + orient + crop/resize/flip "
                        "on --device (the GPU path's training-process share)")
    return p


DATA_PATHS = ("pil", "read_bytes", "decode", "gpu_path")
DEFAULTS = {"pretrain": (256, 224), "d2": (2, 1024), "infer": (8, 1024), "data": (64, 224)}


def resolve(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise BenchmarkError(f"unsupported device {name!r}; use cpu or cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda requested but CUDA is not available")
    batch, size = DEFAULTS[args.command]
    args.batch_size = args.batch_size or batch
    args.input_size = args.input_size or size
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise BenchmarkError("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.input_size % 32 and args.command != "pretrain":
        raise BenchmarkError(f"--input-size {args.input_size} must be a multiple of 32")
    if args.input_size % 16:
        raise BenchmarkError(f"--input-size {args.input_size} must be a multiple of 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device


# --------------------------------------------------------------------------- pretraining

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


# --------------------------------------------------------------------------- Detectron2


def load_d2_config(path: str, overrides: Sequence[str], model_name: Optional[str]):
    from itpn_d2.d2.config import load_config

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


# --------------------------------------------------------------------------- entry points


def run_benchmark(args: argparse.Namespace, device: torch.device) -> List[Result]:
    """The benchmark of parsed ``args`` (:func:`get_parser`): detectron2 is imported only for
    ``d2`` / ``infer --config``, the ``pretrain`` package only for ``pretrain`` / ``data``."""
    if args.command in ("pretrain", "data"):
        try:
            import pretrain  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "pretrain":
                raise
            raise UserError("the pretrain package is not importable: install the repository "
                            "(pip install -e .) or set PYTHONPATH to its root") from None
        return (bench_pretrain if args.command == "pretrain" else bench_data)(args, device)
    if args.command == "d2":
        return bench_d2(args, device)
    return (bench_infer_config if args.config else bench_infer)(args, device)


def main(argv: Optional[Sequence[str]] = None, description: Optional[str] = None
         ) -> List[Dict[str, Any]]:
    """Run the benchmark of ``argv``; print the table (or JSON lines) and return the rows."""
    args = get_parser(description or __doc__).parse_args(argv)
    device = resolve(args)
    rows = [r.as_dict() for r in run_benchmark(args, device)]
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(format_table(rows), flush=True)
    return rows


def cli(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    """``tools/benchmark.py``: errors give one ``error:`` line and exit status 2."""
    try:
        main(argv, description)
    except (BenchmarkError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0

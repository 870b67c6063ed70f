"""Timing and memory of one training step or inference batch, and the benchmark settings.

The measurement core of ``tools/benchmark.py`` and ``tools/gpu_check.py`` (pretraining steps:
``pretrain.benchmark``; Detectron2 iterations and detectors: ``itpn_d2.d2.benchmark``); this
module imports no detectron2.

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
import ctypes
import gc
import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from itpn_d2.errors import UserError

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
    also times the detector, is :func:`itpn_d2.d2.benchmark.bench_infer_config`."""
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



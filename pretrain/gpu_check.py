"""One check of a CUDA machine: the GPU-only tests and the performance targets, one JSON report.

``tools/gpu_check.py`` runs, on one CUDA device, these groups in order (``--only`` picks some):

* ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` in a subprocess; each test's outcome comes
  from pytest's JUnit XML file (bf16 autocast in pretraining and in the recipes, fused AdamW,
  exact resume on CUDA, ``--decode gpu``, AMPTrainer iterations of the toy recipe and of
  ``mask_rcnn_itpn_b`` at 1024, the UPerNet recipe's slide inference).
* ``pretrain``: ``itpn_base`` step at batch 256, 224 px, bf16 (``itpn_d2.benchmark``): MIM and
  MIM+MFM(ema) without compile, then MIM with ``torch.compile`` (full check only).
* ``infer``: ``itpn_base`` backbone + pyramid at 1024x1024, batch 8.
* ``d2``: Mask R-CNN ``itpn_base`` training iteration at 1024, batch 2, and the same detector
  with ViTDet-B (``itpn_d2.benchmark``).
* ``data``: the pretraining data paths on a generated JPEG corpus (500x375, quality 90), and
  ``pretrain/main.py --decode gpu`` end to end against the synthetic-input MIM step.

Each check has a figure, a unit, a target and a status (``pass`` / ``fail`` / ``error``; tests
may also be ``skip``). The report is rewritten after every group, so a run cut short still
leaves what it measured. ``--quick`` skips compilation and takes fewer steps.

Time plan on one H100 / H200 (estimates until the first run replaces them): full ~4 min
(tests ~50 s, the compiled MIM step ~60-90 s, everything else ~90 s); ``--quick`` ~2 min.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from itpn_d2.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = "tests/test_gpu.py"
STATUSES = ("pass", "fail", "error", "skip")
class GPUCheckError(UserError):
    """The check cannot run here (no CUDA device, unknown group)."""


@dataclass(frozen=True)
class Target:
    """``figure <op> value``; ``op`` is ``>=``, ``<=`` or ``==``."""

    op: str
    value: float

    def met(self, figure: float) -> bool:
        if self.op == ">=":
            return figure >= self.value
        if self.op == "<=":
            return figure <= self.value
        if self.op == "==":
            return figure == self.value
        raise ValueError(f"unknown target operator {self.op!r}")

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Plan:
    """Step counts and settings of one run (see :func:`make_plan`)."""

    quick: bool
    compile: bool
    steps: int  # timed steps per benchmark
    warmup: int  # untimed steps first (without compile)
    compile_warmup: int  # untimed steps of the compiled model (they include compilation)
    data_images: int  # generated corpus size
    data_steps: int  # timed batches per data path
    e2e_batch: int  # pretrain/main.py --decode gpu: batch size
    e2e_epochs: int  # ... epochs over the corpus (the first is not counted)


def make_plan(quick: bool) -> Plan:
    """Full: compile, 10 timed steps; quick: no compile, 5 timed steps, a smaller corpus."""
    if quick:
        return Plan(quick=True, compile=False, steps=5, warmup=2, compile_warmup=0,
                    data_images=512, data_steps=2, e2e_batch=128, e2e_epochs=2)
    return Plan(quick=False, compile=True, steps=10, warmup=3, compile_warmup=3,
                data_images=1024, data_steps=3, e2e_batch=256, e2e_epochs=3)


@dataclass
class CheckResult:
    name: str
    group: str
    figure: Optional[float]
    unit: str
    target: Optional[Target]
    status: str
    seconds: float
    details: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["target"] = None if self.target is None else {"op": self.target.op,
                                                         "value": self.target.value,
                                                         "text": str(self.target)}
        if isinstance(self.figure, float):
            d["figure"] = round(self.figure, 4)
        d["seconds"] = round(self.seconds, 2)
        return d


@dataclass(frozen=True)
class CheckSpec:
    """A target on one figure of a group's measurements (``figure(measured)``)."""

    name: str
    unit: str
    target: Callable[[Plan], Target]
    figure: Callable[[Dict[str, Any]], float]
    note: str = ""


def judge(spec: CheckSpec, group: str, measured: Optional[Dict[str, Any]], plan: Plan,
          seconds: float, error: Optional[str] = None) -> CheckResult:
    """The result of ``spec`` on a group's measurements (``error`` if the group failed)."""
    target = spec.target(plan)
    details: Dict[str, Any] = {"note": spec.note} if spec.note else {}
    if error is not None or measured is None:
        return CheckResult(spec.name, group, None, spec.unit, target, "error", seconds,
                           {**details, "error": error or "not measured"})
    try:
        figure = float(spec.figure(measured))
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        return CheckResult(spec.name, group, None, spec.unit, target, "error", seconds,
                           {**details, "error": f"{type(e).__name__}: {e}"})
    status = "pass" if target.met(figure) else "fail"
    return CheckResult(spec.name, group, figure, spec.unit, target, status, seconds, details)


# --------------------------------------------------------------------------- measurements


def bench_rows(argv: Sequence[str]) -> List[Dict[str, Any]]:
    """Rows of ``tools/benchmark.py argv`` (same parser and functions, no subprocess)."""
    from itpn_d2.benchmark import get_parser, resolve, run_benchmark

    args = get_parser().parse_args(list(argv))
    return [r.as_dict() for r in run_benchmark(args, resolve(args))]


def _steps(plan: Plan, compiled: bool = False) -> List[str]:
    warmup = plan.compile_warmup if compiled else plan.warmup
    return ["--steps", str(plan.steps), "--warmup", str(warmup)]


def measure_pretrain(plan: Plan, ctx: Dict[str, Any]) -> Dict[str, Any]:
    common = ["pretrain", "--model", "itpn_base", "--device", "cuda", "--batch-size", "256",
              "--input-size", "224", "--amp", "bf16"]
    eager = bench_rows(common + ["--mfm", "none", "ema"] + _steps(plan))
    out = {"mim": eager[0], "mfm_ema": eager[1], "mim_eager": eager[0]}
    if plan.compile:
        out["mim"] = bench_rows(common + ["--mfm", "none", "--compile"] + _steps(plan, True))[0]
    ctx["synthetic_mim_img_s"] = eager[0]["img_s"]
    return out


def measure_infer(plan: Plan, ctx: Dict[str, Any]) -> Dict[str, Any]:
    rows = bench_rows(["infer", "--model", "itpn_base", "--device", "cuda", "--input-size",
                       "1024", "--batch-size", "8", "--amp", "bf16"] + _steps(plan))
    return {"pyramid": rows[0]}


def measure_d2(plan: Plan, ctx: Dict[str, Any]) -> Dict[str, Any]:
    rows = bench_rows(["d2", "--config", str(ROOT / "configs/coco/mask_rcnn_itpn_b.py"),
                       "--device", "cuda", "--input-size", "1024", "--batch-size", "2",
                       "--amp", "bf16", "--vitdet"] + _steps(plan))
    return {"itpn": rows[0], "vitdet_b": rows[1]}


def e2e_img_s(log_file: Path) -> float:
    """Mean ``img_per_s`` of the epochs after the first in a pretraining ``log.txt`` (the first
    holds worker start-up and cuDNN autotuning)."""
    epochs = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    later = [e["img_per_s"] for e in epochs[1:]]
    if not later:
        raise ValueError(f"{log_file} holds {len(epochs)} epoch(s); need 2 or more")
    return sum(later) / len(later)


def measure_data(plan: Plan, ctx: Dict[str, Any]) -> Dict[str, Any]:
    from itpn_d2.benchmark import make_jpeg_corpus
    from pretrain.main import main as pretrain_main

    workdir = Path(ctx["workdir"])
    corpus = workdir / "corpus"
    t0 = time.perf_counter()
    make_jpeg_corpus(corpus, plan.data_images, (500, 375), 90)
    made_s = time.perf_counter() - t0
    rows = bench_rows(["data", "--device", "cuda", "--data-path", str(corpus),
                       "--batch-size", "256", "--input-size", "224", "--steps",
                       str(plan.data_steps), "--warmup", "1",
                       "--paths", "pil", "read_bytes", "gpu_path"])
    by_name = {r["name"]: r for r in rows}
    out_dir = workdir / "e2e"
    pretrain_main(["--model", "itpn_base", "--mfm", "none", "--data_path", str(corpus),
                   "--batch_size", str(plan.e2e_batch), "--epochs", str(plan.e2e_epochs),
                   "--warmup_epochs", "0", "--decode", "gpu", "--device", "cuda",
                   "--vis_images", "0", "--save_every", "1000", "--log_every", "1000",
                   "--output_dir", str(out_dir)])
    if "synthetic_mim_img_s" not in ctx or plan.e2e_batch != 256:
        ctx["synthetic_mim_img_s"] = bench_rows(
            ["pretrain", "--model", "itpn_base", "--device", "cuda", "--batch-size",
             str(plan.e2e_batch), "--input-size", "224", "--amp", "bf16", "--mfm", "none"]
            + _steps(plan))[0]["img_s"]
    return {**by_name, "corpus": {"images": plan.data_images, "size": [500, 375],
                                  "quality": 90, "generated_s": round(made_s, 1)},
            "e2e_img_s": e2e_img_s(out_dir / "log.txt"),
            "synthetic_mim_img_s": ctx["synthetic_mim_img_s"], "e2e_batch": plan.e2e_batch}


GROUPS: Dict[str, Callable[[Plan, Dict[str, Any]], Dict[str, Any]]] = {
    "pretrain": measure_pretrain, "infer": measure_infer, "d2": measure_d2,
    "data": measure_data,
}

CHECKS: Dict[str, List[CheckSpec]] = {
    "pretrain": [
        CheckSpec("pretrain_mim_img_s", "img/s",
                  lambda p: Target(">=", 3600 if p.compile else 2400),
                  lambda m: m["mim"]["img_s"],
                  "itpn_base MIM step, batch 256, 224 px, bf16; 3600 with --compile (full "
                  "check), 2400 without (--quick)"),
        CheckSpec("pretrain_mim_peak_mem_gib", "GiB", lambda p: Target("<=", 20),
                  lambda m: m["mim"]["peak_mem_gib"], "torch.cuda.max_memory_allocated"),
        CheckSpec("pretrain_mfm_ema_vs_mim", "x", lambda p: Target("<=", 1.7),
                  lambda m: m["mfm_ema"]["step_ms"] / m["mim_eager"]["step_ms"],
                  "MIM+MFM(ema) step / MIM step, both without compile (one compilation fewer "
                  "keeps the check within its time)"),
        CheckSpec("pretrain_host_syncs_per_step", "syncs", lambda p: Target("==", 0),
                  lambda m: max(m[k]["host_syncs_per_step"] for k in ("mim", "mfm_ema",
                                                                      "mim_eager")),
                  "torch.cuda.set_sync_debug_mode('warn') over one step, worst configuration"),
    ],
    "infer": [
        CheckSpec("infer_pyramid_img_s", "img/s", lambda p: Target(">=", 160),
                  lambda m: m["pyramid"]["img_s"],
                  "itpn_base backbone + pyramid, 1024x1024, batch 8, bf16, no compile"),
    ],
    "d2": [
        CheckSpec("d2_mask_rcnn_ratio_to_vitdet_b", "x", lambda p: Target("<=", 1.0),
                  lambda m: m["itpn"]["step_ms"] / m["vitdet_b"]["step_ms"],
                  "Mask R-CNN training iteration at 1024, batch 2, bf16: itpn_base / "
                  "ViTDet-B with the same heads"),
    ],
    "data": [
        CheckSpec("data_gpu_path_img_s", "img/s", lambda p: Target(">=", 3600),
                  lambda m: m["gpu_path"]["img_s"],
                  "nvjpeg decode + crop/resize/flip of 500x375 JPEGs, batch 256: must keep up "
                  "with the compiled MIM step"),
        CheckSpec("data_gpu_path_cpu_ms_per_image", "ms", lambda p: Target("<=", 1.0),
                  lambda m: (m["read_bytes"]["cpu_ms_per_image"]
                             + m["gpu_path"]["cpu_ms_per_image"]),
                  "CPU time per image of the GPU path (worker: read bytes; main process: "
                  "decode submission and the crop loop): 4,500 img/s on <= 4.5 cores"),
        CheckSpec("data_e2e_vs_synthetic", "x", lambda p: Target(">=", 0.9),
                  lambda m: m["e2e_img_s"] / m["synthetic_mim_img_s"],
                  "pretrain/main.py --decode gpu --mfm none img/s on the corpus / the "
                  "synthetic-input MIM step (same batch, no compile)"),
    ],
}
ALL_GROUPS = ("gpu_tests",) + tuple(GROUPS)


# --------------------------------------------------------------------------- tests


def parse_junit(path: Path) -> List[CheckResult]:
    """One :class:`CheckResult` per test case of a pytest JUnit XML file."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "pass", ""
        for child in case:
            kind = {"failure": "fail", "error": "error", "skipped": "skip"}.get(child.tag)
            if kind is not None:
                status, message = kind, (child.get("message") or child.text or "")[:1000]
                break
        name = f"test:{case.get('name')}"
        details = {"classname": case.get("classname")}
        if message:
            details["message"] = message
        results.append(CheckResult(name, "gpu_tests", None, "", None, status,
                                   float(case.get("time") or 0.0), details))
    return results


def run_gpu_tests(workdir: Path, test_path: str = GPU_TESTS, cwd: Path = ROOT,
                  timeout_s: float = 300.0) -> List[CheckResult]:
    """``pytest -m gpu test_path`` in a subprocess (deterministic cuBLAS for the exact-resume
    test); the outcomes come from its JUnit XML file, not from printed text."""
    xml = workdir / "gpu_tests.xml"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", test_path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout_s)
        code: Any = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if not xml.is_file():
        return [CheckResult("test:pytest", "gpu_tests", None, "", None, "error",
                            time.perf_counter() - t0, {"error": f"pytest exit {code}, no "
                                                                 f"JUnit report"})]
    results = parse_junit(xml)
    if not results or code == "timeout":
        results.append(CheckResult("test:pytest", "gpu_tests", None, "", None, "error",
                                   time.perf_counter() - t0, {"error": f"pytest exit {code}"}))
    return results


# --------------------------------------------------------------------------- report


def environment(device: torch.device) -> Dict[str, Any]:
    """Device and library versions for the report (detectron2 read from its metadata, not
    imported)."""
    import importlib.metadata

    import torchvision

    try:
        d2_version: Optional[str] = importlib.metadata.version("detectron2")
    except importlib.metadata.PackageNotFoundError:
        d2_version = None
    env: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "torchvision": torchvision.__version__,
                           "python": platform.python_version(), "detectron2": d2_version,
                           "host": platform.node(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 1024 ** 3, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = "cpu"
    return env


def summarize(results: Sequence[CheckResult]) -> Dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] += 1
    return counts


def write_report(path: Path, env: Dict[str, Any], plan: Plan, results: Sequence[CheckResult],
                 seconds: float, done: bool) -> Dict[str, Any]:
    """Write the JSON report (through a temporary file: a reader never sees half of it)."""
    report = {"environment": env, "plan": asdict(plan), "complete": done,
              "seconds": round(seconds, 1), "summary": summarize(results),
              "checks": [r.as_dict() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return report


def format_line(r: CheckResult) -> str:
    figure = "" if r.figure is None else f"{r.figure:.4g} {r.unit}"
    target = "" if r.target is None else f" (target {r.target})"
    return f"{r.status.upper():5s} {r.name}: {figure}{target} [{r.seconds:.1f} s]"


def plan_lines(plan: Plan, groups: Sequence[str]) -> List[str]:
    """What a run of ``groups`` under ``plan`` would check (``--list``)."""
    lines = [f"plan: {asdict(plan)}"]
    for g in groups:
        if g == "gpu_tests":
            lines.append(f"gpu_tests: pytest -m gpu {GPU_TESTS} (one check per test)")
        for spec in CHECKS.get(g, []):
            lines.append(f"{g}: {spec.name} {spec.target(plan)} {spec.unit}: {spec.note}")
    return lines


def resolve_groups(only: Optional[Sequence[str]]) -> List[str]:
    groups = list(only) if only else list(ALL_GROUPS)
    unknown = [g for g in groups if g not in ALL_GROUPS]
    if unknown:
        raise GPUCheckError(f"unknown check group(s) {', '.join(unknown)} (--only); choose from "
                            f"{', '.join(ALL_GROUPS)}")
    return groups


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise GPUCheckError("no CUDA device: tools/gpu_check.py measures a GPU; run it on a "
                            "machine with one (tools/gpu_check.py --list shows the plan)")
    return torch.device("cuda")


def run_check(output: Path, plan: Plan, groups: Sequence[str], device: torch.device,
              measurers: Optional[Dict[str, Callable[[Plan, Dict[str, Any]], Dict[str, Any]]]]
              = None, tests: Callable[[Path], List[CheckResult]] = run_gpu_tests,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run ``groups`` and write the report to ``output`` after each; returns the report.

    A group that raises gives ``error`` results for its checks and the run goes on.
    ``measurers`` / ``tests`` replace :data:`GROUPS` / :func:`run_gpu_tests` (tests use that).
    """
    measurers = GROUPS if measurers is None else measurers
    env = environment(device)
    log(f"gpu_check on {env['device_name']} (torch {env['torch']}, CUDA {env['cuda']}, "
        f"torchvision {env['torchvision']}, Python {env['python']}); "
        f"{'quick' if plan.quick else 'full'} plan; report {output}")
    results: List[CheckResult] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="itpn_gpu_check_") as tmp:
        ctx: Dict[str, Any] = {"workdir": tmp}
        write_report(output, env, plan, results, 0.0, done=False)
        for group in groups:
            t0 = time.perf_counter()
            if group == "gpu_tests":
                new = tests(Path(tmp))
            else:
                measured, error = None, None
                try:
                    measured = measurers[group](plan, ctx)
                except Exception as e:  # one broken group must not lose the others' figures
                    error = f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - t0
                new = [judge(spec, group, measured, plan, seconds, error)
                       for spec in CHECKS[group]]
                if measured is not None:
                    new[0].details["measured"] = measured
            for r in new:
                log(format_line(r))
            results.extend(new)
            write_report(output, env, plan, results, time.perf_counter() - t_start, done=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = write_report(output, env, plan, results, time.perf_counter() - t_start, done=True)
    s = report["summary"]
    log(f"gpu_check: {s['pass']} pass, {s['fail']} fail, {s['error']} error, {s['skip']} skip "
        f"in {report['seconds']:.0f} s; report {output}")
    return report

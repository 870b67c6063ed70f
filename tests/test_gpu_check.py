"""The CPU side of tools/gpu_check.py: targets, the check registry, the plans, the JSON report,
JUnit outcomes of the GPU tests, and the one-line error without CUDA."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _pretrain_utils import REPO  # noqa: F401  (puts the repo root on sys.path)
from pretrain import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_check.py"


@pytest.mark.parametrize("op, value, figure, met", [
    (">=", 3600, 3600.0, True), (">=", 3600, 3599.9, False), ("<=", 1.7, 1.71, False),
    ("<=", 20, 19.5, True), ("==", 0, 0, True), ("==", 0, 2, False)])
def test_target(op, value, figure, met):
    assert gc.Target(op, value).met(figure) is met


def test_judge_pass_fail_and_error():
    spec = gc.CheckSpec("x_img_s", "img/s", lambda p: gc.Target(">=", 3600 if p.compile else 2400),
                        lambda m: m["row"]["img_s"])
    full, quick = gc.make_plan(False), gc.make_plan(True)
    assert gc.judge(spec, "g", {"row": {"img_s": 3000.0}}, full, 1.0).status == "fail"
    ok = gc.judge(spec, "g", {"row": {"img_s": 3000.0}}, quick, 1.0)
    assert (ok.status, ok.figure, str(ok.target)) == ("pass", 3000.0, ">= 2400")
    missing = gc.judge(spec, "g", {"other": {}}, full, 1.0)
    assert missing.status == "error" and missing.details["error"] == "KeyError: 'row'"
    crashed = gc.judge(spec, "g", None, full, 2.0, error="RuntimeError: CUDA out of memory")
    assert crashed.status == "error" and crashed.figure is None
    assert crashed.details["error"] == "RuntimeError: CUDA out of memory"


def test_registry_targets_are_the_documented_ones():
    """Each check's target (full plan) is the one docs/performance.md states for it, and every
    documented target has a check: the docs and the code cannot drift apart."""
    names = [s.name for specs in gc.CHECKS.values() for s in specs]
    assert len(names) == len(set(names)) and set(gc.CHECKS) == set(gc.GROUPS)
    full = {s.name: str(s.target(gc.make_plan(False))) for specs in gc.CHECKS.values()
            for s in specs}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    table = doc[doc.index("| group | checks and targets"):doc.index("Time plan")]
    documented = {name: f"{op} {float(value):g}"
                  for name, op, value in re.findall(r"`(\w+)` (>=|<=|==) ([\d.]+)", table)}
    assert len(documented) == 9
    assert {k: f"{v.split()[0]} {float(v.split()[1]):g}" for k, v in full.items()} == documented
    assert gc.ALL_GROUPS[0] == "gpu_tests"


def test_plans():
    full, quick = gc.make_plan(False), gc.make_plan(True)
    assert full.compile and full.compile_warmup >= 1 and not quick.compile
    assert quick.steps < full.steps and quick.data_images < full.data_images
    assert quick.e2e_epochs >= 2 and full.e2e_epochs >= 2  # the first epoch is not counted
    # Epochs of >= 2 steps over the corpus, so the counted epochs are not one batch each.
    for p in (full, quick):
        assert p.data_images // p.e2e_batch >= 2


def fake_measure(plan, ctx):
    return {"pyramid": {"img_s": 150.0}}


def test_run_check_writes_report_and_keeps_going_after_a_broken_group(tmp_path):
    def broken(plan, ctx):
        raise RuntimeError("boom")

    def tests(workdir):
        return [gc.CheckResult("test:a", "gpu_tests", None, "", None, "pass", 0.5),
                gc.CheckResult("test:b", "gpu_tests", None, "", None, "skip", 0.0)]

    out = tmp_path / "r" / "report.json"
    lines = []
    report = gc.run_check(out, gc.make_plan(True), ["gpu_tests", "infer", "d2"],
                          torch.device("cpu"), measurers={"infer": fake_measure, "d2": broken},
                          tests=tests, log=lines.append)
    on_disk = json.loads(out.read_text())
    assert on_disk == report and on_disk["complete"] is True
    assert on_disk["summary"] == {"pass": 1, "fail": 1, "error": 1, "skip": 1}
    checks = {c["name"]: c for c in on_disk["checks"]}
    infer = checks["infer_pyramid_img_s"]
    assert (infer["status"], infer["figure"], infer["unit"]) == ("fail", 150.0, "img/s")
    assert infer["target"] == {"op": ">=", "value": 160, "text": ">= 160"}
    assert infer["details"]["measured"] == {"pyramid": {"img_s": 150.0}}
    assert checks["d2_mask_rcnn_ratio_to_vitdet_b"]["details"]["error"] == "RuntimeError: boom"
    env = on_disk["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and env["torchvision"]
    assert on_disk["plan"]["quick"] is True
    assert lines[-1].startswith("gpu_check: 1 pass, 1 fail, 1 error, 1 skip")
    assert lines[3].startswith("FAIL  infer_pyramid_img_s: 150 img/s (target >= 160)")
    assert not out.with_name("report.json.tmp").exists()


def test_gpu_test_outcomes_come_from_junit(tmp_path):
    tests = tmp_path / "test_fake.py"
    tests.write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no card')\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('fixture broke')\n"
        "def test_error(broken): pass\n")
    work = tmp_path / "work"
    work.mkdir()
    results = {r.name: r for r in gc.run_gpu_tests(work, str(tests), cwd=tmp_path)}
    assert {k: r.status for k, r in results.items()} == {
        "test:test_ok": "pass", "test:test_bad": "fail", "test:test_skipped": "skip",
        "test:test_error": "error"}
    assert "one is not two" in results["test:test_bad"].details["message"]
    assert results["test:test_skipped"].details["message"] == "no card"


def test_unknown_group_is_a_user_error():
    with pytest.raises(gc.GPUCheckError) as e:
        gc.resolve_groups(["pretrain", "gpu"])
    assert str(e.value) == ("unknown check group(s) gpu (--only); choose from gpu_tests, "
                            "pretrain, infer, d2, data")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error needs a CPU machine")
def test_cli_without_cuda_gives_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(TOOL), "--output", str(tmp_path / "r.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: no CUDA device: tools/gpu_check.py measures a GPU; run it on "
                           "a machine with one (tools/gpu_check.py --list shows the plan)\n")
    assert not (tmp_path / "r.json").exists()


def test_cli_list_and_print_install(capsys):
    spec = __import__("importlib.util").util.spec_from_file_location("itpn_gpu_check_tool", TOOL)
    tool = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--list", "--quick", "--only", "pretrain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plan: {'quick': True, 'compile': False")
    assert out[1].startswith("pretrain: pretrain_mim_img_s >= 2400 img/s")
    assert tool.main(["--print-install"]) == 0
    install = capsys.readouterr().out
    assert "--target .site .whl/*.whl" in install.replace("\\\n    ", "")
    assert "PYTHONPATH=$PWD/.site:$PWD/.d2:$PWD" in install and '"$OUT/gpu_check.json"' in install

"""tools/benchmark.py on the CPU with tiny settings: every subcommand runs and reports its fields."""

import importlib.util
import json
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark.py"
TOY_CONFIG = "configs/toy/mask_rcnn_itpn_nano.py"
FIELDS = ("img_s", "step_ms", "peak_mem_gib", "device", "torch", "batch_size", "input_size",
          "amp", "compile", "model", "mem_kind")
TINY = ["--device", "cpu", "--batch-size", "1", "--input-size", "64", "--steps", "1",
        "--warmup", "0"]


def load_tool():
    spec = importlib.util.spec_from_file_location("itpn_benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_tool()


def check_row(row, bench_name, name, batch=1, size=64):
    for key in FIELDS:
        assert key in row, key
    assert row["bench"] == bench_name and row["name"] == name
    assert row["device"] == "cpu" and row["amp"] == "off" and row["compile"] is False
    assert (row["batch_size"], row["input_size"]) == (batch, size)
    assert row["step_ms"] > 0 and row["peak_mem_gib"] > 0 and row["cpu_ms"] > 0
    assert row["mem_kind"] in ("cpu_peak_rss", "cpu_max_rss")
    assert row["img_s"] == pytest.approx(batch / (row["step_ms"] / 1e3), rel=1e-3)
    assert row["torch"].split("+")[0].count(".") == 2


def test_pretrain_cli_json_lines():
    # The command line of the issue, with smaller settings: one JSON object per configuration.
    cmd = [sys.executable, str(TOOL), "pretrain", "--model", "itpn_nano", "--device", "cpu",
           "--batch-size", "2", "--input-size", "64", "--steps", "1", "--warmup", "0", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["mim", "mim+mfm(ema)", "mim+mfm(clip)"]
    for row in rows:
        check_row(row, "pretrain", row["name"], batch=2)
        assert row["model"] == "itpn_nano" and row["mask_ratio"] == 0.75
    assert rows[0]["params_m"] < rows[1]["params_m"]  # + MFM heads
    assert rows[1]["vs_mim"] > 0 and rows[2]["clip_teacher"] == "tiny"


def test_infer_pyramid_and_detector(bench, capsys):
    rows = bench.main(["infer", "--config", TOY_CONFIG, *TINY])
    assert [r["name"] for r in rows] == ["backbone+pyramid", "detector"]
    for row in rows:
        check_row(row, "infer", row["name"])
        assert row["model"] == "itpn_nano"  # from the config
    assert rows[1]["config"] == TOY_CONFIG
    table = capsys.readouterr().out
    assert "img_s" in table and "peak_mem_gib" in table and "backbone+pyramid" in table


def test_d2_training_iteration_against_vitdet(bench):
    rows = bench.main(["d2", "--config", TOY_CONFIG, "--vitdet", "--instances", "2", *TINY])
    assert [r["name"] for r in rows] == ["train:itpn", "train:vitdet_b"]
    for row in rows:
        check_row(row, "d2", row["name"])
    assert rows[0]["model"] == "itpn_nano" and rows[1]["model"] == "vitdet_b"
    assert rows[1]["params_m"] > 80  # ViT-B backbone
    # the ratio is stored rounded to 3 decimals: it differs from the exact one by <= 5e-4,
    # whatever the machine's speed (a relative tolerance fails on fast machines, where the
    # ratio is ~0.03 and the rounding alone is over 1% of it)
    assert rows[0]["ratio_to_vitdet_b"] == pytest.approx(
        rows[0]["step_ms"] / rows[1]["step_ms"], abs=5e-4 + 1e-12)


@pytest.mark.parametrize("argv, message", [
    (["infer", "--model", "itpn_nano", "--input-size", "100", "--device", "cpu"],
     "multiple of 32"),
    (["infer", "--model", "itpn_nano", "--device", "tpu"], "unsupported device"),
    (["d2", "--config", "configs/toy/missing.py", "--device", "cpu"],
     "config file configs/toy/missing.py does not exist"),
    (["d2", "--config", "configs/toy/mask_rcnn_itpn_nano.py", "--device", "cpu",
      "trian.max_iter=1"], "did you mean train.max_iter?"),
])
def test_bad_settings_give_one_error(bench, capsys, argv, message):
    assert bench.cli(argv) == 2  # a user error, as in every other tool
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_data_paths_on_a_generated_corpus(bench):
    rows = bench.main(["data", "--device", "cpu", "--images", "4", "--image-size", "96", "72",
                       "--quality", "80", "--batch-size", "2", "--input-size", "64",
                       "--steps", "1", "--warmup", "0", "--json"])
    assert [r["name"] for r in rows] == ["pil", "read_bytes", "decode", "gpu_path"]
    for row in rows:
        check_row(row, "data", row["name"], batch=2)
        assert row["cpu_ms_per_image"] > 0 and row["images_in_folder"] == 4
        assert (row["corpus_images"], row["corpus_size"], row["corpus_quality"]) == \
            (4, [96, 72], 80)
        assert row["cpu_ms_per_image"] == pytest.approx(row["cpu_ms"] / 2, rel=1e-2)


def test_measure_runs_the_steps_it_reports_and_sees_their_memory():
    """The timing core on steps whose cost is known: call counts, a lower bound on the time of
    a step that sleeps, and the peak of a step that fills 512 MiB (the same run without it
    for reference)."""
    from itpn_d2.benchmark import measure

    calls = []
    timing = measure(lambda: (calls.append(1), time.sleep(0.02)), torch.device("cpu"),
                     steps=3, warmup=2)
    assert len(calls) == 5
    assert timing["step_ms_min"] >= 20.0 and timing["step_ms"] >= timing["step_ms_min"]
    idle = measure(lambda: None, torch.device("cpu"), steps=1, warmup=0)
    filled = measure(lambda: torch.ones(512 * 2 ** 20, dtype=torch.uint8).sum(),
                     torch.device("cpu"), steps=1, warmup=0)
    if filled["mem_kind"] != "cpu_peak_rss":  # no reset allowed: a lifetime peak, never lower
        assert filled["peak_mem_gib"] >= idle["peak_mem_gib"]
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    # 0.5 GiB touched, less the page-size rounding of the RSS
    assert filled["peak_mem_gib"] - idle["peak_mem_gib"] >= 0.45

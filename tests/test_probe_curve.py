"""Tests of itpn_d2/probe_curve.py and tools/probe_curve.py: snapshots -> samples seen, probes
reused, pyramid-free runs probed on their stages only, one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.errors import UserError
from itpn_d2.probe_curve import probe_curve
from pretrain.main import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch runs (1 step of 4 images per epoch), every snapshot kept: one with the
    pyramid and MFM, one without pyramid."""
    root = tmp_path_factory.mktemp("curve")
    make_toy_dataset(root / "toy", num_train=4, num_val=1, num_probe=4, image_size=64)
    folders = {}
    for label, flags in (("integral", ["--mfm", "ema"]),
                         ("conventional", ["--pyramid", "off", "--mfm", "none"])):
        folders[label] = root / label
        pretrain_main(["--model", "itpn_nano", "--data_path", str(root / "toy/images/train"),
                       "--input_size", "64", "--batch_size", "4", "--num_workers", "0",
                       "--epochs", "2", "--warmup_epochs", "1", "--keep_every", "1",
                       "--vis_images", "0", "--device", "cpu",
                       "--output_dir", str(folders[label]), *flags])
    return root, folders


def test_curve_reads_samples_probes_each_snapshot_once_and_plots(runs, tmp_path):
    root, folders = runs
    out = tmp_path / "curve"
    curve = probe_curve(folders, [1, 2, 4], out, root / "toy", ["--input-size", "64"])
    assert json.loads((out / "probe_curve.json").read_text()) == curve
    assert (out / "probe_curve.png").read_bytes()[:4] == b"\x89PNG"
    integral, conventional = curve["runs"]["integral"], curve["runs"]["conventional"]
    # epoch 4 has no snapshot: skipped; 1 step of 4 images per epoch
    assert [(p["epoch"], p["samples"], p["schedule_epochs"]) for p in integral["points"]] \
        == [(1, 4, 2), (2, 8, 2)]
    assert sorted(integral["points"][0]["accuracy"]) == ["c2", "c3", "c4", "p2", "p3", "p4"]
    assert sorted(conventional["points"][1]["accuracy"]) == ["c2", "c3", "c4"]
    assert conventional["settings"]["pyramid"] is False
    assert {"pixels/pixels", "random/c4", "random/p2"} <= set(curve["baselines"])
    split = curve["split"]
    assert (split["train"], split["val"], split["num_val"]) == ("itpn_toy_train",
                                                                "itpn_toy_probe", 10)
    assert curve["probe_args"] == ["--input-size", "64"]
    for point in integral["points"]:
        for acc in point["accuracy"].values():
            assert acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
    # a second call reuses every probe report (none is rewritten) and gives the same curve
    reports = sorted(out.glob("*/epoch*/probe.json"))
    assert len(reports) == 4
    stamps = [p.stat().st_mtime_ns for p in reports]
    assert probe_curve(folders, [1, 2, 4], out, root / "toy", ["--input-size", "64"]) == curve
    assert [p.stat().st_mtime_ns for p in reports] == stamps


def test_run_resumed_with_more_epochs_records_each_points_schedule(runs, tmp_path):
    root, folders = runs
    longer = tmp_path / "longer"
    shutil.copytree(folders["conventional"], longer)
    pretrain_main(["--model", "itpn_nano", "--data_path", str(root / "toy/images/train"),
                   "--input_size", "64", "--batch_size", "4", "--num_workers", "0",
                   "--epochs", "3", "--warmup_epochs", "1", "--keep_every", "1",
                   "--vis_images", "0", "--device", "cpu", "--output_dir", str(longer),
                   "--pyramid", "off", "--mfm", "none", "--auto_resume"])
    curve = probe_curve({"longer": longer}, [2, 3], tmp_path / "curve", root / "toy",
                        ["--input-size", "64"])
    run = curve["runs"]["longer"]
    assert [(p["epoch"], p["samples"], p["schedule_epochs"]) for p in run["points"]] \
        == [(2, 8, 2), (3, 12, 3)]
    assert run["settings"]["epochs"] == 3  # the run's settings are those of its last snapshot


def test_run_without_snapshots_and_bad_spec_give_one_line(runs, tmp_path):
    root, _ = runs
    with pytest.raises(UserError, match=r"holds none of the snapshots checkpoint-<epoch-1>\.pth "
                                        r"for epochs \[1\]; pretrain with --keep_every 1"):
        probe_curve({"empty": tmp_path}, [1], tmp_path / "out", root / "toy")
    proc = subprocess.run([sys.executable, str(REPO / "tools/probe_curve.py"), "--run", "nolabel",
                           "--epochs", "1", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --run 'nolabel': expected label=folder"

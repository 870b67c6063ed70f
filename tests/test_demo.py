"""tools/demo.py and the stage machinery it shares with tools/transfer_study.py (tools/stages.py).

The end-to-end test runs every stage of the demo with the ``smoke`` preset (tiny data, a few
steps; about a minute on 2 CPU cores), checks REPORT.md / results.json / the figures, and that
a second run reuses every stage. The 15-minute default demo itself is not run here.
"""

import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import stages  # noqa: E402
from stages import Progress, Runner, Stage  # noqa: E402


def _load_demo():
    spec = importlib.util.spec_from_file_location("itpn_demo", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()

COPYPASTE = """\
[11/28 07:23:59 d2.evaluation.testing]: copypaste: Task: bbox
[11/28 07:23:59 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/28 07:23:59 d2.evaluation.testing]: copypaste: 1.0,2.0,3.0,4.0,5.0,nan
some other line
[11/28 07:24:59 d2.evaluation.testing]: copypaste: Task: bbox
[11/28 07:24:59 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/28 07:24:59 d2.evaluation.testing]: copypaste: 13.5,55.1,0.6,23.9,63.5,nan
[11/28 07:24:59 d2.evaluation.testing]: copypaste: Task: segm
[11/28 07:24:59 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl
[11/28 07:24:59 d2.evaluation.testing]: copypaste: 1.89,15.1,0.0,2.25,60.85,nan
[11/28 07:25:00 d2.evaluation.testing]: copypaste: Task: sem_seg
[11/28 07:25:00 d2.evaluation.testing]: copypaste: mIoU,fwIoU,mACC,pACC
[11/28 07:25:00 d2.evaluation.testing]: copypaste: 14.6,75.0,16.7,86.7
"""


# ----------------------------------------------------------------------- stages.py units
def test_parse_copypaste_takes_the_last_evaluation_of_each_task():
    res = stages.parse_copypaste(COPYPASTE)
    assert set(res) == {"bbox", "segm", "sem_seg"}
    assert res["bbox"]["AP"] == 13.5 and res["bbox"]["AP50"] == 55.1
    assert math.isnan(res["bbox"]["APl"])
    assert res["segm"]["APm"] == pytest.approx(60.85)
    assert res["sem_seg"] == {"mIoU": 14.6, "fwIoU": 75.0, "mACC": 16.7, "pACC": 86.7}
    assert stages.parse_copypaste("no metrics here") == {}


class _Bar:
    def __init__(self, total=None):
        self.total, self.n, self.postfix = total, 0, ""

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s):
        self.postfix = s

    def refresh(self):
        pass


def test_progress_follows_pretraining_and_detectron2_lines():
    bar = _Bar()
    p = stages.pretrain_progress()
    p.feed("pretraining itpn_nano (...); effective batch 32, lr 1e-4, 8 steps/epoch, 96 steps; "
           "device cpu", bar)
    assert bar.total == 96
    p.feed("epoch 0 step 4: loss 1.4941 mim 1.0487 mfm 0.4454 lr 1.296e-05 2.4 img/s", bar)
    assert bar.n == 4 and "1.4941" in bar.postfix

    bar = _Bar(total=20)
    p = stages.d2_train_progress(20)
    p.feed("[d2.utils.events]:  eta: 0:01:58  iter: 9  total_loss: 3.517  loss_cls: 1.2", bar)
    assert bar.n == 10 and "3.517" in bar.postfix
    p.feed("Inference done 11/64. Dataloading: 0.0091 s/iter.", bar)
    assert bar.n == 10 and "11/64" in bar.postfix

    bar = _Bar()
    stages.d2_eval_progress().feed("Inference done 11/64. Dataloading", bar)
    assert (bar.n, bar.total) == (11, 64)


def test_d2_overrides_survive_hydra_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {"train.init_checkpoint": "", "a.path": "/tmp/with space/it's.pth",
              "b.lr": 1e-3, "c.device": "cpu", "d.flag": True, "e.n": 5,
              "f.path": "/tmp/a-b/c_d.pth"}
    parsed = {o.key_or_group: o.value()
              for o in OverridesParser.create().parse_overrides(stages.d2_overrides(values))}
    assert parsed == values


def test_mean_std_ci():
    s = stages.mean_std_ci([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert math.isnan(stages.mean_std_ci([5.0])["std"])
    assert stages.mean_std_ci([])["n"] == 0
    assert stages.t_quantile_975(100) == 1.96


def test_all_background_reference_scores(tmp_path):
    from PIL import Image
    import numpy as np

    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 2  # 4 pixels of class 2, 12 background
    b = np.zeros((4, 4), np.uint8)
    b[0, :2] = 255  # ignored: 14 background pixels count
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    scores = demo.all_background_scores(tmp_path)
    # IoU: background 26 / 30, class 2 zero; absent classes are left out of the mean
    assert scores["mIoU"] == pytest.approx(100 * (26 / 30) / 2)
    assert scores["pACC"] == pytest.approx(100 * 26 / 30)
    with pytest.raises(demo.StageError, match="no labelled pixels"):
        demo.all_background_scores(tmp_path / "missing")


def test_source_hash_follows_the_code(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "REPO", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = stages.source_hash("pkg")
    assert stages.source_hash("pkg") == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert stages.source_hash("pkg") != first


def test_runner_reuses_only_matching_finished_stages(tmp_path):
    calls = []

    def work(stage):
        calls.append(stage.name)
        (stage.out_dir / "out.txt").write_text("x")
        return {"value": len(calls)}

    def make(settings):
        return Stage("s", "stage", tmp_path / "s", settings, outputs=["out.txt"])

    out = io.StringIO()
    runner = Runner(tmp_path / "logs", progress=False, stream=out)
    first = runner.run(make({"a": 1}), work)
    assert calls == ["s"] and not first.reused and first.results == {"value": 1}
    record = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert record["settings"] == {"a": 1} and record["results"] == {"value": 1}

    again = runner.run(make({"a": 1}), work)  # same settings: reused, results from the record
    assert calls == ["s"] and again.reused and again.results == {"value": 1}
    assert "reused" in out.getvalue()

    runner.run(make({"a": 2}), work)  # changed settings: redone in an emptied folder
    assert calls == ["s", "s"]
    (tmp_path / "s" / "out.txt").unlink()  # an output went missing: redone
    runner.run(make({"a": 2}), work)
    assert len(calls) == 3
    Runner(tmp_path / "logs", progress=False, stream=out, force=True).run(make({"a": 2}), work)
    assert len(calls) == 4  # --force

    (tmp_path / "s" / "stale.txt").write_text("old")
    (tmp_path / "s" / "stage.json").unlink()  # interrupted run: no record
    runner.run(make({"a": 2}), work)
    assert len(calls) == 5 and not (tmp_path / "s" / "stale.txt").exists()


def test_failed_command_names_stage_command_and_log(tmp_path):
    runner = Runner(tmp_path / "logs", progress=False, stream=io.StringIO())
    stage = Stage("boom", "boom", tmp_path / "boom", {})
    with pytest.raises(stages.StageError, match=r"stage 'boom' failed \(exit status 3\)") as e:
        runner.command(stage, [sys.executable, "-c",
                               "print('about to fail'); import sys; sys.exit(3)"])
    assert "about to fail" in str(e.value) and "boom.log" in str(e.value)
    assert "about to fail" in (tmp_path / "logs" / "boom.log").read_text()


# ------------------------------------------------------------------------------ demo.py
def test_demo_arguments_and_presets(tmp_path, capsys):
    args = demo.parse_args(["--output", str(tmp_path), "--det-iters", "7", "--device", "cpu"])
    assert args.preset == "full" and args.det_iters == 7
    assert args.num_train == demo.PRESETS["full"]["num_train"]
    smoke = demo.parse_args(["--preset", "smoke", "--device", "cpu"])
    assert smoke.num_train == demo.PRESETS["smoke"]["num_train"]
    for bad, message in ((["--image-size", "100"],
                          "--image-size must be a multiple of 32, got 100"),
                         (["--det-iters", "0"], "--det-iters must be >= 1"),
                         (["--preset", "smoke", "--pretrain-batch", "999"],
                          f"--pretrain-batch 999 exceeds --num-train {smoke.num_train}")):
        with pytest.raises(SystemExit) as exit_:
            demo.parse_args(bad + ["--device", "cpu"])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n"), bad


def test_demo_dry_run_lists_every_stage_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--output", str(out), "--dry-run", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for needle in ("tools/make_toy_dataset.py", "pretrain/main.py", "--mfm ema",
                   "tools/export_backbone.py", "--eval-only", "mask_rcnn_itpn_nano.py",
                   "upernet_itpn_nano.py", "tools/visualize_reconstruction.py",
                   "dataloader.evaluator.output_dir=", "tools/visualize_semseg.py"):
        assert needle in text, needle
    assert not out.exists()


def test_demo_smoke_run_end_to_end_then_reuse(tmp_path):
    """Every stage for real at tiny sizes, then a second run that reuses them all."""
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--preset", "smoke", "--output",
           str(out), "--device", "cpu", "--threads", "1", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "demo finished" in first.stdout and "box AP" in first.stdout

    results = json.loads((out / "results.json").read_text())
    st = results["stages"]
    assert set(st) == {"data", "pretrain", "untrained", "detection", "segmentation", "figures"}
    assert not any(s["reused"] for s in st.values())
    # The reported box and mask AP are COCOeval's on the val predictions the stage kept.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(out / "data" / "annotations" / "instances_val.json"))
    dets = json.loads((out / "detection" / demo.DET_RESULTS).read_text())
    for task in ("bbox", "segm"):  # mask results without boxes, as Detectron2 loads them
        ev = COCOeval(gt, gt.loadRes([d if task == "bbox" else
                                      {k: v for k, v in d.items() if k != "bbox"}
                                      for d in dets]), task)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        assert st["detection"]["results"][task]["AP"] == pytest.approx(100 * ev.stats[0],
                                                                       abs=1e-4), task
    for name, task, key in (("untrained", "bbox", "AP"), ("segmentation", "sem_seg", "mIoU")):
        value = st[name]["results"][task][key]
        assert 0.0 <= value <= 100.0, (name, task, value)  # numbers, not NaN
    assert st["pretrain"]["results"]["epochs"] == demo.PRESETS["smoke"]["pretrain_epochs"]

    report = (out / "REPORT.md").read_text()
    assert f"{st['detection']['results']['bbox']['AP']:.1f}" in report
    assert f"{st['segmentation']['results']['sem_seg']['mIoU']:.1f}" in report
    for png in ("pretrain_loss.png", "reconstruction.png", "detection_predictions.png",
                "segmentation_predictions.png"):
        assert f"figures/{png}" in report
        with open(out / "figures" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert (out / "logs" / "pretrain.log").is_file()
    assert (out / "pretrain" / "backbone.pth").is_file()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("reused") == 6
    again = json.loads((out / "results.json").read_text())
    assert all(s["reused"] for s in again["stages"].values())
    assert again["stages"]["detection"]["results"] == st["detection"]["results"]

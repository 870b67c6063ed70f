"""tools/demo.py (itpn_d2.experiments.demo): arguments and presets, the dry run's commands,
the headline numbers of results.json, and the end-to-end ``smoke`` preset (tiny data, a few
steps; about a minute on 2 CPU cores), which checks REPORT.md / results.json / the figures
against the files the stages' tools wrote, and that a second run reuses every stage. The
15-minute default demo itself is not run here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from itpn_d2.eval_results import read_eval_results
from itpn_d2.experiments import demo
from itpn_d2.experiments.stages import Stage, eval_history

REPO = Path(__file__).resolve().parents[1]


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


def test_demo_arguments_and_presets(tmp_path, capsys):
    args = demo.parse_args(["--output", str(tmp_path), "--det-iters", "7", "--device", "cpu"],
                           REPO)
    assert args.preset == "full" and args.det_iters == 7 and args.init == "shipped"
    assert args.num_train == demo.PRESETS["full"]["num_train"]
    assert demo.parse_args(["--device", "cpu"], REPO).output == REPO / "output" / "demo"
    smoke = demo.parse_args(["--preset", "smoke", "--device", "cpu"], REPO)
    assert smoke.num_train == demo.PRESETS["smoke"]["num_train"]
    for bad, message in ((["--image-size", "100"], "--image-size must be a multiple of 32, got 100"),
                         (["--det-iters", "0", "--seg-batch", "0"],
                          "--det-iters, --seg-batch must be >= 1"),
                         (["--preset", "smoke", "--pretrain-batch", "999"],
                          "--pretrain-batch 999 exceeds --num-pool 16"),
                         (["--image-size", "64"], "--init shipped needs --image-size 128 (the "
                          "shipped pretraining's size); use --init live for other sizes"),
                         (["--num-probe", "-1"], "--num-probe must be >= 0")):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(bad + ["--device", "cpu"], REPO)
        assert e.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n"), bad


def test_headline_numbers_of_results_json(tmp_path):
    def stage(name, results, wall_s):
        s = Stage(name, name, tmp_path / name, {})
        s.results, s.wall_s = results, wall_s
        return s

    stages = [stage("pretrain", {"final_loss": 0.5}, 30.04),
              stage("untrained", {"bbox": {"AP": 0.2}}, 3.0),
              stage("detection", {"bbox": {"AP": 31.5}, "segm": {"AP": 28.25}}, 100.0),
              stage("segmentation", {"sem_seg": {"mIoU": 40.0},
                                     "all_background": {"mIoU": 14.6}}, 50.0)]
    assert demo.headline(stages, 183.06) == {
        "box_ap": 31.5, "mask_ap": 28.25, "miou": 40.0, "miou_background": 14.6,
        "untrained_box_ap": 0.2, "seconds": 183.1,
        "stage_seconds": {"pretrain": 30.0, "untrained": 3.0, "detection": 100.0,
                          "segmentation": 50.0}}
    assert demo.headline(stages[:1], 1.0)["box_ap"] is None  # e.g. a dry run


def test_report_shows_the_committed_study(tmp_path):
    folder = tmp_path / "results"
    figures = tmp_path / "figures"
    assert demo.committed_study(folder, figures) is None  # a checkout without a study
    folder.mkdir()
    (folder / "results.md").write_text("# Transfer study: integral vs conventional\n\ntext\n\n"
                                       "## full fine-tuning (`full`)\n\n| a | b |\n")
    (folder / "transfer_study.png").write_bytes(b"\x89PNG fake")
    study = demo.committed_study(folder, figures)
    assert study.splitlines()[0] == "## Transfer study: integral vs conventional"
    assert "\n### full fine-tuning (`full`)\n" in study
    assert study.rstrip().endswith("![transfer study](figures/results.png)")
    assert (figures / "results.png").read_bytes() == b"\x89PNG fake"


def test_demo_dry_run_lists_every_stage_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(demo.parse_args(["--output", str(out), "--dry-run", "--device", "cpu"],
                                     REPO), REPO) == 0
    text = capsys.readouterr().out
    for needle in ("tools/make_toy_dataset.py", "pretrain/main.py", "--mfm ema",
                   "tools/export_backbone.py", "--eval-only", "mask_rcnn_itpn_nano.py",
                   "upernet_itpn_nano.py", "tools/visualize_reconstruction.py",
                   "dataloader.evaluator.output_dir=", "tools/visualize_semseg.py"):
        assert needle in text, needle
    assert not out.exists()
    det = [line for line in text.splitlines() if "mask_rcnn_itpn_nano.py" in line
           and "--eval-only" not in line]
    freeze = ("model.backbone.freeze_backbone=True", "model.backbone.freeze_pyramid=True")
    expected = {"full": (), "frozen": freeze[:1], "heads": freeze}[
        demo.PRESETS["full"]["det_protocol"]]
    assert len(det) == 1 and tuple(f for f in freeze if f in det[0]) == expected
    demo.main(demo.parse_args(["--output", str(out), "--dry-run", "--device", "cpu",
                               "--det-protocol", "heads"], REPO), REPO)
    det = [line for line in capsys.readouterr().out.splitlines()
           if "mask_rcnn_itpn_nano.py" in line and "--eval-only" not in line]
    assert len(det) == 1 and all(f in det[0] for f in freeze)


def test_reproduce_preset_runs_the_shipped_pretraining(tmp_path):
    """``--preset reproduce``'s live pretraining is the shipped integral checkpoint's command:
    the same pool and every training setting, as pretrain/main.py parses them."""
    import shlex

    from itpn_d2.zoo import zoo_info
    from pretrain.config import build_parser

    args = demo.parse_args(["--preset", "reproduce", "--output", str(tmp_path), "--dry-run",
                            "--device", "cpu"], REPO)
    assert args.init == "live"
    commands = demo.Demo(args, REPO).run()["commands"]
    command = zoo_info(demo.SHIPPED)["command"]
    assert f"--num-pool {args.num_pool} " in command.split("&&")[0]
    parser = build_parser()
    shipped = vars(parser.parse_args(shlex.split(command.split("pretrain/main.py")[1])))
    live = next(shlex.split(c) for c in commands if "pretrain/main.py" in c)
    live = vars(parser.parse_args(live[live.index(next(x for x in live
                                                       if x.endswith("pretrain/main.py"))) + 1:]))
    where = {"data_path", "output_dir", "device", "num_workers", "log_every", "save_every",
             "keep_every", "vis_images", "auto_resume", "cache_images"}  # not the training
    assert {k: v for k, v in live.items() if k not in where} \
        == {k: v for k, v in shipped.items() if k not in where}
    assert live["epochs"] == zoo_info(demo.SHIPPED)["epochs_run"]
    assert live["auto_resume"]  # hours of pretraining: an interrupted run continues


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
    # The numbers are those of the eval_results.json each train tool run wrote (and, for the
    # fine-tuning, of metrics.json's evaluation at the last iteration).
    det = read_eval_results(out / "detection")
    assert det["iteration"] == demo.PRESETS["smoke"]["det_iters"]
    assert st["detection"]["results"] == {"bbox": det["bbox"], "segm": det["segm"]}
    assert set(det["bbox"]) >= {"AP", "AP50", "AP75"} and "AP" in det["segm"]
    iters = demo.PRESETS["smoke"]["det_iters"]
    assert eval_history(out / "detection" / "metrics.json", iters) == [
        {"iteration": iters, "value": det["bbox"]["AP"]}]
    untrained = read_eval_results(out / "untrained")
    assert untrained["iteration"] is None  # --eval-only
    seg = read_eval_results(out / "segmentation")
    assert st["segmentation"]["results"]["sem_seg"] == seg["sem_seg"]
    assert (results["box_ap"], results["mask_ap"], results["untrained_box_ap"], results["miou"]) \
        == (det["bbox"]["AP"], det["segm"]["AP"], untrained["bbox"]["AP"], seg["sem_seg"]["mIoU"])
    assert results["miou_background"] == st["segmentation"]["results"]["all_background"]["mIoU"]
    assert results["seconds"] == results["wall_s"] > 0
    assert set(results["stage_seconds"]) == set(st)
    assert results["stage_seconds"]["detection"] == st["detection"]["wall_s"] > 0
    log = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    assert st["pretrain"]["results"]["epochs"] == len(log) \
        == demo.PRESETS["smoke"]["pretrain_epochs"]
    assert st["pretrain"]["results"]["final_loss"] == log[-1]["train_loss"]
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

    report = (out / "REPORT.md").read_text()
    assert f"{st['detection']['results']['bbox']['AP']:.1f}" in report
    # the study committed with the checkout, beside the live numbers
    assert report.index("## Results") < report.index("## Transfer study") \
        < report.index("## Figures")
    for folder in demo.STUDY_RESULTS:  # one figure per committed study folder
        assert (out / "figures" / f"{folder.name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(figures/{folder.name}.png)" in report
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
    assert again["box_ap"] == results["box_ap"]
    assert again["stage_seconds"] == results["stage_seconds"]  # the times of the first run

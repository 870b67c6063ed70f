"""tools/transfer_study.py (itpn_d2.experiments.transfer_study): statistics, table and plot from known results; the commands it
builds for toy and full-scale settings (dry run); and one tiny real study (two arms, two seeds,
a few iterations) through pretraining, export, fine-tuning and COCO evaluation."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from itpn_d2.experiments import transfer_study as study

REPO = Path(__file__).resolve().parents[1]


def _main(argv):
    return study.main(study.parse_args(argv, REPO), REPO)


def _runs():
    def r(box, mask):
        return {"bbox": {"AP": box, "AP50": 2 * box}, "segm": {"AP": mask}}

    return {"integral": {0: r(10.0, 8.0), 1: r(12.0, 9.0), 2: r(14.0, 10.0)},
            "scratch": {0: r(4.0, 3.0), 1: r(5.0, 3.0), 2: r(9.0, 3.0)}}


def test_summary_statistics_and_paired_differences():
    s = study.summarize_runs(_runs(), ["integral", "scratch"])
    box = s["arms"]["integral"]["bbox"]
    assert box["n"] == 3 and box["mean"] == 12.0 and box["std"] == 2.0
    assert box["ci95"] == pytest.approx(4.303 * 2.0 / 3 ** 0.5, rel=1e-4)
    assert s["arms"]["scratch"]["segm"]["std"] == 0.0
    diff = [d for d in s["paired"] if d["task"] == "bbox"][0]
    assert (diff["a"], diff["b"]) == ("integral", "scratch")
    assert diff["values"] == [6.0, 7.0, 5.0] and diff["mean"] == 6.0


def test_markdown_table_and_plot(tmp_path):
    s = study.summarize_runs(_runs(), ["integral", "scratch"])
    s.update(wall_s=12.0, settings={"config_file": study.TOY_CONFIG, "iters": 150, "batch": 4,
                                    "lr": 1e-3, "seeds": [0, 1, 2], "model": "itpn_nano",
                                    "pretrain_epochs": 12, "pretrain_batch": 32})
    md = study.render_markdown(s)
    assert "| integral (backbone + pyramid, MIM + MFM) | 3 | 12.0 ± 2.0 (7.0, 17.0)" in md
    assert "| integral - scratch | box AP | +6.0" in md
    assert "not COCO" in md
    png = study.plot(s, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_arguments_are_checked(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    for bad, message in (
            (["--seeds", "0", "0"], "--seeds must be distinct, got [0, 0]"),
            (["--iters", "0"], "--iters must be >= 1"),
            (["--image-size", "100"], "--image-size must be a multiple of 32, got 100"),
            (["--config-file", "configs/nope.py"], "--config-file configs/nope.py does not exist"),
            (["--integral-checkpoint", missing],
             f"--integral-checkpoint {missing} does not exist")):
        with pytest.raises(SystemExit) as exit_:
            study.parse_args(bad + ["--device", "cpu"], REPO)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n"), bad


def test_dry_run_toy_commands(tmp_path, capsys):
    out = tmp_path / "study"
    assert _main(["--output", str(out), "--dry-run", "--device", "cpu",
                       "--arms", "integral", "conventional", "scratch", "mim_only",
                       "--seeds", "0", "1"]) == 0
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines() if "pretrain/main.py" in line]
    modes = sorted(" ".join(line.split("--pyramid ")[1].split()[:3]) for line in lines)
    assert modes == ["off --mfm none", "on --mfm ema", "on --mfm none"]
    finetunes = [shlex.split(line) for line in text.splitlines()
                 if "lazyconfig_train_net.py" in line]
    assert len(finetunes) == 4 * 2
    scratch = [f for f in finetunes if any("/scratch_s1" in a for a in f)]
    assert len(scratch) == 1 and "train.init_checkpoint=''" in scratch[0]
    assert "train.seed=1" in scratch[0]
    conventional = [f for f in finetunes if any("/conventional_s" in a for a in f)]
    assert len(conventional) == 2
    assert all(f"train.init_checkpoint={out}/pretrain_conventional/backbone.pth" in f
               for f in conventional)
    assert not out.exists()


def test_dry_run_full_scale_commands_parse(tmp_path, capsys):
    """GPU / COCO flags: given checkpoints, a full recipe, torchrun pretraining; the built
    commands parse with the train tool's parser and the recipe accepts the overrides."""
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser

    ckpt = tmp_path / "integral.pth"
    ckpt.write_bytes(b"")
    out = tmp_path / "study"
    assert _main([
        "--output", str(out), "--dry-run", "--device", "cuda",
        "--config-file", "configs/coco/mask_rcnn_itpn_b.py", "--integral-checkpoint", str(ckpt),
        "--model", "itpn_base", "--pretrain-data", "/data/imagenet", "--pretrain-nproc", "8",
        "--pretrain-epochs", "400", "--pretrain-batch", "64", "--pretrain-blr", "1.5e-4",
        "--pretrain-args", "--accum_iter 2", "--iters", "90000", "--batch", "16",
        "--lr", "2e-4", "--num-gpus", "8", "--train-dataset", "coco_2017_train",
        "--test-dataset", "coco_2017_val", "--seeds", "0", "1", "2",
        "--set", "train.amp.enabled=True", "--set", "model.backbone.net.drop_path_rate=0.1"]) == 0
    text = capsys.readouterr().out
    pre = [shlex.split(line) for line in text.splitlines() if "pretrain/main.py" in line]
    assert len(pre) == 1  # conventional only: the integral checkpoint was given
    assert pre[0][1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8"]
    assert "--accum_iter" in pre[0] and "/data/imagenet" in pre[0]
    finetunes = [shlex.split(line) for line in text.splitlines()
                 if "lazyconfig_train_net.py" in line]
    assert len(finetunes) == 9
    parser = default_argument_parser()
    cfg = LazyConfig.load(str(REPO / "configs/coco/mask_rcnn_itpn_b.py"))
    for cmd in finetunes:
        args = parser.parse_args(cmd[2:])
        assert args.num_gpus == 8
        assert args.opts[-2:] == ["train.amp.enabled=True", "model.backbone.net.drop_path_rate=0.1"]
        LazyConfig.apply_overrides(cfg, args.opts)  # every key exists in the recipe
    integral = [c for c in finetunes if any("integral_s0" in a for a in c)][0]
    assert f"train.init_checkpoint={ckpt}" in integral
    assert "dataloader.train.dataset.names=coco_2017_train" in integral
    assert not any("img_size" in a for a in integral)  # a given checkpoint: the recipe's
    conventional = [c for c in finetunes if any("conventional_s0" in a for a in c)][0]
    assert "model.backbone.net.img_size=224" in conventional  # pre-trained here at 224


def test_tiny_study_runs_for_real(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--output", str(out),
           "--device", "cpu", "--threads", "1", "--no-progress",
           "--arms", "conventional", "scratch", "--seeds", "0", "1",
           "--num-train", "8", "--num-val", "2", "--image-size", "64",
           "--pretrain-epochs", "1", "--pretrain-batch", "8", "--pretrain-warmup", "0",
           "--iters", "2", "--batch", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"conventional", "scratch"}
    for arm in ("conventional", "scratch"):
        assert results["arms"][arm]["bbox"]["n"] == 2
        assert set(results["arms"][arm]["runs"]) == {"0", "1"}
    assert results["pretraining"]["conventional"]["stage"] == "pretrain_conventional"
    assert "| conventional (backbone only, pyramid random) | 2 |" in \
        (out / "results.md").read_text()
    assert (out / "transfer_study.png").read_bytes()[:4] == b"\x89PNG"
    log = (out / "logs" / "finetune_conventional_s0.log").read_text()
    assert "NO feature pyramid" in log  # the checkpointer flags the random pyramid


def test_checkpoint_img_size_reads_the_pretraining_size(tmp_path):
    from itpn_d2.checkpoint import model_metadata, save_checkpoint

    path = tmp_path / "backbone.pth"
    save_checkpoint({"model": {}, **model_metadata("itpn_nano", {"img_size": 96})}, path)
    assert study.checkpoint_img_size(str(path)) == 96
    save_checkpoint({"model": {}, **model_metadata("itpn_nano", {})}, path)
    assert study.checkpoint_img_size(str(path)) is None
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert study.checkpoint_img_size(str(tmp_path / "junk.pth")) is None

"""tools/transfer_study.py (itpn_d2.experiments.transfer_study): statistics, verdict, table and
plot from known results; the commands it builds for toy and full-scale settings (dry run); and
one tiny real study (two arms, two protocols, two seeds, a few iterations) through pretraining,
export, fine-tuning and COCO evaluation."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from itpn_d2.experiments import transfer_study as study

REPO = Path(__file__).resolve().parents[1]


def _main(argv):
    return study.main(study.parse_args(argv, REPO), REPO)


def _r(box, mask, early=None):
    curve = [{"iteration": 5, "value": box / 2 if early is None else early},
             {"iteration": 10, "value": box}]
    return {"bbox": {"AP": box, "AP50": 2 * box}, "segm": {"AP": mask}, "curve": curve}


def _runs():
    return {"integral": {0: _r(10.0, 8.0), 1: _r(12.0, 9.0), 2: _r(14.0, 10.0)},
            "scratch": {0: _r(4.0, 3.0), 1: _r(5.0, 3.0), 2: _r(9.0, 3.0)}}


def _no_go_runs():
    """integral - scratch = [+2, -1, +2], conventional - scratch = [0, +1, -1]."""
    return {"integral": {0: _r(6.0, 5.0), 1: _r(4.0, 4.0), 2: _r(11.0, 6.0)},
            "conventional": {0: _r(4.0, 3.0), 1: _r(6.0, 4.0), 2: _r(8.0, 5.0)},
            "scratch": {0: _r(4.0, 3.0), 1: _r(5.0, 3.0), 2: _r(9.0, 3.0)}}


def _settings():
    return {"config_file": study.TOY_CONFIG, "iters": 150, "batch": 4, "lr": 1e-3,
            "seeds": [0, 1, 2], "evals": 3, "model": "itpn_nano", "pretrain_epochs": 12,
            "pretrain_batch": 32, "protocols": ["full", "frozen"],
            "arms": ["integral", "conventional", "scratch"], "integral_checkpoint": "/x/a.pth",
            "iters_of": {"full": 150, "frozen": 100, "heads": 150, "scarce": 150}}


def test_summary_statistics_and_paired_differences():
    s = study.summarize_runs(_runs(), ["integral", "scratch"])
    box = s["arms"]["integral"]["bbox"]
    assert box["n"] == 3 and box["mean"] == 12.0 and box["std"] == 2.0
    assert box["ci95"] == pytest.approx(4.303 * 2.0 / 3 ** 0.5, rel=1e-4)
    assert s["arms"]["scratch"]["segm"]["std"] == 0.0
    diff = [d for d in s["paired"] if d["task"] == "bbox"][0]
    assert (diff["a"], diff["b"]) == ("integral", "scratch")
    assert diff["values"] == [6.0, 7.0, 5.0] and diff["mean"] == 6.0
    curve = s["arms"]["integral"]["curve"]
    assert [(p["iteration"], p["n"], p["mean"], p["std"]) for p in curve] == [
        (5, 3, 6.0, 1.0), (10, 3, 12.0, 2.0)]


def test_mean_curve_keeps_the_iterations_every_seed_evaluated():
    runs = {0: _r(10.0, 1.0), 1: {**_r(20.0, 1.0), "curve": [{"iteration": 10, "value": 20.0}]}}
    assert study.mean_curve(runs) == [{"iteration": 10, "n": 2, "mean": 15.0,
                                       "std": pytest.approx(50 ** 0.5),
                                       "ci95": pytest.approx(12.706 * 50 ** 0.5 / 2 ** 0.5)}]
    assert study.mean_curve({}) == []


def test_verdict_go():
    v = study.verdict(_runs(), ["integral", "scratch"])
    # diffs [6, 7, 5]: mean 6, std 1, half width 4.303 / sqrt(3) = 2.484
    assert v == {"go": True, "reason": "go: integral beat(s) scratch (95% interval above 0): "
                                       "integral - scratch +6.0 box AP (+3.5, +8.5)"}


def test_verdict_no_go():
    v = study.verdict(_no_go_runs(), ["integral", "conventional", "scratch"])
    # integral: mean 1, std sqrt(3), half width 4.303; conventional: mean 0, std 1, 2.484
    assert v == {"go": False, "reason": study.NO_GO + ": integral - scratch +1.0 box AP "
                                        "(-3.3, +5.3); conventional - scratch +0.0 box AP "
                                        "(-2.5, +2.5)"}
    assert study.NO_GO == ("no-go: pre-training does not beat scratch at this budget "
                           "(interval includes 0)")


def test_verdict_no_go_when_scratch_is_better():
    runs = _runs()
    runs = {"integral": runs["scratch"], "scratch": runs["integral"]}
    assert study.verdict(runs, ["integral", "scratch"]) == {
        "go": False, "reason": "no-go: scratch beats pre-training at this budget (interval "
                               "below 0): integral - scratch -6.0 box AP (-8.5, -3.5)"}


def test_verdict_needs_scratch_and_two_seeds():
    runs = _runs()
    assert study.verdict(runs, ["integral"]) == {
        "go": False, "reason": "no verdict: the scratch arm is not in --arms"}
    assert study.verdict(runs, ["scratch"]) == {
        "go": False, "reason": "no verdict: no pre-trained arm in --arms"}
    one_seed = {arm: {0: r[0]} for arm, r in runs.items()}
    assert study.verdict(one_seed, ["integral", "scratch"]) == {
        "go": False, "reason": "no verdict: a 95% interval needs at least 2 seeds with every "
                               "arm run (have 1)"}


def test_markdown_table_verdicts_and_plot(tmp_path):
    runs = {"full": {**_no_go_runs(), **_runs()}, "frozen": _no_go_runs()}
    arms = ["integral", "conventional", "scratch"]
    s = study.summarize_study(runs, arms)
    assert s["verdict"]["full"]["go"] is True and s["verdict"]["frozen"]["go"] is False
    assert set(s["protocols"]) == {"full", "frozen"}
    s.update(wall_s=12.0, settings=_settings())
    md = study.render_markdown(s)
    full, frozen = md.split("## frozen backbone")
    assert "## full fine-tuning (`full`)" in full
    assert "150 iterations (frozen: 100) at batch 4" in full
    assert ("pre-trained arms: integral from `a.pth`; conventional pre-trained here (`itpn_nano`, "
            "12 epochs at batch 32)") in full
    assert "| integral (backbone + pyramid, MIM + MFM) | 3 | 12.0 ± 2.0 (7.0, 17.0)" in full
    assert "| integral - scratch | box AP | +6.0 (+3.5, +8.5) | +6.0, +7.0, +5.0 |" in full
    assert "**Verdict: go: integral beat(s) scratch" in full
    assert "Comparisons between pre-trained arms:" in full
    assert "| integral - conventional | box AP | +6.0" in full
    assert f"**Verdict: {study.NO_GO}: integral - scratch +1.0 box AP" in frozen
    assert ("Differences between pre-trained arms (not interpreted: pre-training does not "
            "beat scratch at this budget):") in frozen
    assert "Comparisons between pre-trained arms" not in frozen
    assert "not COCO" in md
    png = study.plot(s, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    assert Image.open(png).size == (1000, 2 * 380)  # one row per protocol


def test_arguments_are_checked(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    for bad, message in (
            (["--seeds", "0", "0"], "--seeds must be distinct, got [0, 0]"),
            (["--iters", "0"], "--iters must be >= 1"),
            (["--iters", "4", "--evals", "5"],
             "--evals 5 is more than the 4 iterations of protocol full"),
            (["--protocol-iters", "frozen=2", "--evals", "3"],
             "--evals 3 is more than the 2 iterations of protocol frozen"),
            (["--protocol-iters", "heads:5"], "--protocol-iters takes PROTOCOL=N with PROTOCOL "
             "one of ['full', 'frozen', 'heads', 'scarce'] and N >= 1, got 'heads:5'"),
            (["--protocol-iters", "nope=5"], "--protocol-iters takes PROTOCOL=N with PROTOCOL "
             "one of ['full', 'frozen', 'heads', 'scarce'] and N >= 1, got 'nope=5'"),
            (["--num-pool", "-1"], "--num-pool must be >= 0"),
            (["--protocols", "full", "full"], "--protocols must be distinct, got ['full', 'full']"),
            (["--image-size", "100"], "--image-size must be a multiple of 32, got 100"),
            (["--config-file", "configs/nope.py"], "--config-file configs/nope.py does not exist"),
            (["--integral-checkpoint", missing],
             f"--integral-checkpoint {missing} does not exist")):
        with pytest.raises(SystemExit) as exit_:
            study.parse_args(bad + ["--device", "cpu"], REPO)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n"), bad


def test_dry_run_toy_commands(tmp_path, capsys, monkeypatch):
    totals = []
    progress = study.pretrain_progress
    monkeypatch.setattr(study, "pretrain_progress", lambda total: totals.append(total) or
                        progress(total))
    out = tmp_path / "study"
    assert _main(["--output", str(out), "--dry-run", "--device", "cpu",
                       "--arms", "integral", "conventional", "scratch", "mim_only",
                       "--seeds", "0", "1"]) == 0
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines() if "pretrain/main.py" in line]
    modes = sorted(" ".join(line.split("--pyramid ")[1].split()[:3]) for line in lines)
    assert modes == ["off --mfm none", "on --mfm ema", "on --mfm none"]
    # pretraining reads the unlabelled pool, made by the data stage
    assert all(f"--data_path {out}/data/images/pool " in line for line in lines)
    (make,) = [shlex.split(line) for line in text.splitlines() if "make_toy_dataset.py" in line]
    assert make[make.index("--num-pool") + 1] == "4096"
    assert make[make.index("--num-train") + 1] == "256"
    assert totals == [3 * (4096 // 32)] * 3  # progress: steps of the pool
    finetunes = [shlex.split(line) for line in text.splitlines()
                 if "lazyconfig_train_net.py" in line]
    assert len(finetunes) == 4 * 2 * 2  # arms x protocols x seeds
    outs = [next(a.split("=", 1)[1] for a in f if a.startswith("train.output_dir="))
            for f in finetunes]
    # seed-major; within a seed, protocol then arm
    arms = ["integral", "conventional", "scratch", "mim_only"]
    assert outs == [f"{out}/finetune/{p}/{arm}_s{seed}" for seed in (0, 1)
                    for p in ("full", "frozen") for arm in arms]
    for f, path in zip(finetunes, outs):
        assert ("model.backbone.freeze_backbone=True" in f) == ("/frozen/" in path)
        assert "train.eval_period=66" in f and "train.max_iter=200" in f  # 3 evaluations
    scratch = [f for f, o in zip(finetunes, outs) if o.endswith("/full/scratch_s1")]
    assert len(scratch) == 1 and "train.init_checkpoint=''" in scratch[0]
    assert "train.seed=1" in scratch[0]
    conventional = [f for f in finetunes if any("/conventional_s" in a for a in f)]
    assert len(conventional) == 4
    assert all(f"train.init_checkpoint={out}/pretrain_conventional/backbone.pth" in f
               for f in conventional)
    assert not out.exists()


def test_dry_run_one_protocol_pool_off_and_evals(tmp_path, capsys):
    out = tmp_path / "study"
    assert _main(["--output", str(out), "--dry-run", "--device", "cpu", "--arms", "integral",
                  "scratch", "--seeds", "0", "--protocols", "frozen", "--num-pool", "0",
                  "--num-train", "32", "--pretrain-batch", "8", "--pretrain-epochs", "2",
                  "--iters", "10", "--evals", "4"]) == 0
    text = capsys.readouterr().out
    (pre,) = [line for line in text.splitlines() if "pretrain/main.py" in line]
    assert f"--data_path {out}/data/images/train " in pre
    finetunes = [shlex.split(line) for line in text.splitlines()
                 if "lazyconfig_train_net.py" in line]
    assert len(finetunes) == 2
    for f in finetunes:
        assert "model.backbone.freeze_backbone=True" in f and "train.eval_period=2" in f
    assert "fine-tune integral (frozen), seed 0" in text


def test_dry_run_full_scale_commands_parse(tmp_path, capsys):
    """GPU / COCO flags: given checkpoints, a full recipe, torchrun pretraining; the built
    commands parse with the train tool's parser and the recipe accepts the overrides."""
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser

    from itpn_d2.d2.config import apply_overrides

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
    assert len(finetunes) == 3 * 2 * 3  # arms x protocols x seeds
    parser = default_argument_parser()
    cfg = LazyConfig.load(str(REPO / "configs/coco/mask_rcnn_itpn_b.py"))
    for cmd in finetunes:
        args = parser.parse_args(cmd[2:])
        assert args.num_gpus == 8
        assert args.opts[-2:] == ["train.amp.enabled=True", "model.backbone.net.drop_path_rate=0.1"]
        apply_overrides(cfg, args.opts)  # every key exists in the recipe or its targets
    integral = [c for c in finetunes if any("integral_s0" in a for a in c)][0]
    assert f"train.init_checkpoint={ckpt}" in integral
    assert "dataloader.train.dataset.names=coco_2017_train" in integral
    assert not any("img_size" in a for a in integral)  # a given checkpoint: the recipe's
    conventional = [c for c in finetunes if any("conventional_s0" in a for a in c)][0]
    assert "model.backbone.net.img_size=224" in conventional  # pre-trained here at 224


def test_tiny_study_runs_for_real(tmp_path):
    """End to end on one protocol (the others differ only in their overrides, which the
    dry-run tests check): pretraining, 2 arms x 2 seeds, aggregation, table, plot."""
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--output", str(out),
           "--device", "cpu", "--threads", "1", "--no-progress",
           "--arms", "conventional", "scratch", "--seeds", "0", "1", "--protocols", "frozen",
           "--num-train", "8", "--num-val", "2", "--num-pool", "8", "--image-size", "64",
           "--pretrain-epochs", "1", "--pretrain-batch", "8", "--pretrain-warmup", "0",
           "--iters", "2", "--evals", "2", "--batch", "2",
           # a 2-iteration detector may score every box below the recipe's 0.05: keep them all
           "--set", "model.roi_heads.box_predictor.test_score_thresh=0.0"]
    # this checkout's package, in the study and in the commands it runs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["protocols"]) == {"frozen"}
    for protocol, summary in results["protocols"].items():
        assert set(summary["arms"]) == {"conventional", "scratch"}
        for arm in ("conventional", "scratch"):
            assert summary["arms"][arm]["bbox"]["n"] == 2
            runs = summary["arms"][arm]["runs"]
            assert set(runs) == {"0", "1"}
            # evaluated after iterations 1 and 2; the last is the final AP
            assert [p["iteration"] for p in runs["0"]["curve"]] == [1, 2]
            assert runs["0"]["curve"][-1]["value"] == runs["0"]["bbox"]["AP"]
        assert set(results["verdict"][protocol]) == {"go", "reason"}
    assert results["pretraining"]["conventional"]["stage"] == "pretrain_conventional"
    assert "images/pool" in (out / "logs" / "pretrain_conventional.log").read_text()
    md = (out / "results.md").read_text()
    assert md.count("| conventional (backbone only, pyramid random) | 2 |") == 1
    assert md.count("**Verdict: ") == 1
    assert (out / "transfer_study.png").read_bytes()[:4] == b"\x89PNG"
    frozen = (out / "logs" / "finetune_frozen_conventional_s0.log").read_text()
    assert "model.backbone.freeze_backbone=True" in frozen.splitlines()[0]
    assert "NO feature pyramid" in frozen  # the checkpointer flags the random pyramid


def test_checkpoint_img_size_reads_the_pretraining_size(tmp_path):
    from itpn_d2.checkpoint import model_metadata, save_checkpoint

    path = tmp_path / "backbone.pth"
    save_checkpoint({"model": {}, **model_metadata("itpn_nano", {"img_size": 96})}, path)
    assert study.checkpoint_img_size(str(path)) == 96
    save_checkpoint({"model": {}, **model_metadata("itpn_nano", {})}, path)
    assert study.checkpoint_img_size(str(path)) is None
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert study.checkpoint_img_size(str(tmp_path / "junk.pth")) is None


def test_a_given_checkpoint_is_named_by_its_content(tmp_path):
    """A new file under the same path is a new start: the cached fine-tuning runs of that arm
    must not be reused (the fingerprint holds the file's sha256, not only its path)."""
    import hashlib

    ckpt = tmp_path / "integral.pth"
    ckpt.write_bytes(b"first")
    args = study.parse_args(["--output", str(tmp_path / "study"), "--dry-run", "--device", "cpu",
                             "--integral-checkpoint", str(ckpt), "--input-size", "128"], REPO)
    first = study.Study(args, REPO).pretrain("integral", None)["fingerprint"]
    assert first == {"given": str(ckpt), "sha256": hashlib.sha256(b"first").hexdigest()}
    ckpt.write_bytes(b"second")
    assert study.Study(args, REPO).pretrain("integral", None)["fingerprint"] != first

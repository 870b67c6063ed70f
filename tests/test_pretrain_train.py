"""Pretraining runs end to end on the CPU: losses fall, exact resume, checkpoints, bad input."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from _pretrain_utils import REPO, TINY_CLIP, one_thread, register_tiny_clip  # noqa: F401

from itpn_d2.checkpoint import (CheckpointError, load_checkpoint, metadata_of,
                                model_from_checkpoint)
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.modeling import build_itpn
from pretrain.data import DataError
from pretrain.engine import ResumeError, TrainingDiverged
from pretrain.main import main
from pretrain.models import PretrainModel, TeacherError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """32 toy images of 128 px (flat folder), cropped to 64 px by the training augmentation."""
    root = tmp_path_factory.mktemp("pretrain_toy")
    return make_toy_dataset(root, num_train=32, num_val=1, image_size=128)["train"]["image_root"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return register_tiny_clip(tmp_path_factory.mktemp("open_clip_cfg"))


def _run(images, out, *extra):
    argv = ["--model", "itpn_nano", "--data_path", str(images), "--input_size", "64",
            "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out),
            "--log_every", "1", "--vis_images", "0", "--save_every", "1000", "--device", "cpu",
            "--fpn_depth", "1", *extra]
    return main(argv)


def _losses(result):
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("mode", [["--mfm", "none"], ["--mfm", "ema"], ["--mfm", "clip"],
                                  ["--pyramid", "off", "--mfm", "none"]],
                         ids=["mim_only", "mfm_ema", "mfm_clip", "pyramid_off"])
def test_loss_falls(images, tiny_clip, tmp_path, mode):
    extra = list(mode)
    if "clip" in mode:
        extra += ["--teacher", TINY_CLIP, "--teacher_checkpoint", str(tiny_clip)]
    # 50 steps (4 per epoch over 32 images); lr 1e-3 after a one-epoch warm-up. The toy images
    # carry per-pixel noise, so norm_pix MIM falls slowly (predicting zeros gives ~1.0).
    result = _run(images, tmp_path, "--epochs", "13", "--max_steps", "50", "--lr", "1e-3",
                  "--warmup_epochs", "1", "--min_lr", "1e-3", "--weight_decay", "0.0", *extra)
    losses = _losses(result)
    assert len(losses) == 50 and result.step == 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.93 * first, (first, last)
    if "none" not in mode:
        mfm = [h["mfm"] for h in result.history]
        assert sum(mfm[-10:]) < 0.9 * sum(mfm[:10]), mfm

    # The checkpoint: metadata, a `model` that build_itpn loads with no missing key.
    ckpt = load_checkpoint(tmp_path / "checkpoint-last.pth")
    meta = metadata_of(ckpt)
    assert meta["model_name"] == "itpn_nano" and meta["model_overrides"]["img_size"] == 64
    model = build_itpn(meta["model_name"], **meta["model_overrides"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=True)
    assert not missing and not unexpected
    assert (model.pyramid is None) == ("off" in mode)
    assert ckpt["step"] == 50 and ckpt["decoder"] and ckpt["args"]["mfm"] == mode[-1]
    assert (ckpt["teacher"] is not None) == ("ema" in mode)
    assert bool(ckpt["mfm_heads"]) == ("none" not in mode)
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(12))  # epoch 12 stopped mid-way at step 50
    assert {"epoch", "train_loss", "train_mim", "train_mfm", "lr"} <= set(log[0])


def test_kill_and_resume_reproduces_losses_exactly(images, tmp_path):
    # drop path, EMA teacher and workers exercise every random state that must be restored.
    common = ["--epochs", "3", "--lr", "1e-3", "--warmup_epochs", "1", "--drop_path", "0.1",
              "--mfm", "ema", "--ema_momentum", "0.9"]
    full = _run(images, tmp_path / "full", *common)
    assert full.step == 12
    part = _run(images, tmp_path / "part", *common, "--max_steps", "6")  # stops mid-epoch 1
    assert part.step == 6
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint-last.pth")
    assert (ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["step"]) == (1, 2, 6)
    rest = _run(images, tmp_path / "part", *common, "--auto_resume", "--num_workers", "1")
    assert rest.step == 12
    assert _losses(part) + _losses(rest) == _losses(full)
    assert [h["lr"] for h in part.history + rest.history] == [h["lr"] for h in full.history]
    for a, b in zip(full.model.state_dict().values(), rest.model.state_dict().values()):
        assert torch.equal(a, b)
    # The epoch log of the interrupted epoch is complete and equal too.
    logs = [(tmp_path / d / "log.txt").read_text().splitlines() for d in ("full", "part")]
    strip = [[{k: v for k, v in json.loads(x).items() if k in ("epoch", "train_loss", "lr")}
              for x in log] for log in logs]
    assert strip[0] == strip[1]


def test_resume_from_other_model_or_settings_fails_before_training(images, tmp_path):
    _run(images, tmp_path, "--epochs", "1", "--max_steps", "1", "--mfm", "none")
    ckpt = str(tmp_path / "checkpoint-last.pth")
    with pytest.raises(ResumeError, match="pyramid"):
        _run(images, tmp_path / "b", "--resume", ckpt, "--pyramid", "off", "--mfm", "none")
    with pytest.raises(ResumeError, match="mfm"):
        _run(images, tmp_path / "b", "--resume", ckpt, "--mfm", "ema")
    with pytest.raises(ResumeError, match="model"):
        _run(images, tmp_path / "b", "--resume", ckpt, "--model", "itpn_tiny", "--mfm", "none")
    with pytest.raises(CheckpointError, match="not found"):
        _run(images, tmp_path / "b", "--resume", str(tmp_path / "nope.pth"))
    assert not (tmp_path / "b" / "checkpoint-last.pth").exists()


def test_bad_input_errors(images, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        _run(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        _run(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(TeacherError, match="--teacher_checkpoint"):
        _run(images, tmp_path / "o", "--mfm", "clip")
    with pytest.raises(ValueError, match="--mfm none"):
        _run(images, tmp_path / "o", "--pyramid", "off")
    with pytest.raises(DataError, match="fewer than batch_size"):
        _run(images, tmp_path / "o", "--batch_size", "64")
    # The command line turns it into one line on stderr and exit status 2.
    proc = subprocess.run(
        [sys.executable, "pretrain/main.py", "--model", "itpn_nano", "--mfm", "clip",
         "--data_path", str(images), "--batch_size", "8", "--output_dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --mfm clip needs --teacher_checkpoint")


def test_too_many_unreadable_images_stop_training(tmp_path):
    make_toy_dataset(tmp_path / "toy", num_train=16, num_val=1, image_size=64)
    folder = tmp_path / "toy" / "images" / "train"
    for i in range(2):
        (folder / f"zz_broken_{i}.png").write_bytes(b"not an image")
    args = ["--batch_size", "6", "--epochs", "1", "--mfm", "none"]  # 3 batches use all 18
    with pytest.warns(UserWarning, match="unreadable image"):
        result = _run(folder, tmp_path / "ok", *args, "--max_bad_fraction", "0.2")
    assert result.step == 3
    log = json.loads((tmp_path / "ok" / "log.txt").read_text())
    # broken_0 is replaced by the next file, broken_1, also unreadable: 3 skips in all
    assert log["unreadable_images"] == 3
    with pytest.warns(UserWarning), pytest.raises(DataError, match="unreadable images in epoch 0"):
        _run(folder, tmp_path / "stop", *args, "--max_bad_fraction", "0.05")
    assert not (tmp_path / "stop" / "checkpoint-last.pth").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch):
    _run(images, tmp_path, "--epochs", "1", "--mfm", "none")  # 4 steps, saved at the end
    good = (tmp_path / "checkpoint-last.pth").read_bytes()
    forward = PretrainModel.forward
    calls = {"n": 0}

    def nan_after_two(self, images, masks):
        calls["n"] += 1
        out = forward(self, images, masks)
        if calls["n"] > 2:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(PretrainModel, "forward", nan_after_two)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 7 \(epoch 1\)"):
        _run(images, tmp_path, "--epochs", "3", "--mfm", "none", "--auto_resume")
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == good


def test_reconstruction_grid_export_and_tools(images, tmp_path, capsys):
    result = _run(images, tmp_path, "--epochs", "1", "--mfm", "ema", "--vis_images", "2",
                  "--keep_every", "1")
    grid = tmp_path / "reconstruction" / "epoch_0000.png"
    from PIL import Image

    assert Image.open(grid).size == (3 * 64 + 4, 2 * 64 + 2)
    assert (tmp_path / "checkpoint-0.pth").is_file()
    ckpt = tmp_path / "checkpoint-last.pth"

    # The tools are thin wrappers of pretrain.export / pretrain.visualize (tested in
    # test_pretrain_export.py); here they run on a checkpoint of a full epoch.
    out = tmp_path / "backbone.pth"
    assert _tool("export_backbone").main([str(ckpt), str(out)]) == 0
    model, _ = model_from_checkpoint(load_checkpoint(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, result.model.encoder.state_dict()[k])

    vis = tmp_path / "vis.png"
    files = sorted(str(p) for p in images.iterdir())[:3]
    visualize = _tool("visualize_reconstruction")
    assert visualize.main([str(ckpt), *files, "--out", str(vis)]) == 0
    assert Image.open(vis).size == (3 * 64 + 4, 3 * 64 + 4)
    assert visualize.main([str(out), files[0], "--out", str(vis)]) == 2
    assert "no pixel decoder" in capsys.readouterr().err


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

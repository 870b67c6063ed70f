"""Pretraining under bad input, full disks and interruptions: one clear line, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from _pretrain_utils import (REPO, TINY_CLIP, TINY_CLIP_CFG, one_thread,  # noqa: F401
                             register_tiny_clip)

from itpn_d2.checkpoint import CheckpointError, load_checkpoint, lock_run_dir
from itpn_d2.data.images import load_rgb_image
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.errors import DEBUG_ENV, DiskFullError
from pretrain.data import DataError, PretrainImages
from pretrain.main import cli, main
from pretrain.models import ClipTeacher, TeacherError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening_toy")
    return make_toy_dataset(root, num_train=32, num_val=1, image_size=64)["train"]["image_root"]


def _argv(images, out, *extra):
    return ["--model", "itpn_nano", "--data_path", str(images), "--input_size", "32",
            "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out),
            "--log_every", "1", "--vis_images", "0", "--device", "cpu", "--fpn_depth", "1",
            "--mfm", "none", "--warmup_epochs", "0", "--lr", "1e-3", *extra]


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags,message", [
    (["--max_steps", "0"], "--max_steps: must be >= 1, got 0"),
    (["--ema_momentum", "2"], "--ema_momentum: must be in [0, 1), got 2"),
    (["--drop_path", "2"], "--drop_path: must be in [0, 1), got 2"),
    (["--mask_ratio", "1"], "--mask_ratio: must be in (0, 1), got 1"),
    (["--input_size", "100"], "--input_size: must be a multiple of 16, >= 16, got 100"),
    (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["--epochs", "-3"], "--epochs: must be >= 1, got -3"),
    (["--blr", "0"], "--blr: must be > 0, got 0"),
    (["--warmup_epochs", "nan"], "--warmup_epochs: must be >= 0, got nan"),
    (["--num_workers", "-1"], "--num_workers: must be >= 0, got -1"),
    (["--opt_betas", "0.9", "1"], "--opt_betas: must be in [0, 1), got 1"),
    (["--max_bad_fraction", "1.5"], "--max_bad_fraction: must be in [0, 1], got 1.5"),
    (["--save_every", "0"], "--save_every: must be >= 1, got 0"),
    (["--lr", "x"], "--lr: must be a number, got 'x'"),
    (["--device", "gpu"], "--device: must be cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_flag_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "itpn_nano", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (see --help)\n"


def test_flag_combinations_and_debug(images, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert cli(["--model", "itpn_nano", "--input_size", "16"]) == 2
    assert capsys.readouterr().err == (
        "error: --input_size 16 with --mask_ratio 0.75: mask_ratio 0.75 leaves 0 of 1 tokens "
        "visible; need at least one visible and one masked token; use a larger --input_size\n")
    for warmup in (["--warmup_epochs", "5"], ["--warmup_epochs=5"], ["--warmup", "5"]):
        assert cli(["--model", "itpn_nano", "--epochs", "1", *warmup]) == 2
        assert capsys.readouterr().err == (
            "error: --warmup_epochs 5 is longer than --epochs 1: the learning rate would never "
            "reach its peak; use --warmup_epochs <= --epochs\n")
    (tmp_path / "file").write_text("")
    assert cli(_argv(images, tmp_path / "file")) == 2
    assert capsys.readouterr().err == (f"error: --output_dir {tmp_path / 'file'} is a file, "
                                       f"not a folder\n")
    assert cli(_argv(tmp_path / "missing", tmp_path / "o")) == 2
    assert capsys.readouterr().err == f"error: data folder {tmp_path / 'missing'} does not exist\n"
    with pytest.raises(DataError):  # --debug: the traceback of expected errors too
        cli(_argv(tmp_path / "missing", tmp_path / "o", "--debug"))


# --------------------------------------------------------------------------- images


def _exif_jpeg(path, orientation):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


def test_load_rgb_image_modes(tmp_path):
    ramp = (np.arange(16 * 8).reshape(8, 16) * 512).astype(np.uint16)  # 0 ... 65024
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = np.asarray(load_rgb_image(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all() and out.max() == 253  # not clipped to white

    _exif_jpeg(tmp_path / "rot.jpg", 6)  # rotate 90 degrees clockwise to display
    rot = np.asarray(load_rgb_image(tmp_path / "rot.jpg"))
    assert rot.shape == (40, 20, 3)
    assert rot[:15].mean() > 240 and rot[25:].mean() < 15  # the white half is now on top

    la = np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1)
    la[0, 0, 1] = 255  # one opaque pixel
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = np.asarray(load_rgb_image(tmp_path / "la.png"))
    assert out[0, 0].tolist() == [50, 50, 50] and out[1, 1].tolist() == [255, 255, 255]

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb_image(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [200, 100, 0] and out[1, 1].tolist() == [255, 255, 255]

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(np.asarray(load_rgb_image(tmp_path / "cmyk.jpg"))[1, 1].astype(int)
                  - [255, 0, 0]).max() <= 3
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    assert np.asarray(load_rgb_image(tmp_path / "gray.png"))[0, 0].tolist() == [77] * 3


def test_pretraining_reads_16_bit_and_exif_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(folder / "a.png")  # mid grey
    _exif_jpeg(folder / "b.jpg", 8)  # rotate 90 degrees counter-clockwise
    (folder / "c.png").write_bytes(b"broken")  # skipped and counted, as before
    ds = PretrainImages(folder, 32)
    batch = ds.fixed_batch(2)
    assert batch.dtype == torch.uint8 and int(batch[0].float().mean().round()) == 128
    assert batch[1, :, 24:].float().mean() > 230  # the left (white) half turned to the bottom
    with pytest.warns(UserWarning, match="unreadable image"):
        _, skipped = ds[(2, 0)]
    assert skipped == 1


# --------------------------------------------------------------------------- checkpoints


def _garbage(tmp_path):
    torch.save({"model": {"w": torch.randn(64, 64)}}, tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    files = {"random.pth": np.random.default_rng(0).bytes(4096), "notes.pth": b"hello\n" * 20,
             "truncated.pth": good[:len(good) // 2], "empty.pth": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "other.zip.pth", "w") as z:
        z.writestr("readme.txt", "not torch")
    return [tmp_path / n for n in [*files, "other.zip.pth"]]


def test_garbage_checkpoints_give_one_line(tmp_path):
    whats = []
    for path in _garbage(tmp_path):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        text = str(err.value)
        assert text.startswith(f"{path} is not a PyTorch checkpoint (or not a complete one): ")
        assert "\n" not in text and "weights_only" not in text
        whats.append(text.split(": ", 2)[1].split(" (")[0])
    assert whats == ["its content is not in any torch format"] * 2 + [
        "it is a truncated zip archive", "it is empty",
        "it is a zip archive without torch's data.pkl"]


def test_clip_teacher_of_another_model(tmp_path):
    import open_clip

    tiny = register_tiny_clip(tmp_path / "cfg")
    other = json.loads(json.dumps(TINY_CLIP_CFG))
    other["vision_cfg"]["patch_size"] = 8  # like ViT-B-32 vs ViT-B-16: same keys, other shapes
    (tmp_path / "cfg" / "tiny-p8.json").write_text(json.dumps(other))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.save(open_clip.create_model("tiny-p8", pretrained=None).state_dict(), tmp_path / "p8.pt")
    with pytest.raises(TeacherError) as err:
        ClipTeacher(TINY_CLIP, str(tmp_path / "p8.pt"))
    assert str(err.value) == (
        f"teacher checkpoint {tmp_path / 'p8.pt'} does not fit open_clip '{TINY_CLIP}' (shape "
        f"mismatch ['positional_embedding (37, 64) vs (10, 64)', 'conv1.weight (64, 3, 8, 8) vs "
        f"(64, 3, 16, 16)']): it holds another model; pass --teacher with the open_clip model it "
        f"was saved from, or a --teacher_checkpoint of '{TINY_CLIP}'")
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(1).bytes(1000))
    with pytest.raises(TeacherError, match=r"cannot read teacher checkpoint \(--teacher_checkpoint"
                                           r"\): .*rand.pt is not a PyTorch checkpoint"):
        ClipTeacher(TINY_CLIP, str(tmp_path / "rand.pt"))
    assert tiny.is_file()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                "unexpected pos 1152 vs 1024")],
                         ids=["enospc", "torch_unexpected_pos"])
def test_full_disk_stops_and_keeps_last_checkpoint(images, tmp_path, monkeypatch, capsys, error):
    import itpn_d2.checkpoint as ckpt_module

    calls = []

    class FullDiskTorch:  # torch as itpn_d2.checkpoint sees it: the second save fills the disk
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                f.write(b"partial")
                raise error
            return torch.save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "torch", FullDiskTorch())
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert cli(_argv(images, tmp_path, "--epochs", "3", "--save_every", "1")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: no space left on device writing {tmp_path / 'checkpoint-last.pth'}: "
                   f"free some space or choose another output folder; the last complete "
                   f"checkpoint was kept"]
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["epoch"] == 1  # the good one
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(DiskFullError):  # what train() raises
        main(_argv(images, tmp_path, "--epochs", "3", "--auto_resume"))


def test_stale_temporaries_lock_and_log_without_duplicates(images, tmp_path, capsys):
    full = main(_argv(images, tmp_path / "full", "--epochs", "3"))
    out = tmp_path / "part"
    main(_argv(images, out, "--epochs", "3", "--keep_every", "2", "--save_every", "2"))
    # As if killed during the last save: the epoch-2 line is in log.txt, its checkpoint is not.
    stale = out / ".checkpoint-last.pth.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    with lock_run_dir(out):  # a second run into a busy folder stops before doing anything
        with pytest.raises(CheckpointError, match=f"{out} is in use by another run "
                                                  f"\\(pid {os.getpid()} on .*\\); wait for it"):
            main(_argv(images, out, "--epochs", "3", "--resume", str(out / "checkpoint-1.pth")))
    assert stale.exists()
    rest = main(_argv(images, out, "--epochs", "3", "--resume", str(out / "checkpoint-1.pth")))
    assert not stale.exists() and rest.step == full.step == 12
    assert "removed .checkpoint-last.pth.x1y2.tmp" in capsys.readouterr().err
    logs = [[json.loads(x) for x in (d / "log.txt").read_text().splitlines()]
            for d in (tmp_path / "full", out)]
    assert [e["epoch"] for e in logs[1]] == [0, 1, 2]
    drop = ("img_per_s", "time_s")
    assert ([{k: v for k, v in e.items() if k not in drop} for e in logs[0]]
            == [{k: v for k, v in e.items() if k not in drop} for e in logs[1]])


def test_unwritable_output_dir_is_one_line(images, tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli(_argv(images, tmp_path / "run", "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output_dir: output folder {tmp_path / 'run'} is not writable (Read-only file "
        f"system); choose another output folder")


def test_a_finished_run_is_not_replaced_without_overwrite(images, tmp_path, capsys):
    out = tmp_path / "run"
    first = main(_argv(images, out, "--epochs", "1"))
    finished = (out / "checkpoint-last.pth").read_bytes()
    assert cli(_argv(images, out, "--epochs", "1", "--seed", "1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output_dir {out} holds a pretraining run (checkpoint-last.pth); pass "
        f"--auto_resume to continue it, --overwrite to replace it, or choose another "
        f"--output_dir")
    assert (out / "checkpoint-last.pth").read_bytes() == finished
    more = main(_argv(images, out, "--epochs", "2", "--auto_resume"))  # continues
    assert more.step == 2 * first.step
    again = main(_argv(images, out, "--epochs", "1", "--seed", "1", "--overwrite"))
    assert again.step == first.step
    assert load_checkpoint(out / "checkpoint-last.pth")["args"]["seed"] == 1


def test_a_kill_between_the_saves_of_an_epoch_loses_no_kept_snapshot(images, tmp_path,
                                                                     monkeypatch):
    """With --keep_every 1 an epoch writes two files; a kill after the first must not leave a
    checkpoint-last.pth that resumes past a snapshot never written."""
    import pretrain.checkpointing as checkpointing  # save_training_state calls save_checkpoint

    class Killed(BaseException):  # not an Exception: nothing in the loop may catch it
        pass

    save, written = checkpointing.save_checkpoint, []

    def save_then_die(obj, path):
        if len(written) == 3:  # the second file of the second epoch
            raise Killed
        written.append(path.name)
        save(obj, path)

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    argv = _argv(images, tmp_path, "--epochs", "3", "--keep_every", "1", "--auto_resume")
    with pytest.raises(Killed):
        main(argv)
    assert written == ["checkpoint-0.pth", "checkpoint-last.pth", "checkpoint-1.pth"]
    last, kept = (load_checkpoint(tmp_path / n) for n in ("checkpoint-last.pth",
                                                           "checkpoint-0.pth"))
    assert last["step"] == kept["step"] == 4  # epoch 0's state
    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    main(argv)  # resumes after epoch 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    assert load_checkpoint(tmp_path / "checkpoint-1.pth")["step"] == 8


# --------------------------------------------------------------------------- kill -9 in saves


def test_sigkill_during_checkpoint_saves_then_resume(images, tmp_path):
    """Kill the run while it writes a checkpoint, three times; every file left loads, the
    temporaries go at the next start, and --auto_resume finishes with a clean log."""
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain/main.py",
           *_argv(images, out, "--epochs", "5", "--save_every", "1", "--keep_every", "2",
                  "--auto_resume")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    kills = 0
    for k in range(3):  # in the 1st, 2nd, 1st save of each run (1st: before any checkpoint)
        before = {p.name for p in out.glob(".*.tmp")}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline, seen = time.time() + 60, set()
        while proc.poll() is None and time.time() < deadline:
            seen |= {p.name for p in out.glob(".*.tmp")} - before  # a save is under way
            if len(seen) > k % 2:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.001)
        proc.wait()
        for path in out.glob("checkpoint*.pth"):
            assert load_checkpoint(path)["step"] > 0, path  # nothing half-written
    assert kills == 3
    # A kill can land just after the rename, so a leftover is not guaranteed: plant one as well.
    (out / ".checkpoint-last.pth.planted.tmp").write_bytes(b"half a checkpoint")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "checkpoint-last.pth")["step"] == 5 * 4
    epochs = [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()]
    assert epochs == list(range(5))

"""Checkpoint files: atomic writes, safe loading, metadata, clear errors."""

import os
import pickle
from collections import OrderedDict

import pytest
import torch

from itpn_d2.checkpoint import (CheckpointError, FORMAT_VERSION, check_state_dict,
                                load_checkpoint, metadata_of, model_from_checkpoint,
                                model_metadata, save_checkpoint)
from itpn_d2.modeling import build_itpn


class Payload:  # not on the allow-list
    pass


def test_save_is_atomic_and_round_trips(tmp_path):
    model = build_itpn("itpn_nano", img_size=64, fpn_depth=1)
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint({"model": model.state_dict(),
                     **model_metadata(model.model_name, model.model_overrides)}, path)
    assert os.listdir(path.parent) == ["ckpt.pth"]  # no temporary file left behind
    rebuilt, ckpt = model_from_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert rebuilt.model_overrides == {"img_size": 64, "fpn_depth": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(1)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(1))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_metadata_is_plain_and_validated():
    meta = model_metadata("itpn_base", {"img_size": (224, 224)})
    assert meta["model_overrides"] == {"img_size": [224, 224]}
    assert meta["pixel_mean"] == [123.675, 116.28, 103.53] and meta["channel_order"] == "RGB"
    assert metadata_of({"model": {}, **meta}) == meta and metadata_of({"model": {}}) is None
    with pytest.raises(ValueError, match="channel_order"):
        model_metadata("itpn_base", {}, channel_order="RBG")


def test_bare_state_dict_is_wrapped(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(OrderedDict(w=torch.ones(2)), path)
    assert set(load_checkpoint(path)) == {"model"}


def test_unlisted_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="will not unpickle"):
        load_checkpoint(path)


@pytest.mark.parametrize("content,match", [
    (b"hello", "not a PyTorch checkpoint"),
    (pickle.dumps([1, 2]), "holds a list"),
])
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    if content.startswith(b"\x80"):
        torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file_and_missing_model_key(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_checkpoint(tmp_path / "e.pth")


def test_other_size_names_mismatched_keys():
    small = build_itpn("itpn_nano", fpn_depth=1).state_dict()
    other = build_itpn("itpn_nano", fpn_dim=32)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(other, small)
    msg = str(err.value)
    assert "missing: pyramid.fuse8.1" in msg
    assert "shape mismatch" in msg and "pyramid.lateral16.weight: (64, 128) vs model (32, 128)" in msg


def test_model_from_checkpoint_needs_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="no 'model_name'"):
        model_from_checkpoint({"model": {}})


def test_save_on_full_disk_keeps_old_file(tmp_path, monkeypatch):
    import errno

    from itpn_d2.errors import DiskFullError

    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(1)}}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match="no space left on device writing .*ckpt.pth"):
        save_checkpoint({"model": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_remove_stale_temporaries(tmp_path):
    from itpn_d2.checkpoint import remove_stale_temporaries

    (tmp_path / ".ckpt.pth.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "ckpt.pth")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".ckpt.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "keep.tmp"]


def test_run_dir_lock_excludes_second_run_until_released(tmp_path):
    import subprocess
    import sys

    from itpn_d2.checkpoint import lock_run_dir

    lock = lock_run_dir(tmp_path / "run")
    # Another process: flock is per open file, so a second process is the real test.
    probe = ("import sys; from itpn_d2.checkpoint import lock_run_dir\n"
             "try:\n    lock_run_dir(sys.argv[1])\nexcept Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")],
                         capture_output=True, text=True, check=True).stdout
    assert "is in use by another run (pid " in out and "choose another output folder" in out
    lock.release()
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")],
                         capture_output=True, text=True, check=True).stdout
    assert out == ""

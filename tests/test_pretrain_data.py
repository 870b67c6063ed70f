"""Pretraining data: folders, unreadable images, deterministic and resumable sampling."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `pretrain` package

from pretrain.data import (DataError, PretrainImages, ResumableSampler,  # noqa: E402
                           UnreadableImageWarning, find_images, normalize)


def _write_images(folder: Path, count: int, size: int = 40, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
            folder / f"img_{i:03d}.png")


def test_flat_folder_and_imagefolder_tree(tmp_path):
    _write_images(tmp_path / "flat", 3)
    root, files = find_images(tmp_path / "flat")
    assert len(files) == 3 and root == tmp_path / "flat"

    _write_images(tmp_path / "tree" / "train" / "n01", 2)
    _write_images(tmp_path / "tree" / "train" / "n02", 2, start=5)
    _write_images(tmp_path / "tree" / "val" / "n01", 4)  # ignored: train/ is used
    root, files = find_images(tmp_path / "tree")
    assert root == tmp_path / "tree" / "train" and len(files) == 4


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        find_images(tmp_path / "empty")


def test_augmentation_is_a_function_of_the_seed(tmp_path):
    _write_images(tmp_path, 2)
    ds = PretrainImages(tmp_path, input_size=32)
    a, bad = ds[(0, 123)]
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and bad == 0
    assert torch.equal(a, ds[(0, 123)][0])
    assert not torch.equal(a, ds[(0, 124)][0])
    x = normalize(a[None])
    assert x.dtype == torch.float32 and x.shape == (1, 3, 32, 32)


def test_cached_images_give_the_same_items_without_reading_the_files_again(tmp_path):
    _write_images(tmp_path, 3)
    plain, cached = PretrainImages(tmp_path, 32), PretrainImages(tmp_path, 32, cache=True)
    items = [(i, 100 + i) for i in range(3)]
    first = [cached[item][0] for item in items]
    assert all(torch.equal(a, plain[item][0]) for a, item in zip(first, items))
    for path in tmp_path.glob("*.png"):  # from now on only the cache can serve them
        path.write_bytes(b"gone")
    for a, item in zip(first, items):
        again, bad = cached[item]
        assert torch.equal(again, a) and bad == 0
    with pytest.warns(UnreadableImageWarning):
        with pytest.raises(DataError):
            plain[(0, 100)]


def test_unreadable_image_is_skipped_with_warning_and_count(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "img_001.png").write_bytes(b"this is not a png")
    ds = PretrainImages(tmp_path, input_size=32)
    with pytest.warns(UnreadableImageWarning, match="img_001.png"):
        img, bad = ds[(1, 7)]
    assert bad == 1 and img.shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[(0, 7)][1] == 0


def test_all_unreadable_gives_one_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"bad_{i}.jpg").write_bytes(b"garbage")
    ds = PretrainImages(tmp_path, input_size=32)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="unreadable"):
        ds[(0, 0)]


def test_sampler_order_follows_seed_and_epoch_and_skips():
    data = list(range(10))
    s = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert sorted(i for i, _ in full) == data
    s2 = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    s2.set_epoch(2, skip=4)
    assert list(s2) == full[4:] and len(s2) == 6
    s2.set_epoch(3)
    assert list(s2) != full
    # Two ranks split a padded epoch without overlap beyond the padding.
    r0 = ResumableSampler(data[:9], num_replicas=2, rank=0, seed=3)
    r1 = ResumableSampler(data[:9], num_replicas=2, rank=1, seed=3)
    idx = [i for i, _ in r0] + [i for i, _ in r1]
    assert len(idx) == 10 and set(idx) == set(range(9))

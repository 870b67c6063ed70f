"""Semantic segmentation tools: ADE20K label preparation, the unchanged ADE20K recipe's loaders on
a miniature ADEChallengeData2016 layout, the train tool (train, resume, eval-only) on the toy
recipe, and the visualisation tool."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import MetadataCatalog

from itpn_d2.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = "configs/toy/upernet_itpn_nano.py"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, env=None, timeout=300):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_prepare_ade20k_label_conversion_and_errors(tmp_path):
    prepare = _load_tool("prepare_ade20k")
    raw = np.array([[0, 1, 150], [2, 0, 75]], dtype=np.uint8)
    assert prepare.convert_label(raw).tolist() == [[255, 0, 149], [1, 255, 74]]
    with pytest.raises(ValueError, match=r"bad\.png: values \[151, 200\] are above 150"):
        prepare.convert_label(np.array([[151, 200]], dtype=np.uint8), "bad.png")

    root = tmp_path / "ADEChallengeData2016"
    with pytest.raises(FileNotFoundError, match="annotations/training does not exist"):
        prepare.main([str(root)])
    for split in prepare.SPLITS:
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(raw).save(root / "annotations" / split / "a.png")
    Image.fromarray(np.full((2, 3), 151, np.uint8)).save(
        root / "annotations" / "validation" / "b.png")
    with pytest.raises(ValueError, match=r"validation/b\.png: values \[151\]"):
        prepare.main([str(root)])


def _miniature_ade20k(toy_root, dst, prepare, num=(4, 2)):
    """ADEChallengeData2016 layout from toy images (JPEG) and raw-style labels (k + 1, 0)."""
    root = dst / "ADEChallengeData2016"
    for (split, ade_split), count in zip((("train", "training"), ("val", "validation")), num):
        (root / "images" / ade_split).mkdir(parents=True)
        (root / "annotations" / ade_split).mkdir(parents=True)
        for i in range(count):
            stem = f"ADE_{ade_split[:5]}_{i:08d}"
            Image.open(toy_root / "images" / split / f"{i:06d}.png").convert("RGB").save(
                root / "images" / ade_split / f"{stem}.jpg", quality=95)
            label = np.asarray(Image.open(toy_root / "sem_seg" / split / f"{i:06d}.png"))
            raw = np.where(label == 255, 0, label.astype(np.int16) + 1).astype(np.uint8)
            Image.fromarray(raw).save(root / "annotations" / ade_split / f"{stem}.png")
    assert prepare.main([str(root)]) == list(num)
    # The conversion gives back the toy labels exactly.
    converted = np.asarray(Image.open(
        root / "annotations_detectron2" / "training" / "ADE_train_00000000.png"))
    assert np.array_equal(converted, np.asarray(Image.open(toy_root / "sem_seg/train/000000.png")))
    return root


_LOADER_SCRIPT = """
import json
from detectron2.config import LazyConfig, instantiate
cfg = LazyConfig.load("configs/ade20k/upernet_itpn_b.py")
cfg.dataloader.train.total_batch_size = 2
cfg.dataloader.train.num_workers = cfg.dataloader.test.num_workers = 0
batch = next(iter(instantiate(cfg.dataloader.train)))
test = next(iter(instantiate(cfg.dataloader.test)))
evaluator = instantiate(cfg.dataloader.evaluator)
print("RESULT " + json.dumps({
    "train": [[list(x["image"].shape), sorted(x["sem_seg"].unique().tolist())] for x in batch],
    "test": [list(test[0]["image"].shape), test[0]["height"], test[0]["width"]],
    "classes": len(evaluator._class_names),
}))
"""


def test_ade20k_recipe_loaders_on_miniature_layout(tmp_path, toy_root):
    prepare = _load_tool("prepare_ade20k")
    _miniature_ade20k(toy_root, tmp_path, prepare)
    # Detectron2 registers its builtin datasets from $DETECTRON2_DATASETS at import time.
    out = _run(["-c", _LOADER_SCRIPT], env={"DETECTRON2_DATASETS": str(tmp_path)})
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert len(result["train"]) == 2
    for shape, labels in result["train"]:
        assert shape[0] == 3 and max(shape[1:]) <= 512 and min(shape[1:]) >= 256
        assert set(labels) <= set(range(6)) | {255}
    # Test: shorter side 512 (128 px toy images are upscaled); height/width are the originals.
    assert result["test"] == [[3, 512, 512], 128, 128]
    assert result["classes"] == 150


@pytest.fixture
def restore_loggers():
    """Detectron2's default_setup turns off propagation of its loggers; later tests' caplog
    relies on it."""
    names = ("detectron2", "fvcore", "d2", "itpn_d2")
    saved = {n: logging.getLogger(n).propagate for n in names}
    yield
    for name, propagate in saved.items():
        logging.getLogger(name).propagate = propagate


def test_train_tool_trains_resumes_and_evaluates_toy_upernet(tmp_path, toy_root, monkeypatch,
                                                              restore_loggers):
    # In-process (the tool's main without launch) to spare three interpreter start-ups.
    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    tool = _load_tool("lazyconfig_train_net")
    out_dir = tmp_path / "out"

    def run(*extra, opts=()):
        args = tool.default_argument_parser().parse_args(
            ["--config-file", str(REPO / TOY_CONFIG), *extra, f"train.output_dir={out_dir}",
             "train.checkpointer.period=1", "train.log_period=1", *opts])
        return tool.main(args)

    run(opts=["train.max_iter=2", "train.eval_period=2"])
    assert (out_dir / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "loss_sem_seg_aux" in m] == [0, 1]
    assert "sem_seg/mIoU" in metrics[-1]  # evaluated at the end of training

    run("--resume", opts=["train.max_iter=3", "train.eval_period=100"])
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "loss_sem_seg_aux" in m] == [0, 1, 2]

    # Evaluating the saved final model reproduces the evaluation at the end of its training.
    results = run("--eval-only", opts=[f"train.init_checkpoint={out_dir / 'model_final.pth'}"])
    assert set(results["sem_seg"]) >= {"mIoU", "fwIoU", "mACC", "pACC", "IoU-background"}
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert results["sem_seg"][key] == pytest.approx(metrics[-1][f"sem_seg/{key}"]), key


def test_visualize_semseg_writes_prediction_and_ground_truth(tmp_path, toy_root, monkeypatch):
    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    visualize = _load_tool("visualize_semseg")
    with pytest.raises(CheckpointError, match="no weights: give --checkpoint model_final.pth "
                                              r"\(or --allow-random-weights"):
        visualize.main(["--config-file", str(REPO / TOY_CONFIG), "--num-images", "1",
                        "--output", str(tmp_path), "--device", "cpu", "--checkpoint", ""])
    written = visualize.main(["--config-file", str(REPO / TOY_CONFIG), "--num-images", "1",
                              "--output", str(tmp_path), "--device", "cpu", "--checkpoint", "",
                              "--allow-random-weights"])
    assert [p.name for p in written] == ["000000.png"]
    assert Image.open(written[0]).size == (256, 128)  # prediction | ground truth
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    written = visualize.main(["--config-file", str(REPO / TOY_CONFIG), "--input", str(image),
                              "--output", str(tmp_path / "vis"), "--device", "cpu",
                              "--allow-random-weights"])
    assert Image.open(written[0]).size == (80, 60)

    image = np.full((64, 128, 3), 100, np.uint8)
    labels = np.full((64, 128), 255)
    labels[:, :32] = 0
    drawn = visualize.draw_sem_seg(image, labels, MetadataCatalog.get("itpn_toy_sem_seg_val"))
    # Class 0 is coloured; pixels labelled 255 away from its name's text are left as they are.
    assert (drawn[:, 96:] == 100).all() and (drawn[:, :4] != 100).any()
    with pytest.raises(FileNotFoundError, match="input image .*nope.jpg does not exist"):
        visualize.main(["--config-file", str(REPO / TOY_CONFIG), "--input",
                        str(tmp_path / "nope.jpg"), "--output", str(tmp_path)])

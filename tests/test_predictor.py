"""itpn_d2.Predictor and tools/predict.py on the toy recipes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.d2.predictor import InputError, Predictor, list_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DET = ROOT / "configs/toy/mask_rcnn_itpn_nano.py"
SEG = ROOT / "configs/toy/upernet_itpn_nano.py"
# Until recipes build at the toy pretraining size by default; few detections: quick drawings.
OVERRIDES = ["model.backbone.net.img_size=128"]
FEW = ["model.roi_heads.box_predictor.test_topk_per_image=5"]


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory):
    """A Detectron2 checkpoint of the toy Mask R-CNN (random weights, seeded)."""
    torch.manual_seed(0)
    model = instantiate(LazyConfig.apply_overrides(LazyConfig.load(str(DET)), OVERRIDES).model)
    path = tmp_path_factory.mktemp("predictor") / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predictor_is_lazy_and_import_itpn_d2_needs_no_detectron2():
    import itpn_d2
    from itpn_d2.d2 import Predictor as d2_predictor

    assert itpn_d2.Predictor is d2_predictor is Predictor
    code = ("import sys, itpn_d2, itpn_d2.modeling, itpn_d2.export; "
            "print('detectron2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


def test_predictor_detection_paths_arrays_and_channel_order(det_checkpoint, toy_root, tmp_path):
    predictor = Predictor(DET, str(det_checkpoint), device="cpu", overrides=OVERRIDES + FEW)
    path = toy_root / "images" / "val" / "000000.png"
    from_file = predictor(path)["instances"]
    assert from_file.image_size == (128, 128) and 0 < len(from_file) <= 5
    assert from_file.pred_masks.shape[1:] == (128, 128)  # full-image masks

    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert torch.equal(predictor(rgb)["instances"].pred_boxes.tensor, from_file.pred_boxes.tensor)
    predictor.input_format = "BGR"  # an OpenCV array: same prediction
    bgr = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"]
    assert torch.equal(bgr.pred_boxes.tensor, from_file.pred_boxes.tensor)
    predictor.input_format = "RGB"
    assert not torch.equal(predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"]
                           .scores, from_file.scores)

    # Outputs are in the given image's pixels, not in the recipe's resized ones (128 short side).
    wide = predictor(np.ascontiguousarray(rgb[:64]))["instances"]
    assert wide.image_size == (64, 128)
    boxes = wide.pred_boxes.tensor
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 64).all()

    # Image files are read with their EXIF orientation applied (6: rotated by 90 degrees).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb[:, :96]).save(tmp_path / "rotated.jpg", exif=exif)
    assert predictor.read_image(tmp_path / "rotated.jpg").shape == (96, 128, 3)
    with pytest.raises(InputError, match="input image .*nope.png does not exist"):
        predictor(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor(rgb.astype(np.float32))


def test_predictor_segmentation_returns_logits_at_input_size():
    predictor = Predictor(SEG, "", device="cpu", overrides=OVERRIDES)
    assert predictor.task == "sem_seg" and predictor.model.inference_mode == "slide"
    logits = predictor(np.full((80, 60, 3), 127, np.uint8))["sem_seg"]
    assert logits.shape == (6, 80, 60) and torch.isfinite(logits).all()


def test_predictor_checks_override_keys():
    from itpn_d2.d2.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean model.backbone.net.img_size"):
        Predictor(SEG, "", device="cpu", overrides=["model.backbone.net.img_siz=128"])
    with pytest.raises(ConfigError, match="did you mean train.max_iter"):
        Predictor(LazyConfig.load(str(SEG)), "", device="cpu", overrides=["trian.max_iter=1"])


def test_predict_tool_detection_writes_coco_results(det_checkpoint, toy_root, tmp_path,
                                                    monkeypatch):
    import pycocotools.mask as mask_util

    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("000000.png", "000001.png"):
        (folder / name).write_bytes((toy_root / "images" / "val" / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    single = toy_root / "images" / "val" / "000002.png"
    out = tmp_path / "pred"
    assert load_tool("predict").main(
        ["--config-file", str(DET), "--checkpoint", str(det_checkpoint), "--input", str(folder),
         str(single), "--output", str(out), "--device", "cpu", "--score-threshold", "0.1",
         *OVERRIDES, *FEW]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["image_id"] for r in results} <= {0, 1, 2}
    assert {r["file_name"] for r in results} <= {str(folder / "000000.png"),
                                                 str(folder / "000001.png"), str(single)}
    for r in results:
        assert set(r) == {"image_id", "file_name", "category_id", "bbox", "score",
                          "segmentation"}
        assert 1 <= r["category_id"] <= 5 and r["score"] >= 0.1  # toy COCO ids are 1..5
        assert len(r["bbox"]) == 4 and r["segmentation"]["size"] == [128, 128]
        assert mask_util.decode(r["segmentation"]).shape == (128, 128)
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["000000.png", "000001.png",
                                                                "000002.png"]


def test_predict_tool_segmentation_writes_label_maps(tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((72, 100, 3), 90, np.uint8)).save(image)
    out = tmp_path / "seg"
    load_tool("predict").main(["--config-file", str(SEG), "--checkpoint", "", "--input",
                               str(image), "--output", str(out), "--device", "cpu",
                               "--allow-random-weights", *OVERRIDES])
    (record,) = json.loads((out / "predictions.json").read_text())
    assert record == {"file_name": str(image), "height": 72, "width": 100,
                      "sem_seg_file_name": "sem_seg/photo.png"}
    labels = np.asarray(Image.open(out / record["sem_seg_file_name"]))
    assert labels.shape == (72, 100) and labels.max() < 6
    assert Image.open(out / "vis" / "photo.png").size == (100, 72)


def test_weights_that_leave_the_model_random_stop_prediction(det_checkpoint, toy_root, tmp_path):
    """A pretraining checkpoint (heads random), another recipe's model_final.pth (heads of the
    other task random) or no weights at all: one CheckpointError naming what stays random,
    unless asked for (--allow-random-weights / allow_random=True)."""
    from itpn_d2.checkpoint import CheckpointError
    from itpn_d2.zoo import zoo_path

    image = toy_root / "images" / "val" / "000000.png"
    tool = load_tool("predict")
    args = ["--input", str(image), "--device", "cpu", *OVERRIDES]
    pretraining = str(zoo_path("itpn_nano_toy_integral"))
    for config, checkpoint, random_part in (
            (DET, pretraining,
             r"heads \(\d+ tensors: proposal_generator\.rpn_head\.\* \(6\), roi_heads"),
            (SEG, str(det_checkpoint), r"heads \(\d+ tensors: sem_seg_head\.")):
        message = (rf"^{checkpoint} \(.*\) leaves part of the model random: {random_part}.*; "
                   rf"give the model_final.pth that training this recipe wrote \(or ")
        with pytest.raises(CheckpointError, match=message + "pass allow_random=True"):
            Predictor(config, checkpoint, device="cpu", overrides=OVERRIDES)
        with pytest.raises(CheckpointError, match=message):
            tool.main(["--config-file", str(config), "--checkpoint", checkpoint, "--output",
                       str(tmp_path / "a"), *args])
    assert not (tmp_path / "a").exists()
    with pytest.raises(CheckpointError, match=r"^no weights: --checkpoint is empty and so is "
                                              r"the config's train.init_checkpoint; .*"
                                              r"--allow-random-weights"):
        tool.main(["--config-file", str(DET), "--checkpoint", "", "--output",
                   str(tmp_path / "b"), *args])
    assert tool.main(["--config-file", str(DET), "--checkpoint", pretraining, "--output",
                      str(tmp_path / "c"), "--allow-random-weights", *args]) == 0
    assert (tmp_path / "c" / "predictions.json").is_file()
    # a complete checkpoint of the recipe loads without a flag
    assert Predictor(DET, str(det_checkpoint), device="cpu", overrides=OVERRIDES).checkpoint


def test_list_images_errors_name_the_input(tmp_path):
    with pytest.raises(InputError, match=f"input {tmp_path / 'nope'} does not exist"):
        list_images([tmp_path / "nope"])
    with pytest.raises(InputError, match="holds no image"):
        list_images([tmp_path])

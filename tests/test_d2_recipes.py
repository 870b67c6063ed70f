"""LazyConfig recipes: toy recipes train/infer, full recipes instantiate and hold the published
settings, itpn_base Mask R-CNN trains one iteration, the COCO loader runs on a mini COCO layout."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from itpn_d2.d2 import ITPNBackbone  # noqa: E402
from itpn_d2.d2.data import DatasetError, check_datasets, prepare_datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY_DETECTION = sorted(p.name for p in (ROOT / "configs/toy").glob("*mask_rcnn*.py"))
FULL = ["mask_rcnn_itpn_b.py", "mask_rcnn_itpn_b_3x.py", "cascade_mask_rcnn_itpn_b_3x.py",
        "mask_rcnn_itpn_l.py"]


def load(path):
    return LazyConfig.load(str(ROOT / "configs" / path))


def test_toy_recipes_are_the_full_recipes_on_the_toy_data():
    """Every toy detection recipe inherits a COCO recipe by import (same heads and optimizer)
    and swaps in itpn_nano, the toy datasets and a schedule a CPU finishes."""
    assert TOY_DETECTION
    for name in TOY_DETECTION:
        source = (ROOT / "configs/toy" / name).read_text()
        parent = re.search(r"from \.\.coco\.(\w+) import", source).group(1)
        toy, full = load(f"toy/{name}"), load(f"coco/{parent}.py")
        assert toy.model.backbone.net.name == "itpn_nano"
        assert toy.model.roi_heads._target_ is full.model.roi_heads._target_, name
        assert toy.optimizer.params == full.optimizer.params
        assert toy.dataloader.train.dataset.names == "itpn_toy_train"
        assert toy.train.max_iter < full.train.max_iter // 100
        # the head changes that made the toy heads learn faster (configs/toy/_detection.py)
        heads = toy.model.roi_heads
        box_heads = heads.box_heads if "box_heads" in heads else [heads.box_head]
        assert [h.conv_norm for h in box_heads] == ["GN"] * len(box_heads), name
        assert heads.mask_head.conv_norm == "GN"
        assert (heads.batch_size_per_image, heads.positive_fraction) == (32, 0.5)
        assert list(toy.model.proposal_generator.pre_nms_topk) == [1000, 1000]
        # LR steps at 90% / 97% of the schedule (the full recipe's are at 75% / 92%)
        steps = toy.lr_multiplier.scheduler.milestones
        assert [m / toy.train.max_iter for m in steps] == [0.9, 0.97, 1.0]


@pytest.mark.parametrize("name", TOY_DETECTION)
def test_toy_recipe_train_and_inference_forward(name, toy_root, monkeypatch):
    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    cfg = load(f"toy/{name}")
    cfg.dataloader.train.total_batch_size = 2
    assert prepare_datasets(cfg) == ["itpn_toy_train", "itpn_toy_val"]
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert batch[0]["image"].shape[0] == 3 and "instances" in batch[0]
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total) and "loss_mask" in losses
    total.backward()
    assert model.backbone.net.backbone.patch_embed.proj.weight.grad is not None
    model.eval()
    test_batch = next(iter(instantiate(cfg.dataloader.test)))
    with torch.no_grad():
        out = model(test_batch)[0]["instances"]
    h, w = test_batch[0]["height"], test_batch[0]["width"]
    assert out.image_size == (h, w) and out.has("pred_masks")


def _lr_of(optimizer, model, name):
    param = dict(model.named_parameters())[name]
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


def test_full_recipes_train_with_the_published_optimizer_and_schedule():
    """What the recipes do, measured on the built objects (the published iTPN-B Mask R-CNN:
    AdamW lr 2e-4, wd 0.05, layer decay 0.9 (0.95 for L), 90k iterations of batch 16 with
    steps at 67.5k / 82.5k, 270k for 3x; RGB input with ImageNet statistics)."""
    for path, decay, total, steps in (("coco/mask_rcnn_itpn_b.py", 0.9, 90000, (67500, 82500)),
                                      ("coco/mask_rcnn_itpn_b_3x.py", 0.9, 270000, None),
                                      ("coco/mask_rcnn_itpn_l.py", 0.95, 90000, None)):
        cfg = load(path)
        with torch.device("meta"):
            model = instantiate(cfg.model)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        assert isinstance(optimizer, torch.optim.AdamW)
        depth = model.backbone.net.backbone.num_layers
        first = "backbone.net.backbone.patch_embed.proj.weight"
        # the patch embedding decays over every layer; the pyramid trains at the heads' LR
        assert _lr_of(optimizer, model, first) == (pytest.approx(2e-4 * decay ** depth), 0.05)
        pyramid = next(n for n, _ in model.named_parameters()
                       if n.startswith("backbone.net.pyramid.") and n.endswith("weight"))
        head = "roi_heads.box_predictor.cls_score.weight"
        for name in (pyramid, head):
            assert _lr_of(optimizer, model, name)[0] == pytest.approx(2e-4), name
        norm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
        assert _lr_of(optimizer, model, f"{norm}.weight")[1] == 0.0  # no decay on norms
        assert cfg.dataloader.train.total_batch_size == 16 and cfg.train.max_iter == total
        sched = instantiate(cfg.lr_multiplier)
        if steps:
            for it, factor in ((steps[0] - 1, 1.0), (steps[0], 0.1), (steps[1], 0.01)):
                assert sched(it / total) == pytest.approx(factor), it
        assert model.input_format == "RGB" and cfg.dataloader.train.mapper.image_format == "RGB"
        heads = model.roi_heads
        assert heads.box_predictor.box_reg_loss_type == "giou"
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in heads.box_head.modules())
        assert list(cfg.model.pixel_mean) == [123.675, 116.28, 103.53]  # meta model: no values
        assert list(cfg.model.pixel_std) == [58.395, 57.12, 57.375]
    c3 = load("coco/cascade_mask_rcnn_itpn_b_3x.py")
    with torch.device("meta"):
        cascade = instantiate(c3.model)
    assert len(cascade.roi_heads.box_predictor) == 3
    assert all(p.box_reg_loss_type == "giou" for p in cascade.roi_heads.box_predictor)


@pytest.mark.parametrize("name", FULL)
def test_full_recipe_instantiates(name, tmp_path):
    """Built on the meta device (no memory, no init cost); the base recipe is trained for one
    iteration under --runslow. The config saves before the train tool sets the optimizer's
    model (as default_setup does) and builds the same from the saved file."""
    cfg = load(f"coco/{name}")
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    cfg = LazyConfig.load(str(tmp_path / "config.yaml"))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model.backbone, ITPNBackbone)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert len(optimizer.param_groups) > 10
    instantiate(cfg.lr_multiplier)


def synthetic_batch(size, num_images=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        inst = Instances((size, size))
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.2, 0.6, 0.4, 0.9]])
        inst.gt_boxes = Boxes(boxes * size)
        inst.gt_classes = torch.tensor([0, 5, 17])
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, (boxes * size).long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(),
                      "instances": inst})
    return batch


def base_train_iteration(size):
    cfg = load("coco/mask_rcnn_itpn_b.py")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    built = time.perf_counter() - t0
    batch = synthetic_batch(size)
    before = model.backbone.net.backbone.blocks[-1].mlp.fc2.weight.detach().clone()
    t0 = time.perf_counter()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    step = time.perf_counter() - t0
    assert torch.isfinite(total)
    assert not torch.equal(before, model.backbone.net.backbone.blocks[-1].mlp.fc2.weight)
    print(f"\nitpn_base Mask R-CNN, {size}x{size}, batch 1, CPU: build {built:.1f}s, "
          f"train iteration {step:.1f}s, losses { {k: round(v.item(), 3) for k, v in losses.items()} }")
    return step


@pytest.mark.slow
def test_itpn_base_mask_rcnn_one_iteration_512():
    base_train_iteration(512)


@pytest.mark.slow
def test_itpn_base_mask_rcnn_one_iteration_1024():
    base_train_iteration(1024)


# --------------------------------------------------------------------------- datasets


def _polygon(mask):
    """The bounding rectangle of a mask as a COCO polygon (toy masks are RLE; COCO's are
    polygons, which the full recipe's mapper expects)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_mini_coco(toy_root, datasets_dir):
    """coco/annotations/instances_{train,val}2017.json + coco/{train,val}2017/ from toy images."""
    import pycocotools.mask as mask_util
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    for split in ("train", "val"):
        src = json.loads((toy_root / "annotations" / f"instances_{split}.json").read_text())
        image_dir = datasets_dir / "coco" / f"{split}2017"
        image_dir.mkdir(parents=True)
        for img in src["images"]:
            os.symlink(toy_root / "images" / split / img["file_name"], image_dir / img["file_name"])
        for ann in src["annotations"]:
            ann["segmentation"] = _polygon(mask_util.decode(ann["segmentation"]))
        # Toy category ids 1..5 stand in for COCO ids 1..5; the builtin coco_2017_* metadata
        # expects the 80 COCO categories.
        src["categories"] = [{"id": c["id"], "name": c["name"], "supercategory": "thing"}
                             for c in COCO_CATEGORIES if c["isthing"]]
        (datasets_dir / "coco" / "annotations").mkdir(exist_ok=True)
        (datasets_dir / "coco" / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(src))


def test_bitmask_mapper_crops_polygon_masks(toy_root):
    """Polygons are rasterised before augmentation, so cropping needs no polygon clipping."""
    import detectron2.data.transforms as T

    from itpn_d2.d2.data import BitmaskDatasetMapper

    mapper = BitmaskDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(16, 16, 64, 64)], image_format="RGB",
        use_instance_mask=True, instance_mask_format="bitmask", recompute_boxes=True)
    record = {"file_name": str(toy_root / "images" / "train" / "000000.png"), "height": 128,
              "width": 128, "image_id": 0, "annotations": [
                  {"bbox": [0, 0, 48, 48], "bbox_mode": 1, "category_id": 1, "iscrowd": 0,
                   "segmentation": [[0, 0, 48, 0, 48, 48, 0, 48]]}]}
    out = mapper(record)
    masks = out["instances"].gt_masks.tensor
    assert masks.shape == (1, 64, 64) and masks.sum() == 32 * 32  # [16, 48) inside the crop
    assert out["instances"].gt_boxes.tensor.tolist() == [[0.0, 0.0, 32.0, 32.0]]


MINI_COCO_SCRIPT = """
import sys
from detectron2.config import LazyConfig, instantiate
from itpn_d2.d2.data import prepare_datasets
cfg = LazyConfig.load("configs/coco/mask_rcnn_itpn_b.py")   # unchanged full recipe
prepare_datasets(cfg)
batch = next(iter(instantiate(cfg.dataloader.train)))
print("TRAIN", len(batch), min(min(d["image"].shape[1:]) for d in batch),
      sum(len(d["instances"]) for d in batch))
test = next(iter(instantiate(cfg.dataloader.test)))
print("TEST", len(test), tuple(test[0]["image"].shape))
"""


def test_full_recipe_loader_on_mini_coco(toy_root, tmp_path):
    make_mini_coco(toy_root, tmp_path)
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", MINI_COCO_SCRIPT], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_line = next(line for line in proc.stdout.splitlines() if line.startswith("TRAIN"))
    _, n, short_side, num_instances = train_line.split()
    assert int(n) == 16  # the recipe's batch, from 16 toy images
    assert 384 <= int(short_side) <= 800 and int(num_instances) > 0
    assert "TEST 1 (3, 800, 800)" in proc.stdout


def test_dataset_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="'coco_2017_trian' is not registered; did you mean "
                                           "coco_2017_train"):
        check_datasets(["coco_2017_trian"])
    # Registered by Detectron2 at import from $DETECTRON2_DATASETS (unset here: ./datasets).
    if not Path(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco").exists():
        with pytest.raises(DatasetError, match=r"json_file .*instances_val2017\.json does not "
                                               r"exist .*DETECTRON2_DATASETS"):
            check_datasets("coco_2017_val")
    cfg = load("toy/mask_rcnn_itpn_nano.py")
    monkeypatch.setenv("ITPN_TOY_ROOT", str(tmp_path / "no_toy"))
    with pytest.raises(DatasetError, match="no_toy.*is missing; make the dataset"):
        prepare_datasets(cfg)

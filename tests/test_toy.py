"""Tests of the synthetic toy dataset (itpn_d2/data/toy.py, tools/make_toy_dataset.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from itpn_d2.data.toy import (
    IGNORE_LABEL,
    make_toy_dataset,
    register_toy_datasets,
    render_toy_image,
    toy_class_names,
    toy_paths,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=4, num_val=2, image_size=64)


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_same_seed_gives_identical_files(tmp_path):
    make_toy_dataset(tmp_path / "a", seed=3, **SMALL)
    make_toy_dataset(tmp_path / "b", seed=3, **SMALL)
    files = _files(tmp_path / "a")
    assert len(files) == 2 * (4 + 2) + 2 + 1  # images + sem_seg, two jsons, meta
    assert files == _files(tmp_path / "b")


def test_other_seed_gives_other_images(tmp_path):
    a = make_toy_dataset(tmp_path / "a", seed=3, **SMALL)["train"]["image_root"]
    b = make_toy_dataset(tmp_path / "b", seed=4, **SMALL)["train"]["image_root"]
    for name in ("000000.png", "000001.png"):
        assert not np.array_equal(_load(a / name), _load(b / name))


def test_splits_differ_and_images_do_not_depend_on_split_size(tmp_path):
    train_image, _, _ = render_toy_image("train", 0, 64, seed=0)
    val_image, _, _ = render_toy_image("val", 0, 64, seed=0)
    assert not np.array_equal(train_image, val_image)
    paths = make_toy_dataset(tmp_path, seed=0, **SMALL)
    np.testing.assert_array_equal(_load(paths["train"]["image_root"] / "000000.png"), train_image)


def test_pool_holds_unlabelled_images_drawn_like_the_labelled_ones(tmp_path):
    paths = make_toy_dataset(tmp_path, num_pool=3, seed=0, **SMALL)
    pool = sorted(paths["pool"].glob("*.png"))
    assert [p.name for p in pool] == ["000000.png", "000001.png", "000002.png"]
    image, instances, _ = render_toy_image("pool", 1, 64, seed=0)
    np.testing.assert_array_equal(_load(pool[1]), image)
    assert instances and not np.array_equal(image, render_toy_image("train", 1, 64, seed=0)[0])
    assert json.loads(paths["meta"].read_text())["num_pool"] == 3
    assert not (tmp_path / "annotations" / "instances_pool.json").exists()
    with pytest.raises(ValueError, match="negative pool"):
        make_toy_dataset(tmp_path, num_pool=-1, **SMALL)


def test_probe_split_is_labelled_and_leaves_the_other_splits_unchanged(tmp_path):
    plain = _files(make_toy_dataset(tmp_path / "a", num_pool=2, seed=0, **SMALL)["root"])
    paths = make_toy_dataset(tmp_path / "b", num_pool=2, num_probe=3, seed=0, **SMALL)
    with_probe = _files(paths["root"])
    probe = paths["probe"]
    assert sorted(p.name for p in probe["image_root"].glob("*.png")) == [
        "000000.png", "000001.png", "000002.png"]
    assert len(json.loads(probe["json_file"].read_text())["images"]) == 3
    assert (probe["sem_seg_root"] / "000002.png").is_file()
    image, _, _ = render_toy_image("probe", 2, 64, seed=0)
    np.testing.assert_array_equal(_load(probe["image_root"] / "000002.png"), image)
    for name, data in plain.items():  # train, val and pool images are the same
        if name.suffix == ".png":
            assert with_probe[name] == data, name
    assert json.loads(paths["meta"].read_text())["num_probe"] == 3
    with pytest.raises(ValueError, match="no negative pool or probe split"):
        make_toy_dataset(tmp_path, num_probe=-1, **SMALL)


def test_shapes_lie_inside_the_image_apart_and_whole():
    for index in range(20):
        _, instances, semantic = render_toy_image("train", index, 128, seed=0)
        assert 1 <= len(instances) <= 4 and IGNORE_LABEL not in semantic
        masks = np.stack([m for _, m in instances])
        assert masks.sum(0).max() == 1  # no pixel belongs to two shapes
        assert not masks[:, [0, -1], :].any() and not masks[:, :, [0, -1]].any()


def test_existing_dataset_is_reused_and_changed_settings_regenerate(tmp_path):
    paths = make_toy_dataset(tmp_path, **SMALL)
    png = paths["train"]["image_root"] / "000000.png"
    stamp = png.stat().st_mtime_ns
    make_toy_dataset(tmp_path, **SMALL)
    assert png.stat().st_mtime_ns == stamp

    make_toy_dataset(tmp_path, num_train=2, num_val=1, image_size=64)
    assert len(list(paths["train"]["image_root"].glob("*.png"))) == 2
    assert len(list(paths["train"]["sem_seg_root"].glob("*.png"))) == 2
    assert json.loads(paths["meta"].read_text())["num_train"] == 2


def test_invalid_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        make_toy_dataset(tmp_path, num_train=1, num_val=1, image_size=100)
    with pytest.raises(ValueError, match="at least one image"):
        make_toy_dataset(tmp_path, num_train=0, num_val=1, image_size=64)


def test_meta_describes_the_dataset(toy_root):
    meta = json.loads(toy_paths(toy_root)["meta"].read_text())
    assert meta["classes"] == toy_class_names()
    assert (meta["num_train"], meta["num_val"], meta["image_size"]) == (16, 8, 128)
    assert meta["ignore_label"] == IGNORE_LABEL and meta["background_label"] == 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_boxes_and_semantic_labels_agree(toy_root, split):
    paths = toy_paths(toy_root)[split]
    coco = COCO(str(paths["json_file"]))
    num_classes = len(toy_class_names())
    assert sorted(coco.getCatIds()) == list(range(1, num_classes + 1))
    assert len(coco.getImgIds()) == {"train": 16, "val": 8}[split]

    num_annotations = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        index = int(Path(info["file_name"]).stem)
        image, instances, semantic = render_toy_image(split, index, 128, seed=0)
        np.testing.assert_array_equal(_load(paths["image_root"] / info["file_name"]), image)
        semantic_png = _load(paths["sem_seg_root"] / info["file_name"])
        np.testing.assert_array_equal(semantic_png, semantic)
        assert semantic_png.dtype == np.uint8
        assert set(np.unique(semantic_png)) <= set(range(num_classes + 1)) | {IGNORE_LABEL}

        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) == len(instances)
        covered = np.zeros(semantic.shape, dtype=bool)
        for annotation, (category, visible) in zip(annotations, instances):
            mask = coco.annToMask(annotation).astype(bool)
            np.testing.assert_array_equal(mask, visible)  # exact round trip
            assert annotation["category_id"] == category and annotation["iscrowd"] == 0
            assert annotation["area"] == mask.sum() >= 1
            ys, xs = np.nonzero(mask)
            x, y, w, h = annotation["bbox"]
            assert (x, y, w, h) == (
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            )
            assert not (covered & mask).any()  # visible parts never overlap
            covered |= mask
            assert (semantic_png[mask] == category).all()
        assert set(np.unique(semantic_png[~covered])) <= {0, IGNORE_LABEL}
        num_annotations += len(annotations)
    assert num_annotations >= len(coco.getImgIds())


def test_importing_toy_does_not_import_detectron2():
    code = "import sys, itpn_d2.data, itpn_d2.data.toy; assert 'detectron2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_writes_requested_sizes(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "make_toy_dataset.py"), str(tmp_path)]
    cmd += ["--num-train", "3", "--num-val", "2", "--image-size", "64", "--seed", "7"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["image_size"], meta["seed"]) == (3, 2, 64, 7)
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 2


def test_label_scarce_subsets_are_the_first_train_images(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=40, num_val=1, image_size=64, seed=1)
    register_toy_datasets(root)
    train = DatasetCatalog.get("itpn_toy_train")
    subset = DatasetCatalog.get("itpn_toy_train_32")
    assert [r["file_name"] for r in subset] == sorted(r["file_name"] for r in train)[:32]
    assert subset == sorted(train, key=lambda r: r["file_name"])[:32]
    sem_seg = DatasetCatalog.get("itpn_toy_sem_seg_train_32")
    assert [r["file_name"] for r in sem_seg] == [r["file_name"] for r in subset]
    assert MetadataCatalog.get("itpn_toy_train_32").thing_classes == toy_class_names()
    # an evaluator of the subset must not read the whole split's json
    assert not hasattr(MetadataCatalog.get("itpn_toy_train_32"), "json_file")
    with pytest.raises(ValueError, match=rf"^toy dataset {root} has 40 train images, fewer than "
                                         rf"the 64 of itpn_toy_train_64; make it with "
                                         rf"`itpn-make-toy {root} --num-train 64`$"):
        DatasetCatalog.get("itpn_toy_train_64")


def test_register_toy_datasets(toy_root):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

    names = register_toy_datasets(toy_root)
    assert register_toy_datasets(toy_root) == names  # registering again is fine
    assert set(names) == {
        "itpn_toy_train",
        "itpn_toy_val",
        "itpn_toy_sem_seg_train",
        "itpn_toy_sem_seg_val",
        "itpn_toy_probe",
        "itpn_toy_sem_seg_probe",
        *(f"itpn_toy{kind}_train_{n}" for kind in ("", "_sem_seg") for n in (32, 64, 128)),
    }
    with pytest.raises(FileNotFoundError, match=f"^toy dataset {toy_root} has no probe split; "
                                                f"make it with `itpn-make-toy {toy_root} "
                                                f"--num-probe 768`$"):
        DatasetCatalog.get("itpn_toy_probe")

    records = DatasetCatalog.get("itpn_toy_train")
    assert len(records) == 16
    assert sum(len(r["annotations"]) for r in records) >= 16
    assert MetadataCatalog.get("itpn_toy_train").thing_classes == toy_class_names()
    assert MetadataCatalog.get("itpn_toy_val").evaluator_type == "coco"
    categories = {a["category_id"] for r in records for a in r["annotations"]}
    assert categories <= set(range(len(toy_class_names())))  # contiguous ids from 0

    mapper = DatasetMapper(
        is_train=True,
        augmentations=[],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    record = next(r for r in records if r["annotations"])
    instances = mapper(record)["instances"]
    assert instances.gt_masks.tensor.shape == (len(record["annotations"]), 128, 128)

    sem_records = DatasetCatalog.get("itpn_toy_sem_seg_val")
    assert len(sem_records) == 8
    assert all(Path(r["sem_seg_file_name"]).is_file() for r in sem_records)
    metadata = MetadataCatalog.get("itpn_toy_sem_seg_val")
    assert metadata.stuff_classes == ["background", *toy_class_names()]
    assert (metadata.ignore_label, metadata.evaluator_type) == (IGNORE_LABEL, "sem_seg")


def test_register_missing_dataset_names_path_and_command(tmp_path):
    pytest.importorskip("detectron2")
    with pytest.raises(FileNotFoundError) as excinfo:
        register_toy_datasets(tmp_path / "nowhere")
    message = str(excinfo.value)
    assert str(tmp_path / "nowhere") in message and "`itpn-make-toy " in message

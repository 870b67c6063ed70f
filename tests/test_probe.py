"""Tests of itpn_d2/probe.py: the classifier, the intervals, the metrics, the loaders, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.checkpoint import model_metadata, save_checkpoint
from itpn_d2.data.toy import make_toy_dataset, register_toy_datasets
from itpn_d2.modeling import build_itpn
from itpn_d2.probe import (ProbeError, accuracy_with_interval, cli, confusion_matrix,
                           fit_linear_probe, load_models, main, segmentation_scores,
                           segmentation_with_interval)
from pretrain.main import main as pretrain_main


def _clusters(n, dim, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linearly_separable_features_reach_99_percent():
    x, y = _clusters(600, 32, 5, spread=1.0, seed=0)
    xv, yv = _clusters(1000, 32, 5, spread=1.0, seed=1)
    probe = fit_linear_probe(x, y, 5)
    acc = accuracy_with_interval((probe.predict(xv) == yv).numpy())
    assert acc["accuracy"] >= 99.0
    assert acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]


def test_shuffled_labels_stay_near_chance():
    """Labels shuffled across items carry no information about the features: the val
    accuracy stays at chance (features without cluster structure, so that no cluster maps
    wholesale onto a wrong class)."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(800, 32, generator=g), torch.randn(2000, 32, generator=g)
    y, yv = (x[:, :5].argmax(1), xv[:, :5].argmax(1))  # learnable labels ...
    shuffled = y[torch.randperm(len(y), generator=g)]  # ... shuffled
    assert (fit_linear_probe(x, y, 5).predict(xv) == yv).float().mean() > 0.9
    probe = fit_linear_probe(x, shuffled, 5)
    acc = accuracy_with_interval((probe.predict(xv) == yv).numpy())
    # chance is 20%; 2000 items give a binomial standard deviation of 0.9 points
    assert abs(acc["accuracy"] - 20.0) < 4.0


def test_accuracy_interval_has_the_binomial_width():
    correct = np.zeros(1500, bool)
    correct[:900] = True  # 60%
    acc = accuracy_with_interval(correct)
    assert acc["accuracy"] == 60.0
    half = 1.96 * 100 * math.sqrt(0.6 * 0.4 / 1500)  # 2.48 points
    low, high = acc["ci95"]
    assert low < 60.0 < high
    assert high - low == pytest.approx(2 * half, rel=0.15)  # 1000 resamples: about 5% noise


def test_confusion_matrix_leaves_ignored_pixels_out():
    label = np.array([[0, 1], [255, 2]])
    pred = np.array([[0, 2], [1, 2]])
    conf = confusion_matrix(pred, label, 3)
    assert conf.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    miou, pacc = segmentation_scores(conf)
    # IoU: class 0 1/1, class 1 0/(1+0), class 2 1/(1+2-1)
    assert miou == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert pacc == pytest.approx(100 * 2 / 3)


def test_dense_miou_equals_detectron2_sem_seg_evaluator(toy_root):
    from detectron2.data import DatasetCatalog
    from itpn_d2.d2.sem_seg_evaluation import ITPNSemSegEvaluator  # stock metrics code
    from itpn_d2.d2.semseg_data import read_label_png

    register_toy_datasets(toy_root)
    name = "itpn_toy_sem_seg_val"
    evaluator = ITPNSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    rng = np.random.default_rng(0)
    per_image = []
    for record in DatasetCatalog.get(name):
        label = read_label_png(record["sem_seg_file_name"]).astype(np.int64)
        # predictions that are right on about half of the pixels
        pred = np.where(rng.random(label.shape) < 0.5, np.where(label == 255, 0, label),
                        rng.integers(0, 6, label.shape))
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 6).permute(2, 0, 1)
        evaluator.process([{"file_name": record["file_name"]}], [{"sem_seg": logits.float()}])
        per_image.append(confusion_matrix(pred, label, 6))
    expected = evaluator.evaluate()["sem_seg"]
    ours = segmentation_with_interval(np.stack(per_image))
    assert ours["miou"] == pytest.approx(expected["mIoU"], abs=1e-9)
    assert ours["pixel_accuracy"] == pytest.approx(expected["pACC"], abs=1e-9)
    assert ours["miou_ci95"][0] < ours["miou"] < ours["miou_ci95"][1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A pretraining checkpoint (one step), its export and a bare state dict."""
    root = tmp_path_factory.mktemp("probe_ckpt")
    images = make_toy_dataset(root / "toy", num_train=4, num_val=1, image_size=64)["train"]
    pretrain_main(["--model", "itpn_nano", "--data_path", str(images["image_root"]),
                   "--input_size", "64", "--batch_size", "4", "--num_workers", "0",
                   "--output_dir", str(root / "run"), "--epochs", "1", "--max_steps", "1",
                   "--vis_images", "0", "--device", "cpu", "--mfm", "ema"])
    export = root / "backbone.pth"
    net = build_itpn("itpn_nano", img_size=64)
    save_checkpoint({"model": net.state_dict(),
                     **model_metadata("itpn_nano", {"img_size": 64})}, export)
    bare = root / "bare.pth"
    torch.save(net.state_dict(), bare)
    return {"pretrain": root / "run" / "checkpoint-last.pth", "export": export, "bare": bare,
            "net": net}


def test_every_kind_of_checkpoint_loads_with_both_baselines(checkpoints):
    for kind in ("pretrain", "export"):
        models = load_models(str(checkpoints[kind]), ["c2", "p4"])
        assert [m.name for m in models] == ["pixels", "random", "checkpoint"]
        images = torch.rand(2, 3, 64, 64) * 255
        feats = models[2].features(images)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"c2": (2, 32, 16, 16),
                                                                 "p4": (2, 64, 4, 4)}
        assert list(models[0].features(images)) == ["pixels"]
    export = load_models(str(checkpoints["export"]), ["p2"])[2]
    ref = checkpoints["net"].eval()
    x = torch.rand(1, 3, 64, 64) * 255
    mean = torch.tensor(export.mean).view(1, 3, 1, 1)
    std = torch.tensor(export.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(export.features(x)["p2"], ref((x - mean) / std)[0])
    random_only = load_models("random:itpn_nano", ["c3"])
    assert [m.name for m in random_only] == ["pixels", "random"]


def test_bad_checkpoints_give_one_line(checkpoints, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    cases = {str(garbage): f"error: {garbage} ",
             str(checkpoints["bare"]): "error: checkpoint has no 'model_name' metadata; "
                                       "convert published checkpoints first",
             str(tmp_path / "missing.pth"): f"error: checkpoint {tmp_path / 'missing.pth'} does "
                                            f"not exist; give a checkpoint file or random:",
             "random:itpn_huge": "error: unknown model 'itpn_huge' in 'random:itpn_huge'"}
    for spec, start in cases.items():
        assert cli([spec, "--protocols", "object", "--no-progress",
                    "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err, err


def test_cli_object_and_dense_on_toy_data(tmp_path):
    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=12, num_val=2, num_probe=6, image_size=64)
    out = tmp_path / "probe"
    report = main(["random:itpn_nano", "--toy-root", str(root), "--output", str(out),
                   "--sources", "c2", "p3", "--input-size", "64", "--no-progress"])
    saved = json.loads((out / "probe.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for protocol in ("object", "dense"):
        result = saved["protocols"][protocol]
        assert [(r["model"], r["source"]) for r in result["rows"]] == [
            ("pixels", "pixels"), ("random", "c2"), ("random", "p3")]
        assert (out / f"probe_{protocol}.png").read_bytes()[:4] == b"\x89PNG"
    obj = saved["protocols"]["object"]
    assert obj["chance"] == 20.0 and obj["val"] == "itpn_toy_probe"
    assert all(0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 100 for r in obj["rows"])
    dense = saved["protocols"]["dense"]
    assert dense["num_val"] == 6 and len(dense["classes"]) == 6


def test_image_protocol_separates_colours(tmp_path):
    """ImageFolder input: red vs blue images are told apart from raw pixels."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 8)):
        for k, channel in enumerate((0, 2)):
            folder = tmp_path / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
                img[..., channel] += 150
                Image.fromarray(img).save(folder / f"{i}.png")
    report = main(["random:itpn_nano", "--protocols", "image", "--sources", "c4",
                   "--image-train", str(tmp_path / "train"), "--image-val", str(tmp_path / "val"),
                   "--input-size", "32", "--output", str(tmp_path / "out"), "--no-progress"])
    rows = {r["model"]: r for r in report["protocols"]["image"]["rows"]}
    assert rows["pixels"]["accuracy"] == 100.0
    assert report["protocols"]["image"]["num_val"] == 16


def test_missing_probe_split_names_the_fix(tmp_path, capsys):
    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=2, num_val=1, image_size=64)
    assert cli(["random:itpn_nano", "--toy-root", str(root), "--no-progress",
                "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: toy dataset {root} has no probe split; make it with " \
                  f"`itpn-make-toy {root} --num-probe 768`", err
    with pytest.raises(ProbeError, match="no pyramid, so it has no p2"):
        net = build_itpn("itpn_nano", pyramid=False)
        path = tmp_path / "nopyr.pth"
        save_checkpoint({"model": net.state_dict(),
                         **model_metadata("itpn_nano", {"pyramid": False})}, path)
        load_models(str(path), ["p2"])

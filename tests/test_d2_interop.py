"""Stock Detectron2 clients: a plain DetectionCheckpointer loads our files, Detectron2's own
lazyconfig_train_net.py trains and evaluates the toy recipe, the recipes register their data."""

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402

from itpn_d2.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from itpn_d2.convert import convert_official_checkpoint  # noqa: E402
from itpn_d2.d2 import ITPNCheckpointer  # noqa: E402
from itpn_d2.data.toy import TOY_IMAGE_SIZE, make_toy_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"mask_rcnn": "configs/toy/mask_rcnn_itpn_nano.py",
           "upernet": "configs/toy/upernet_itpn_nano.py"}
PREFIX = "backbone.net."
TOY_NAMES = ("itpn_toy_train", "itpn_toy_val", "itpn_toy_sem_seg_train", "itpn_toy_sem_seg_val")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upstream_train_net() -> Path:
    """Detectron2's own tools/lazyconfig_train_net.py as released (not kept in this repository):
    in $ITPN_UPSTREAM_TOOLS, by default the folder `make venv` fills inside the venv."""
    install = _tool("install_detectron2")
    folder = Path(os.environ.get("ITPN_UPSTREAM_TOOLS")
                  or Path(sys.prefix) / install.VENV_TOOLS_DIR)
    script = folder / install.TRAIN_NET
    fetch = (f"`make venv` or `{sys.executable} tools/install_detectron2.py "
             f"--upstream-tools {folder}`")
    if not script.is_file():  # a failure, not a skip: CI must run upstream's trainer
        pytest.fail(f"Detectron2's {install.TRAIN_NET} is not in {folder}; fetch it with {fetch} "
                    "(or point ITPN_UPSTREAM_TOOLS at a folder holding it)")
    actual = hashlib.sha256(script.read_bytes()).hexdigest()
    assert actual == install.UPSTREAM_TOOLS_SHA256[install.TRAIN_NET], (
        f"{script} is not the pinned release (sha256 {actual}); rerun {fetch}")
    return script


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny toy dataset, a real one-step pretraining checkpoint (pretrain/main.py at the toy
    size) and its export (tools/export_backbone.py)."""
    from pretrain.main import main as pretrain

    root = tmp_path_factory.mktemp("interop")
    data = make_toy_dataset(root / "toy", num_train=4, num_val=2, seed=0)
    torch.manual_seed(0)
    pretrain(["--model", "itpn_nano", "--data_path", str(data["train"]["image_root"]),
              "--input_size", str(TOY_IMAGE_SIZE), "--batch_size", "4", "--num_workers", "0",
              "--epochs", "1", "--max_steps", "1", "--mfm", "ema", "--vis_images", "0",
              "--device", "cpu", "--output_dir", str(root / "pretrain")])
    pretrained = root / "pretrain" / "checkpoint-last.pth"
    export = root / "backbone.pth"
    assert _tool("export_backbone").main([str(pretrained), str(export)]) == 0
    return {"root": root, "data": data["root"], "pretrain": pretrained, "export": export}


def _unregister_toy():
    for name in TOY_NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", ["export", "pretrain"])
def test_stock_checkpointer_fills_every_backbone_and_pyramid_tensor(files, kind, recipe):
    ckpt = load_checkpoint(files[kind])
    assert ckpt["matching_heuristics"] is True
    assert all(k.startswith(("backbone.", "pyramid.")) for k in ckpt["model"])  # plain ITPN
    model = instantiate(LazyConfig.load(RECIPES[recipe]).model)
    assert model.backbone.net.backbone.img_size == (TOY_IMAGE_SIZE,) * 2
    DetectionCheckpointer(model).load(str(files[kind]))
    sd = model.state_dict()
    net_keys = [k for k in sd if k.startswith(PREFIX)]
    assert len(net_keys) == len(ckpt["model"]) == 123
    for k in net_keys:
        assert torch.equal(sd[k], ckpt["model"][k[len(PREFIX):]]), k


def test_converted_published_checkpoint_loads_stock(tmp_path):
    fixture = torch.load(REPO / "tests" / "data" / "golden_tiny.pt",
                         weights_only=False)["fixtures"]["pixel_rpe0"]
    torch.save({"model": fixture["checkpoint"]["model"]}, tmp_path / "published.pth")
    out = convert_official_checkpoint(tmp_path / "published.pth", tmp_path / "converted.pth",
                                      num_heads=2, verbose=False)
    cfg = LazyConfig.load(RECIPES["mask_rcnn"])
    cfg.model.backbone.net.update(out["model_overrides"])
    fpn_dim = out["model_overrides"]["fpn_dim"]
    cfg.model.proposal_generator.head.in_channels = fpn_dim
    cfg.model.roi_heads.box_head.input_shape.channels = fpn_dim
    cfg.model.roi_heads.mask_head.input_shape.channels = fpn_dim
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(tmp_path / "converted.pth"))
    sd = model.state_dict()
    assert sum(k.startswith(PREFIX) for k in sd) == len(out["model"])
    for k, v in out["model"].items():
        assert torch.equal(sd[PREFIX + k], v), k


def test_files_without_the_flag_still_load(files, tmp_path):
    old = load_checkpoint(files["export"])
    del old["matching_heuristics"]
    save_checkpoint(old, tmp_path / "old.pth")
    # Our checkpointer, and a stock one given Detectron2's query flag on the path.
    for load in (lambda m: ITPNCheckpointer(m).load(str(tmp_path / "old.pth")),
                 lambda m: DetectionCheckpointer(m).load(f"{tmp_path / 'old.pth'}"
                                                         "?matching_heuristics=True")):
        model = instantiate(LazyConfig.load(RECIPES["mask_rcnn"]).model)
        load(model)
        sd = model.state_dict()
        for k, v in old["model"].items():
            assert torch.equal(sd[PREFIX + k], v), k


def test_our_checkpointer_stops_on_a_detector_file_without_our_backbone(tmp_path):
    model = instantiate(LazyConfig.load(RECIPES["mask_rcnn"]).model)
    heads_only = {k: v for k, v in model.state_dict().items() if not k.startswith(PREFIX)}
    path = tmp_path / "other_backbone.pth"
    torch.save({"model": heads_only, "iteration": 10}, path)
    with pytest.raises(CheckpointError) as err:
        ITPNCheckpointer(model).load(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} looks like a Detectron2 checkpoint of a detector")
    assert "holds only 0 of the 123 backbone/pyramid tensors (backbone.net.*)" in message
    assert "Start from an iTPN checkpoint instead" in message


def test_toy_recipes_register_their_datasets_lazily(tmp_path, monkeypatch):
    _unregister_toy()
    monkeypatch.setenv("ITPN_TOY_ROOT", str(tmp_path / "absent"))
    try:
        for recipe in RECIPES.values():
            LazyConfig.load(recipe)  # no dataset on disk: loading the recipe still works
        assert set(TOY_NAMES) <= set(DatasetCatalog.list())
        LazyConfig.load(RECIPES["mask_rcnn"])  # a second registration is harmless
        for name in ("itpn_toy_val", "itpn_toy_sem_seg_train"):
            with pytest.raises(FileNotFoundError, match=(
                    f"toy dataset file {tmp_path / 'absent' / 'meta.json'} is missing; make the "
                    f"dataset with `itpn-make-toy {tmp_path / 'absent'}`")):
                DatasetCatalog.get(name)
    finally:
        _unregister_toy()


def test_upstream_lazyconfig_train_net_trains_and_evaluates_the_toy_recipe(files, tmp_path):
    train_net = _upstream_train_net()
    out = tmp_path / "out"
    env = {**os.environ, "ITPN_TOY_ROOT": str(files["data"]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(train_net), "--config-file", str(REPO / RECIPES["mask_rcnn"]),
         "train.max_iter=2", f"train.output_dir={out}",
         f"train.init_checkpoint={files['export']}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Following weights matched with submodule backbone.net" in log
    missing = log.split("not found in the checkpoint:", 1)[1].split("[", 1)[0]
    assert "roi_heads." in missing and "backbone" not in missing  # only the heads start random
    assert "Shape of" not in log  # nothing skipped for a size mismatch (pos_embed)
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log
    assert (out / "model_final.pth").is_file()

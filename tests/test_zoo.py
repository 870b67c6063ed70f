"""The shipped toy checkpoints (itpn_d2/zoo.py): names, stock Detectron2 loading, provenance,
and probe numbers that reproduce."""

import json

import pytest
import torch

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.checkpoint import load_checkpoint
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.zoo import ZOO_PREFIX, ZooError, zoo_info, zoo_names, zoo_path

SHIPPED = "itpn_nano_toy_integral"


def test_names_paths_and_provenance():
    assert SHIPPED in zoo_names()
    assert zoo_path(SHIPPED) == zoo_path(ZOO_PREFIX + SHIPPED)
    info = zoo_info(SHIPPED)
    assert info["name"] == SHIPPED and info["settings"]["mfm"] == "ema"
    assert info["samples_seen"] >= 100_000 and info["commit"] and "pretrain/main.py" in \
        info["command"]
    ckpt = load_checkpoint(zoo_path(SHIPPED))
    assert ckpt["model_name"] == "itpn_nano" and ckpt["model_overrides"]["img_size"] == 128
    with pytest.raises(ZooError, match=f"^no shipped checkpoint named 'nope'; available: .*"
                                       f"{SHIPPED}"):
        zoo_path("nope")


def test_stock_detection_checkpointer_loads_it_into_the_toy_mask_rcnn():
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    import itpn_d2.d2  # noqa: F401  (registers itpn-zoo://)

    cfg = LazyConfig.load("configs/toy/mask_rcnn_itpn_nano.py")
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(ZOO_PREFIX + SHIPPED)
    shipped = load_checkpoint(zoo_path(SHIPPED))["model"]
    net = model.backbone.net.state_dict()
    assert net.keys() == shipped.keys()  # backbone and pyramid: every key filled
    assert all(torch.equal(net[k], v) for k, v in shipped.items())


def test_object_probe_numbers_reproduce(tmp_path):
    """The best level's object accuracy, as recorded at shipping, within its 95% interval
    (the probe is deterministic; the interval allows for float differences between CPUs)."""
    from itpn_d2.probe import main

    info = zoo_info(SHIPPED)
    rows = info["probe"]["object"]
    best = max((k for k in rows if k.startswith("checkpoint/")), key=lambda k: rows[k]["accuracy"])
    source = best.split("/")[1]
    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=256, num_val=1, num_probe=768)
    report = main([str(zoo_path(SHIPPED)), "--toy-root", str(root), "--protocols", "object",
                   "--sources", source, "--output", str(tmp_path / "probe"), "--no-progress"])
    row = next(r for r in report["protocols"]["object"]["rows"] if r["model"] == "checkpoint")
    low, high = rows[best]["ci95"]
    assert low <= row["accuracy"] <= high
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["checkpoint"] \
        == str(zoo_path(SHIPPED))

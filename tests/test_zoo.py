"""The shipped toy checkpoints (itpn_d2/zoo.py): names, stock Detectron2 loading, provenance,
and probe numbers that reproduce."""

import json

import pytest
import torch

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.checkpoint import load_checkpoint
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.zoo import ZOO_PREFIX, ZooError, zoo_info, zoo_names, zoo_path

# Integral pretrainings (MIM + MFM, pyramid) and their conventional counterparts (--pyramid off
# --mfm none, the same budget): the best (96 epochs) and the 30-epoch pair the demo starts from.
PAIRS = [("itpn_nano_toy_integral", "itpn_nano_toy_conventional"),
         ("itpn_nano_toy_integral_30ep", "itpn_nano_toy_conventional_30ep")]
INTEGRAL = [integral for integral, _ in PAIRS]
ALL = [name for pair in PAIRS for name in pair]


def test_every_shipped_file_is_tested():
    assert zoo_names() == sorted(ALL)


@pytest.mark.parametrize("integral,conventional", PAIRS)
def test_names_paths_and_provenance(integral, conventional):
    assert zoo_path(integral) == zoo_path(ZOO_PREFIX + integral)
    info = zoo_info(integral)
    assert info["name"] == integral and info["settings"]["mfm"] == "ema"
    assert info["samples_seen"] >= 100_000 and info["commit"] and "pretrain/main.py" in \
        info["command"]
    ckpt = load_checkpoint(zoo_path(integral))
    assert ckpt["model_name"] == "itpn_nano" and ckpt["model_overrides"]["img_size"] == 128
    # the counterpart: the same setting and budget, without the pyramid and MFM
    conv = zoo_info(conventional)
    assert conv["settings"]["pyramid"] in (False, "off")  # "off": shipped before it was a bool
    assert conv["settings"]["mfm"] == "none"
    other = ("pyramid", "mfm")
    assert {k: v for k, v in conv["settings"].items() if k not in other} \
        == {k: v for k, v in info["settings"].items() if k not in other}
    assert conv["samples_seen"] == info["samples_seen"]
    with pytest.raises(ZooError, match=f"^no shipped checkpoint named 'nope'; available: .*"
                                       f"{integral}"):
        zoo_path("nope")


@pytest.mark.parametrize("name", ALL)
def test_stock_detection_checkpointer_loads_it_into_the_toy_mask_rcnn(name):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    import itpn_d2.d2  # noqa: F401  (registers itpn-zoo://)

    cfg = LazyConfig.load("configs/toy/mask_rcnn_itpn_nano.py")
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(ZOO_PREFIX + name)
    shipped = load_checkpoint(zoo_path(name))["model"]
    net = model.backbone.net.state_dict()
    if name in INTEGRAL:
        assert net.keys() == shipped.keys()  # backbone and pyramid: every key filled
    else:  # the backbone only: the pyramid stays random, as in the study's conventional arm
        assert shipped.keys() == {k for k in net if k.startswith("backbone.")}
        assert {k.split(".")[0] for k in net.keys() - shipped.keys()} == {"pyramid"}
    assert all(torch.equal(net[k], v) for k, v in shipped.items())


@pytest.mark.parametrize("name", ALL)
def test_object_probe_numbers_reproduce(name, tmp_path):
    """The best level's object accuracy, as recorded at shipping, within its 95% interval
    (the probe is deterministic; the interval allows for float differences between CPUs)."""
    from itpn_d2.probe import main

    info = zoo_info(name)
    rows = info["probe"]["object"]
    best = max((k for k in rows if k.startswith("checkpoint/")), key=lambda k: rows[k]["accuracy"])
    source = best.split("/")[1]
    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=256, num_val=1, num_probe=768)
    report = main([str(zoo_path(name)), "--toy-root", str(root), "--protocols", "object",
                   "--sources", source, "--output", str(tmp_path / "probe"), "--no-progress"])
    row = next(r for r in report["protocols"]["object"]["rows"] if r["model"] == "checkpoint")
    low, high = rows[best]["ci95"]
    assert low <= row["accuracy"] <= high
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["checkpoint"] \
        == str(zoo_path(name))

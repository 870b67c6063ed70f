"""ITPNCheckpointer: pretraining / export / published / Detectron2 checkpoints into a detector."""

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.checkpoint import CheckpointError, model_metadata, save_checkpoint  # noqa: E402
from itpn_d2.d2 import ITPNCheckpointer, check_input_format  # noqa: E402
from itpn_d2.data.toy import TOY_IMAGE_SIZE  # noqa: E402
from itpn_d2.modeling import build_itpn  # noqa: E402

TOY_RECIPE = "configs/toy/mask_rcnn_itpn_nano.py"
GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"
PREFIX = "backbone.net."


def toy_cfg(**net_overrides):
    cfg = LazyConfig.load(TOY_RECIPE)
    fpn_dim = net_overrides.get("fpn_dim", 64)
    cfg.model.backbone.net.update(net_overrides)
    cfg.model.proposal_generator.head.in_channels = fpn_dim
    cfg.model.roi_heads.box_head.input_shape.channels = fpn_dim
    cfg.model.roi_heads.mask_head.input_shape.channels = fpn_dim
    return cfg


def detector(**kw):
    return instantiate(toy_cfg(**kw).model)


def randomized(net):
    """Every tensor distinct from a fresh init, so loading is observable."""
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randn_like(t))
    return net


def pretrain_checkpoint(path, net=None, **extra):
    net = randomized(net if net is not None else build_itpn("itpn_nano", img_size=TOY_IMAGE_SIZE))
    ckpt = {
        "model": net.state_dict(),
        **model_metadata(net.model_name, net.model_overrides),
        # What pretrain/main.py adds besides the model.
        "decoder": {"pred.weight": torch.randn(8, 8), "pred.bias": torch.randn(8)},
        "mfm_heads": {"0.weight": torch.randn(4, 4)},
        "teacher": {k: v.clone() for k, v in net.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "scaler": {}, "epoch": 3, "step": 120, "args": {"model": net.model_name},
        **extra,
    }
    save_checkpoint(ckpt, path)
    return ckpt


def test_pretrain_checkpoint_loads_verbatim(tmp_path, caplog):
    torch.manual_seed(0)
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    model = detector()
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(PREFIX)}
    checkpointer = ITPNCheckpointer(model)
    with caplog.at_level(logging.INFO, logger="itpn_d2"):
        assert checkpointer.load(str(tmp_path / "pretrain.pth")) == {}  # no trainer state
    sd = model.state_dict()
    net_keys = [k for k in sd if k.startswith(PREFIX)]
    assert len(net_keys) == len(ckpt["model"])
    for k in net_keys:  # every backbone and pyramid tensor is the pretrained one
        assert torch.equal(sd[k], ckpt["model"][k[len(PREFIX):]]), k
    for k, v in heads_before.items():  # heads untouched (newly initialised)
        assert torch.equal(sd[k], v), k
    report = checkpointer.last_report
    assert sorted(report["new"]) == sorted(k for k in sd if not k.startswith(PREFIX))
    assert all(k.startswith(("proposal_generator.", "roi_heads.")) for k in report["new"])
    assert set(report["skipped"]) == {"decoder", "mfm_heads", "teacher", "optimizer", "scaler",
                                      "epoch", "step", "args"}
    tables = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    assert len(tables) == 1
    for word in ("loaded: backbone", "loaded: pyramid", "decoder", "teacher", "mfm_heads",
                 "roi_heads.box_head"):
        assert word in tables[0]
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name.startswith("itpn"))


def test_export_without_pyramid_warns_loudly(tmp_path, caplog):
    torch.manual_seed(0)
    net = randomized(build_itpn("itpn_nano", pyramid=False, img_size=TOY_IMAGE_SIZE))
    save_checkpoint({"model": net.state_dict(), **model_metadata(
        "itpn_nano", {"pyramid": False, "img_size": TOY_IMAGE_SIZE})}, tmp_path / "export.pth")
    model = detector()
    pyramid_before = {k: v.clone() for k, v in model.state_dict().items()
                      if k.startswith(PREFIX + "pyramid.")}
    checkpointer = ITPNCheckpointer(model)
    with caplog.at_level(logging.INFO, logger="itpn_d2"):
        checkpointer.load(str(tmp_path / "export.pth"))
    sd = model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(sd[PREFIX + k], v)
    assert set(pyramid_before) <= set(checkpointer.last_report["new"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NO feature pyramid" in w and "RANDOM" in w for w in warnings)


def test_mismatched_pyramid_is_an_error_naming_keys(tmp_path):
    pretrain_checkpoint(tmp_path / "depth1.pth", build_itpn("itpn_nano", fpn_depth=1))
    with pytest.raises(CheckpointError) as err:
        ITPNCheckpointer(detector()).load(str(tmp_path / "depth1.pth"))
    msg = str(err.value)
    assert "backbone.net.pyramid.fuse8.1.norm.weight" in msg and "fpn_depth=1" in msg

    pretrain_checkpoint(tmp_path / "dim32.pth", build_itpn("itpn_nano", fpn_dim=32))
    with pytest.raises(CheckpointError, match=r"pyramid\.lateral16\.weight: \(32, 128\) in "
                                              r"checkpoint vs \(64, 128\) in model"):
        ITPNCheckpointer(detector()).load(str(tmp_path / "dim32.pth"))


def test_checkpoint_of_another_model_names_the_setting(tmp_path):
    """An itpn_tiny checkpoint into the itpn_nano recipe: one line naming
    model.backbone.net.name, not a list of 100+ mismatched shapes."""
    pretrain_checkpoint(tmp_path / "tiny.pth", build_itpn("itpn_tiny", img_size=TOY_IMAGE_SIZE))
    with pytest.raises(CheckpointError) as err:
        ITPNCheckpointer(detector()).load(str(tmp_path / "tiny.pth"))
    assert str(err.value) == (f"{tmp_path / 'tiny.pth'} holds itpn_tiny weights but the config "
                              f"builds itpn_nano; set model.backbone.net.name=itpn_tiny (or give "
                              f"a checkpoint of itpn_nano)")


def test_architecture_mismatch_with_equal_shapes_is_an_error(tmp_path):
    net = build_itpn("itpn_nano", num_heads=8)  # same tensor shapes as 4 heads
    pretrain_checkpoint(tmp_path / "heads8.pth", net)
    with pytest.raises(CheckpointError, match="num_heads=8.*num_heads=4"):
        ITPNCheckpointer(detector()).load(str(tmp_path / "heads8.pth"))


def test_input_format_must_match_pretraining(tmp_path, caplog):
    pretrain_checkpoint(tmp_path / "ckpt.pth")
    cfg = toy_cfg()
    assert cfg.model.input_format == "RGB"
    assert list(cfg.model.pixel_mean) == [123.675, 116.28, 103.53]
    model = instantiate(cfg.model)
    meta = model_metadata("itpn_nano", {})
    assert check_input_format(model, meta) == []

    cfg.model.input_format = "BGR"
    with pytest.raises(CheckpointError, match="pretrained on RGB input but the model reads BGR"):
        ITPNCheckpointer(instantiate(cfg.model)).load(str(tmp_path / "ckpt.pth"))
    cfg.model.input_format = "RGB"
    cfg.model.pixel_mean = [103.53, 116.28, 123.675]  # Detectron2's BGR defaults by accident
    with pytest.raises(CheckpointError, match="model.pixel_mean"):
        ITPNCheckpointer(instantiate(cfg.model)).load(str(tmp_path / "ckpt.pth"))
    with caplog.at_level(logging.WARNING, logger="itpn_d2"):
        ITPNCheckpointer(instantiate(cfg.model), check_inputs="warn").load(str(tmp_path / "ckpt.pth"))
    assert any("model.pixel_mean" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["pixel_rpe0", "pixel_rpe1", "clip_layerscale"])
def test_published_checkpoints_convert_on_the_fly(tmp_path, case):
    from itpn_d2.convert import convert_official_state_dict

    fixture = torch.load(GOLDEN, weights_only=False)["fixtures"][case]
    official = fixture["checkpoint"]["model"]
    save_checkpoint({"model": official}, tmp_path / "published.pth")
    converted, name, overrides, skipped = convert_official_state_dict(
        official, num_heads=fixture["config"]["num_heads"])
    model = detector(**overrides)
    checkpointer = ITPNCheckpointer(model)
    checkpointer.load(str(tmp_path / "published.pth"))
    sd = model.state_dict()
    for k, v in converted.items():
        assert torch.equal(sd[PREFIX + k], v), k
    assert all(k.startswith(("proposal_generator.", "roi_heads."))
               for k in checkpointer.last_report["new"])
    assert any(k.startswith("model: decoder") for k in checkpointer.last_report["skipped"])


def test_detectron2_checkpoint_roundtrip_and_shape_errors(tmp_path):
    torch.manual_seed(0)
    model = detector()
    ITPNCheckpointer(model, str(tmp_path)).save("model_a", iteration=7)
    other = detector()
    checkpointer = ITPNCheckpointer(other, str(tmp_path))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 7
    for (k, v), w in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(v, w), k
    assert checkpointer.last_report["new"] == []

    cfg = toy_cfg()
    cfg.model.roi_heads.num_classes = 7
    with pytest.raises(CheckpointError, match="cls_score.weight"):
        ITPNCheckpointer(instantiate(cfg.model)).load(str(tmp_path / "model_a.pth"))


def test_unsafe_or_foreign_files_are_clear_errors(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("a")}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        ITPNCheckpointer(detector()).load(str(tmp_path / "unsafe.pth"))
    save_checkpoint({"model": {"encoder.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="encoder.weight"):
        ITPNCheckpointer(detector()).load(str(tmp_path / "foreign.pth"))

"""timm: registered names, features_only through forward_intermediates, our checkpoints through
checkpoint_path=, and the one feature description shared with the Detectron2 adapter."""

import pytest
import timm
import torch

import itpn_d2.timm_models  # noqa: F401  (registers the models)
from itpn_d2.checkpoint import D2_LOAD_FLAGS, model_metadata, save_checkpoint
from itpn_d2.modeling import build_itpn, feature_info

NAMES = ["itpn_base", "itpn_large", "itpn_nano", "itpn_small", "itpn_tiny"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export-format file (as tools/export_backbone.py writes) of a randomised itpn_nano."""
    torch.manual_seed(0)
    net = build_itpn("itpn_nano", img_size=128)
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randn_like(t))
    path = tmp_path_factory.mktemp("timm") / "backbone.pth"
    save_checkpoint({"model": net.state_dict(), **model_metadata("itpn_nano", {"img_size": 128}),
                     **D2_LOAD_FLAGS}, path)
    return path, net.state_dict()


def test_models_are_registered_without_hosted_weights():
    assert timm.list_models("itpn*") == NAMES
    model = timm.create_model("itpn_nano", pretrained=False)
    assert model.backbone.img_size == (224, 224) and model.pretrained_cfg["num_classes"] == 0
    with pytest.raises(ValueError, match="no itpn_nano weights are hosted: pass checkpoint_path="):
        timm.create_model("itpn_nano", pretrained=True)
    with pytest.raises(ValueError, match="itpn_nano has no classifier"):
        timm.create_model("itpn_nano", num_classes=10)


def test_features_only_returns_the_three_pyramid_levels():
    model = timm.create_model("itpn_nano", features_only=True, img_size=128).eval()
    assert model.feature_info.channels() == [64, 64, 64]
    assert model.feature_info.reduction() == [4, 8, 16]
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        levels = model(x)
        eager = model.model(x)  # model(x) of the plain network: the same pyramid levels
    assert [tuple(t.shape) for t in levels] == [(2, 64, 32, 24), (2, 64, 16, 12), (2, 64, 8, 6)]
    for ours, ref in zip(levels, eager):
        assert torch.equal(ours, ref)
    with torch.no_grad():
        final, nhwc = model.model.forward_intermediates(x, indices=[-1], output_fmt="NHWC")
    assert torch.equal(nhwc[0], eager[2].permute(0, 2, 3, 1))
    assert tuple(final.shape) == (2, 128, 8, 6)  # the stride-16 backbone stage

    stages = timm.create_model("itpn_tiny", features_only=True, pyramid=False, out_indices=2)
    assert stages.feature_info.channels() == [192, 384]  # backbone stages at strides 8, 16
    assert stages.feature_info.reduction() == [8, 16]


@pytest.mark.parametrize("features_only", [False, True])
def test_checkpoint_path_loads_our_files(export, features_only):
    path, state = export
    model = timm.create_model("itpn_nano", checkpoint_path=str(path), img_size=128,
                              features_only=features_only)
    net = model.model if features_only else model
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_pretrained_file_goes_through_checkpoint_filter_fn(export):
    path, state = export
    model = timm.create_model("itpn_nano", pretrained=True, img_size=128,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_detectron2_adapter_reads_the_same_description():
    pytest.importorskip("detectron2")
    from itpn_d2.d2 import ITPNBackbone
    from itpn_d2.d2.semseg import itpn_feature_shapes

    info = {f["name"]: f for f in feature_info(embed_dim=384, fpn_dim=256)}
    assert [(f["num_chs"], f["reduction"]) for f in info.values()] == [
        (96, 4), (192, 8), (384, 16), (256, 4), (256, 8), (256, 16)]
    backbone = ITPNBackbone(build_itpn("itpn_tiny"), out_features=("c2", "c3", "c4", "p2", "p6"))
    shapes = backbone.output_shape()
    for name in ("c2", "c3", "c4", "p2"):
        assert (shapes[name].channels, shapes[name].stride) == (info[name]["num_chs"],
                                                                info[name]["reduction"])
    assert (shapes["p6"].channels, shapes["p6"].stride) == (256, 64)
    concat = itpn_feature_shapes("itpn_tiny", concat_stages=True)
    assert [concat[k].channels for k in ("p2", "p3", "p4", "p5")] == [352, 448, 640, 640]

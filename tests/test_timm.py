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
    with torch.no_grad():  # timm's forward_features: that stage as one tensor
        assert torch.equal(model.model.forward_features(x), final)

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


@pytest.mark.parametrize("route", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_a_detectron2_model_final_loads_its_backbone_and_pyramid(export, tmp_path, route):
    _, sd = export
    final = tmp_path / "model_final.pth"
    torch.save({"model": {**{f"backbone.net.{k}": v for k, v in sd.items()},
                          "roi_heads.box_predictor.cls_score.weight": torch.zeros(6, 8)},
                "iteration": 100}, final)
    for features_only in (False, True):
        source = {"checkpoint_path": str(final)} if route == "checkpoint_path" else \
            {"pretrained": True, "pretrained_cfg_overlay": dict(file=str(final))}
        model = timm.create_model("itpn_nano", img_size=128, features_only=features_only,
                                  **source)
        net = model.model if features_only else model
        assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())


def test_timm_loading_errors_are_ours(export, tmp_path):
    from itpn_d2.checkpoint import CheckpointError

    path, _ = export
    (tmp_path / "garbage.pth").write_bytes(b"garbage" * 10)
    torch.save([1, 2, 3], tmp_path / "list.pth")

    def overlay(file):
        return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))

    for kwargs, message in (
            (overlay(tmp_path / "garbage.pth"), f"^{tmp_path / 'garbage.pth'} is not a PyTorch "
                                                f"checkpoint"),
            (overlay(tmp_path / "nope.pth"), f"^checkpoint file not found: {tmp_path}/nope.pth$"),
            (overlay(tmp_path / "list.pth"), f"^{tmp_path}/list.pth holds a list, not a "
                                             f"checkpoint dict$"),
            (overlay(path), rf"^{path}: the checkpoint was pre-trained at img_size=128, the model "
                            rf"is built at \(224, 224\): pass img_size=128 to timm.create_model$"),
            # timm's own reader, then our pre-hook
            (dict(checkpoint_path=str(path)), r"^the checkpoint was pre-trained at img_size=128"),
            (dict(checkpoint_path=str(path), img_size=128, fpn_dim=32),
             r"^\d+ tensors do not fit, e.g. pyramid\."),
    ):
        with pytest.raises(CheckpointError, match=message):
            timm.create_model("itpn_nano", **kwargs)
    conventional = build_itpn("itpn_nano", img_size=128, pyramid=False)
    torch.save({"model": conventional.state_dict()}, tmp_path / "conventional.pth")
    with pytest.raises(CheckpointError, match=r"has no pyramid .*: pass pyramid=False to "):
        timm.create_model("itpn_nano", img_size=128,
                          checkpoint_path=str(tmp_path / "conventional.pth"))
    model = timm.create_model("itpn_nano", img_size=128, pyramid=False, features_only=True,
                              checkpoint_path=str(tmp_path / "conventional.pth"))
    assert all(torch.equal(v, conventional.state_dict()[k])
               for k, v in model.model.state_dict().items())


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


def test_timm_optimizer_factory_and_grad_checkpointing_use_the_models_conventions():
    """create_optimizer_v2 with layer decay reads group_matcher / no_weight_decay: its LR
    scales follow ITPN.layer_id and pos_embed gets no weight decay."""
    from timm.optim import create_optimizer_v2

    model = timm.create_model("itpn_nano", img_size=64)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    ids = {id(p): n for n, p in model.named_parameters()}
    top = model.backbone.num_layers  # the pyramid's id: full LR, as in the Detectron2 recipes
    for group in opt.param_groups:
        for p in group["params"]:
            name = ids[id(p)]
            assert group["lr_scale"] == pytest.approx(0.5 ** (top - model.layer_id(name)))
            if name == "backbone.pos_embed":
                assert group["weight_decay"] == 0.0
    assert model.no_weight_decay() == {"backbone.pos_embed"}
    model.set_grad_checkpointing()
    assert model.backbone.use_checkpoint
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model.train()
    sum(o.sum() for o in model(x)).backward()  # checkpointed blocks still give gradients
    assert x.grad is not None and model.backbone.blocks[0].attn.qkv.weight.grad is not None

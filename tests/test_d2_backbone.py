"""Detectron2 backbone (shapes, padding) and layer-wise LR decay."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.d2 import (ITPNBackbone, get_itpn_optimizer_params,  # noqa: E402
                        itpn_layer_id, itpn_lr_factor_func)
from itpn_d2.modeling import build_itpn  # noqa: E402

TOY_RECIPE = "configs/toy/mask_rcnn_itpn_nano.py"


@pytest.fixture(scope="module")
def nano_backbone():
    torch.manual_seed(0)
    return ITPNBackbone(build_itpn("itpn_nano"), out_features=["p2", "p3", "p4", "p5", "p6",
                                                               "c2", "c3", "c4"]).eval()


@pytest.fixture(scope="module")
def toy_detector():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(TOY_RECIPE).model)


def test_outputs_are_the_pyramid_and_pooling(nano_backbone):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = nano_backbone(x)
        s4, s8, s16 = nano_backbone.net.forward_pyramid(x)
    shapes = nano_backbone.output_shape()
    for name, stride in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64]):
        assert shapes[name].stride == stride and shapes[name].channels == 64
        assert out[name].shape == (2, 64, 64 // stride, 96 // stride)
    for name, stride, ch in zip(["c2", "c3", "c4"], [4, 8, 16], [32, 64, 128]):
        assert shapes[name].stride == stride and shapes[name].channels == ch
        assert out[name].shape == (2, ch, 64 // stride, 96 // stride)
    # p2-p4 are the pre-trained pyramid itself, p5/p6 parameter-free 2x average pooling.
    torch.testing.assert_close(out["p2"], s4)
    torch.testing.assert_close(out["p3"], s8)
    torch.testing.assert_close(out["p4"], s16)
    torch.testing.assert_close(out["p5"], F.avg_pool2d(s16, 2, 2))
    torch.testing.assert_close(out["p6"], F.avg_pool2d(out["p5"], 2, 2))


def test_no_parameters_beyond_the_shared_model(nano_backbone):
    assert set(nano_backbone.state_dict()) == {"net." + k for k in nano_backbone.net.state_dict()}


def test_padding_constraints_and_detectron2_padding(toy_detector):
    bb = toy_detector.backbone
    assert bb.size_divisibility == 32
    assert bb.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    images = toy_detector.preprocess_image([{"image": torch.zeros(3, 100, 70)}])
    assert images.tensor.shape[-2:] == (128, 96)
    square = ITPNBackbone(build_itpn("itpn_nano"), square_pad=128)
    assert square.padding_constraints["square_size"] == 128


def test_bad_sizes_and_arguments(nano_backbone):
    with pytest.raises(ValueError, match="multiples of 16"):
        nano_backbone(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="pyramid=False"):
        ITPNBackbone(build_itpn("itpn_nano", pyramid=False))
    with pytest.raises(ValueError, match="out_features"):
        ITPNBackbone(build_itpn("itpn_nano"), out_features=["res5"])
    with pytest.raises(ValueError, match="size_divisibility"):
        ITPNBackbone(build_itpn("itpn_nano"), size_divisibility=24)
    with pytest.raises(ValueError, match="larger than square_pad"):
        ITPNBackbone(build_itpn("itpn_nano"), square_pad=64)(torch.randn(1, 3, 96, 64))
    stages_only = ITPNBackbone(build_itpn("itpn_nano", pyramid=False), out_features=["c2", "c4"])
    assert set(stages_only(torch.randn(1, 3, 32, 32))) == {"c2", "c4"}


def test_large_input_resizes_position_tables_and_uses_sdpa(monkeypatch):
    """A 224-pretrained model with abs. and relative positions runs at 512x512 (32x32 tokens)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    bb = ITPNBackbone(build_itpn("itpn_nano", rpe=True)).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 512, 512))
    assert out["p4"].shape == (1, 64, 32, 32) and out["p6"].shape == (1, 64, 8, 8)
    assert calls == [(1, 4, 32 * 32, 32)] * 4  # every attention block, 1024 tokens


# --------------------------------------------------------------------------- LR decay


def test_layer_ids_nano_detector(toy_detector):
    # itpn_nano: mlp_depth 1, depth 4 -> 9 layer ids (0 = patch embed ... 8 = last block).
    p = "backbone.net.backbone."
    ids = {
        p + "patch_embed.proj.weight": 0,
        p + "stage4.0.mlp.fc1.weight": 1,
        p + "merge4to8.proj.weight": 2,
        p + "stage8.0.norm.weight": 3,
        p + "merge8to16.norm.bias": 4,
        p + "pos_embed": 5,
        p + "blocks.0.attn.qkv.weight": 5,
        p + "blocks.3.mlp.fc2.bias": 8,
        "backbone.net.pyramid.split16to8.proj.weight": 9,
        "backbone.net.pyramid.out4.mlp.fc1.weight": 9,
        "roi_heads.box_head.conv1.weight": 9,
        "proposal_generator.rpn_head.conv.weight": 9,
    }
    assert {k: itpn_layer_id(toy_detector, k) for k in ids} == ids


def test_layer_ids_base():
    with torch.device("meta"):
        net = build_itpn("itpn_base")
    assert net.backbone.num_layers == 33
    assert net.layer_id("backbone.patch_embed.proj.weight") == 0
    assert net.layer_id("backbone.stage4.0.mlp.fc1.weight") == 1
    assert net.layer_id("backbone.merge4to8.proj.weight") == 4
    assert net.layer_id("backbone.merge8to16.proj.weight") == 8
    assert net.layer_id("backbone.blocks.0.attn.qkv.weight") == 9
    assert net.layer_id("backbone.blocks.23.attn.qkv.weight") == 32
    assert net.layer_id("pyramid.fuse4.0.mlp.fc1.weight") == 33


def test_param_groups_lr_and_weight_decay():
    torch.manual_seed(0)
    cfg = LazyConfig.load(TOY_RECIPE)
    cfg.model.backbone.net.rpe = True
    cfg.model.backbone.net.layer_scale_init = 0.1
    model = instantiate(cfg.model)
    groups = get_itpn_optimizer_params(model, base_lr=1.0, lr_decay_rate=0.5,
                                       pyramid_lr_factor=0.25, weight_decay=0.05)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def hp(name):
        return by_param[id(named[name])]

    b = "backbone.net.backbone."
    assert hp(b + "patch_embed.proj.weight")["lr"] == pytest.approx(0.5 ** 9)
    assert hp(b + "blocks.3.attn.qkv.weight")["lr"] == pytest.approx(0.5)
    assert hp("backbone.net.pyramid.fuse4.0.mlp.fc1.weight")["lr"] == pytest.approx(0.25)
    assert hp("roi_heads.box_predictor.cls_score.weight")["lr"] == pytest.approx(1.0)
    for no_decay in [b + "pos_embed", b + "blocks.0.attn.rel_pos_table", b + "blocks.0.ls1.gamma",
                     b + "stage4.0.norm.weight", b + "patch_embed.norm.bias",
                     "backbone.net.pyramid.out4.norm.weight", "roi_heads.box_head.conv1.norm.weight"]:
        assert hp(no_decay)["weight_decay"] == 0.0, no_decay
    for decay in [b + "blocks.0.attn.qkv.weight", "roi_heads.box_head.conv1.weight",
                  b + "blocks.0.attn.qkv.bias"]:
        assert hp(decay)["weight_decay"] == 0.05, decay
    assert sum(len(g["params"]) for g in groups) == len(named)
    # The same factors through Detectron2's own helper.
    from detectron2.solver import get_default_optimizer_params

    d2 = get_default_optimizer_params(model, base_lr=1.0,
                                      lr_factor_func=itpn_lr_factor_func(model, 0.5))
    lrs = {id(p): g["lr"] for g in d2 for p in g["params"]}
    assert lrs[id(named[b + "merge8to16.proj.weight"])] == pytest.approx(0.5 ** 5)

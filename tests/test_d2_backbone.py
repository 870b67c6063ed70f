"""Detectron2 backbone (shapes, padding) and layer-wise LR decay."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.d2 import (ITPNBackbone, itpn_layer_id, itpn_lr_factor_func,  # noqa: E402
                        no_weight_decay_overrides)
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


def test_detector_layer_ids_are_the_nets(toy_detector):
    """Layer ids of the detector's parameters against a hand-written table; ``module.`` (DDP)
    names get the same LR factors."""
    # itpn_nano (one MLP block per early stage, 4 attention blocks), by hand: patch embedding 0,
    # stride-4 block 1, merge 2, stride-8 block 3, merge 4, pos_embed and attention blocks 5-8,
    # the pyramid and the heads 9 (no decay)
    table = [("backbone.net.backbone.patch_embed.", 0), ("backbone.net.backbone.stage4.0.", 1),
             ("backbone.net.backbone.merge4to8.", 2), ("backbone.net.backbone.stage8.0.", 3),
             ("backbone.net.backbone.merge8to16.", 4), ("backbone.net.backbone.pos_embed", 5),
             *((f"backbone.net.backbone.blocks.{i}.", 5 + i) for i in range(4)),
             ("backbone.net.pyramid.", 9), ("", 9)]
    for name, _ in toy_detector.named_parameters():
        want = next(layer for prefix, layer in table if name.startswith(prefix))
        assert itpn_layer_id(toy_detector, name) == want, name
    plain = itpn_lr_factor_func(toy_detector, 0.5)
    wrapped = itpn_lr_factor_func(torch.nn.DataParallel(toy_detector), 0.5)
    for name in ("backbone.net.backbone.patch_embed.proj.weight", "roi_heads.box_head.fc1.bias"):
        assert wrapped("module." + name) == plain(name)
    assert plain("backbone.net.backbone.patch_embed.proj.weight") == 0.5 ** 9


def _recipe_optimizer(cfg, model):
    cfg.optimizer.params.model = model
    return instantiate(cfg.optimizer)


def _hyperparams(model, optimizer):
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(by_param) == sum(len(g["params"]) for g in optimizer.param_groups)
    return {n: (by_param[id(p)]["lr"], by_param[id(p)]["weight_decay"])
            for n, p in model.named_parameters()}


def test_param_groups_lr_and_weight_decay():
    torch.manual_seed(0)
    cfg = LazyConfig.load(TOY_RECIPE)
    cfg.model.backbone.net.rpe = True
    cfg.model.backbone.net.layer_scale_init = 0.1
    cfg.optimizer.lr = 1.0
    cfg.optimizer.weight_decay = 0.05
    cfg.optimizer.params.lr_factor_func.lr_decay_rate = 0.5
    cfg.optimizer.params.lr_factor_func.pyramid_lr_factor = 0.25
    model = instantiate(cfg.model)
    hp = _hyperparams(model, _recipe_optimizer(cfg, model))
    assert len(hp) == len(dict(model.named_parameters()))

    b = "backbone.net.backbone."
    assert hp[b + "patch_embed.proj.weight"][0] == pytest.approx(0.5 ** 9)
    assert hp[b + "merge8to16.proj.weight"][0] == pytest.approx(0.5 ** 5)
    assert hp[b + "blocks.3.attn.qkv.weight"][0] == pytest.approx(0.5)
    assert hp["backbone.net.pyramid.fuse4.0.mlp.fc1.weight"][0] == pytest.approx(0.25)
    assert hp["roi_heads.box_predictor.cls_score.weight"][0] == pytest.approx(1.0)
    for no_decay in [b + "pos_embed", b + "blocks.0.attn.rel_pos_table", b + "blocks.0.ls1.gamma",
                     b + "stage4.0.norm.weight", b + "patch_embed.norm.bias",
                     "backbone.net.pyramid.out4.norm.weight",
                     "roi_heads.box_head.conv1.norm.weight"]:
        assert hp[no_decay][1] == 0.0, no_decay
    for decay in [b + "blocks.0.attn.qkv.weight", "roi_heads.box_head.conv1.weight",
                  b + "blocks.0.attn.qkv.bias"]:
        assert hp[decay][1] == 0.05, decay


@pytest.mark.parametrize("recipe,overrides", [
    (TOY_RECIPE, {"rpe": True, "layer_scale_init": 0.1}),
    ("configs/toy/upernet_itpn_nano.py", {}),
    ("configs/coco/mask_rcnn_itpn_b.py", {}),
    ("configs/coco/mask_rcnn_itpn_b.py", {"rpe": True, "layer_scale_init": 0.1}),
])
def test_every_parameters_lr_and_weight_decay_follow_the_rule(recipe, overrides):
    """The documented rule, parameter by parameter: lr = lr * decay ** (num_layers - layer id)
    (times pyramid_lr_factor in the pyramid), no weight decay on norms and on the net's
    no_weight_decay_names(), the optimizer's weight decay on everything else."""
    cfg = LazyConfig.load(recipe)
    for key, value in overrides.items():
        cfg.model.backbone.net[key] = value
    cfg.optimizer.params.lr_factor_func.pyramid_lr_factor = 0.5
    with torch.device("meta"):
        model = instantiate(cfg.model)
    hp = _hyperparams(model, _recipe_optimizer(cfg, model))
    net = model.backbone.net
    L = net.backbone.num_layers
    decay = cfg.optimizer.params.lr_factor_func.lr_decay_rate
    norms = {f"{m}.{n}" for m, mod in model.named_modules() if "Norm" in type(mod).__name__
             for n, _ in mod.named_parameters(recurse=False)}
    exempt = {"backbone.net." + n for n in net.no_weight_decay_names()}
    assert exempt and not exempt & norms
    for name, (lr, wd) in hp.items():
        rest = name[len("backbone.net."):] if name.startswith("backbone.net.") else None
        want = cfg.optimizer.lr * (1.0 if rest is None else decay ** (L - net.layer_id(rest)))
        if name.startswith("backbone.net.pyramid."):
            want *= 0.5
        assert lr == pytest.approx(want, rel=1e-12), name
        assert wd == (0.0 if name in norms | exempt else cfg.optimizer.weight_decay), name


def test_weight_decay_overrides_refuse_a_head_parameter_of_the_same_name():
    model = torch.nn.Module()
    model.backbone = ITPNBackbone(build_itpn("itpn_nano", layer_scale_init=0.1))
    assert no_weight_decay_overrides(model) == {"gamma": {"weight_decay": 0.0},
                                                "pos_embed": {"weight_decay": 0.0}}
    model.head = torch.nn.Module()
    model.head.gamma = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"parameters \['head.gamma'\] share a name with the "
                                         r"iTPN parameters that take no weight decay"):
        no_weight_decay_overrides(model)


# ------------------------------------------------------------------- frozen backbone


def test_frozen_backbone_trains_only_the_pyramid():
    """freeze_backbone=True: the optimizer gets no HiViT parameter, one step leaves them all
    equal and moves the pyramid's; ``train()`` keeps the HiViT in eval mode (no drop path)."""
    from detectron2.solver import get_default_optimizer_params

    torch.manual_seed(0)
    bb = ITPNBackbone(build_itpn("itpn_nano", drop_path_rate=0.1), freeze_backbone=True)
    bb.train()
    assert all(not m.training for m in bb.net.backbone.modules())
    assert all(m.training for m in bb.net.pyramid.modules())
    assert bb.training
    groups = get_default_optimizer_params(bb)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in bb.net.backbone.parameters())
    assert all(id(p) in in_optimizer for p in bb.net.pyramid.parameters())

    before = {k: v.clone() for k, v in bb.state_dict().items()}
    opt = torch.optim.SGD(groups, lr=0.1)
    sum(o.square().mean() for o in bb(torch.randn(2, 3, 64, 64)).values()).backward()
    opt.step()
    after = bb.state_dict()
    backbone_keys = [k for k in after if k.startswith("net.backbone.")]
    pyramid_keys = [k for k in after if k.startswith("net.pyramid.")]
    assert backbone_keys and pyramid_keys
    assert all(torch.equal(after[k], before[k]) for k in backbone_keys)
    changed = [k for k in pyramid_keys if not torch.equal(after[k], before[k])]
    assert len(changed) == len([p for p in bb.net.pyramid.parameters()])
    bb.eval()
    assert not any(m.training for m in bb.modules())


def test_frozen_backbone_and_pyramid_leave_only_the_heads_to_train():
    """freeze_pyramid=True with freeze_backbone=True: no backbone parameter reaches the
    optimizer, everything stays in eval mode under ``train()``, and the outputs carry no graph."""
    from detectron2.solver import get_default_optimizer_params

    bb = ITPNBackbone(build_itpn("itpn_nano", drop_path_rate=0.1), freeze_backbone=True,
                      freeze_pyramid=True)
    bb.train()
    frozen = (bb.net.backbone, bb.net.pyramid)
    assert not any(m.training for part in frozen for m in part.modules())
    assert get_default_optimizer_params(bb) == []
    assert not any(o.requires_grad for o in bb(torch.randn(1, 3, 64, 64)).values())
    pyramid_only = ITPNBackbone(build_itpn("itpn_nano"), freeze_pyramid=True)
    assert all(p.requires_grad for p in pyramid_only.net.backbone.parameters())
    assert not any(p.requires_grad for p in pyramid_only.net.pyramid.parameters())
    with pytest.raises(ValueError, match="^freeze_pyramid=True but net was built with "
                                         "pyramid=False: there is no pyramid to freeze$"):
        ITPNBackbone(build_itpn("itpn_nano", pyramid=False), out_features=["c4"],
                     freeze_pyramid=True)


def test_freeze_backbone_is_an_accepted_override():
    from itpn_d2.d2.config import load_config

    cfg = load_config(TOY_RECIPE, ["model.backbone.freeze_backbone=True"])
    assert cfg.model.backbone.freeze_backbone is True
    bb = instantiate(cfg.model.backbone)
    assert not any(p.requires_grad for p in bb.net.backbone.parameters())
    assert all(p.requires_grad for p in bb.net.pyramid.parameters())

"""Pretraining model parts: masking, decoders, MFM losses, EMA and CLIP teachers."""

import pytest
import torch

from _pretrain_utils import TINY_CLIP, one_thread, register_tiny_clip  # noqa: F401

from itpn_d2.modeling import build_itpn
from pretrain.models import (ClipTeacher, EMATeacher, FeatureHead, PixelDecoder, TeacherError,
                             build_pretrain_model, ema_momentum, feature_loss, patchify,
                             random_masking, unpatchify)


def _args(**kw):
    args = dict(model="itpn_nano", input_size=64, rpe=False, fpn_depth=1, pyramid="on",
                mfm="ema", teacher=TINY_CLIP, teacher_checkpoint=None, mfm_weight=1.0,
                mfm_loss="smooth_l1", drop_path=0.0, layer_scale_init=None)
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return register_tiny_clip(tmp_path_factory.mktemp("open_clip_cfg"))


def test_random_masking_partitions_tokens_and_follows_generator():
    g = torch.Generator().manual_seed(1)
    m = random_masking(3, 16, 0.75, g)
    assert m.ids_keep.shape == (3, 4) and m.ids_mask.shape == (3, 12)
    for b in range(3):
        both = torch.cat([m.ids_keep[b], m.ids_mask[b]]).sort().values
        assert torch.equal(both, torch.arange(16))
        assert m.mask[b, m.ids_mask[b]].eq(1).all() and m.mask[b, m.ids_keep[b]].eq(0).all()
    again = random_masking(3, 16, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(again.ids_keep, m.ids_keep)
    with pytest.raises(ValueError, match="visible"):
        random_masking(1, 4, 0.9)


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x)
    assert p.shape == (2, 6, 16 * 16 * 3)
    # token 1 is the second 16x16 patch of the first row; pixel (0, 0), channel 2
    assert p[0, 1, 2] == x[0, 2, 0, 16]
    assert torch.equal(unpatchify(p, (2, 3)), x)


def test_decoder_and_head_shapes_and_information_flow():
    torch.manual_seed(0)
    levels = [torch.randn(2, 4, 4, 4, 8), torch.randn(2, 4, 2, 2, 8), torch.randn(2, 4, 1, 1, 8)]
    ids_keep = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    ids_mask = torch.tensor([[i for i in range(16) if i not in (0, 3, 5, 9)],
                             [i for i in range(16) if i not in (1, 2, 8, 15)]])
    dec = PixelDecoder([(8, 4), (8, 2), (8, 1)], dim=32, depth=1, num_heads=2)
    assert dec(levels, ids_keep, (4, 4)).shape == (2, 16, 768)
    assert dec(levels, ids_keep, (4, 4), ids_out=ids_mask).shape == (2, 12, 768)
    head = FeatureHead(8, 4, dim=32, num_heads=2, target_dim=5)
    pred = head(levels[0], ids_keep, ids_mask, (4, 4))
    assert pred.shape == (2, 12, 4, 4, 5)
    # Attention carries visible content to masked positions: changing one visible token's
    # features changes the predictions at masked tokens.
    changed = levels[0].clone()
    changed[0, 0] = torch.randn(4, 4, 8)
    assert not torch.allclose(head(changed, ids_keep, ids_mask, (4, 4))[0], pred[0])


def test_feature_losses():
    t = torch.nn.functional.layer_norm(torch.randn(4, 10), (10,))
    assert feature_loss(t, t, "smooth_l1") == 0
    assert feature_loss(t, t, "cosine").abs() < 1e-6
    assert torch.isclose(feature_loss(-t, t, "cosine"), torch.tensor(2.0))
    d = torch.full((4, 10), 0.5)
    assert torch.isclose(feature_loss(t + d, t, "smooth_l1"), torch.tensor(0.125))  # 0.5*0.5^2
    assert torch.isclose(feature_loss(t + 3, t, "smooth_l1"), torch.tensor(2.5))  # |3| - 0.5
    with pytest.raises(ValueError, match="unknown MFM loss"):
        feature_loss(t, t, "l2")


def test_ema_teacher_gets_no_gradient_and_moves_by_momentum():
    torch.manual_seed(0)
    model = build_pretrain_model(_args())
    teacher = model.teacher
    assert isinstance(teacher, EMATeacher) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 64, 64)
    out = model(x, random_masking(2, 16, 0.75, torch.Generator().manual_seed(0)))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.encoder.backbone.patch_embed.proj.weight.grad is not None

    # After one SGD step the student differs from the teacher; the update is an exact lerp.
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    student = model.encoder.backbone.state_dict()
    teacher.update(model.encoder.backbone, 0.9)
    moved = 0
    for k, v in teacher.backbone.state_dict().items():
        expected = 0.9 * before[k] + 0.1 * student[k]
        assert torch.allclose(v, expected, atol=1e-6), k
        moved += int(not torch.equal(v, before[k]))
    assert moved > 0
    model.train()
    assert not teacher.training  # stays in eval mode


def test_ema_momentum_schedule():
    assert ema_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_mfm_needs_pyramid():
    with pytest.raises(ValueError, match="--mfm none"):
        build_pretrain_model(_args(pyramid="off", mfm="ema"))
    m = build_pretrain_model(_args(pyramid="off", mfm="none"))
    assert m.encoder.pyramid is None and m.teacher is None and len(m.mfm_heads) == 0


def test_pretrain_model_losses_for_every_mode(tiny_clip):
    x = torch.randn(2, 3, 64, 64)
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    clip = dict(mfm="clip", teacher_checkpoint=str(tiny_clip))
    for kw in (dict(mfm="none"), dict(mfm="ema"), clip, dict(mfm="ema", mfm_loss="cosine"),
               dict(pyramid="off", mfm="none")):
        torch.manual_seed(0)
        out = build_pretrain_model(_args(**kw))(x, masks)
        assert torch.isfinite(out.loss)
        if kw["mfm"] == "none":
            assert out.mfm == 0 and torch.equal(out.loss.detach(), out.mim)
        else:
            assert out.mfm > 0
            assert torch.allclose(out.loss.detach(), out.mim + out.mfm)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_the_loss_is_norm_pix_mse_over_masked_patches_plus_weighted_mfm(norm_pix_loss):
    """Pinned by hand: the MIM term is the MSE between the decoder's predictions and each masked
    16 x 16 patch normalised to zero mean / unit (unbiased) variance (the patch itself with
    --norm_pix_loss off), visible patches excluded; the total adds mfm_weight x the MFM term."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 2 + 0.5
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    model = build_pretrain_model(_args(mfm="ema", mfm_weight=0.25, norm_pix_loss=norm_pix_loss))
    preds = []
    model.decoder.register_forward_hook(lambda module, inputs, out: preds.append(out))
    out = model(x, masks)
    (pred,) = preds
    assert pred.shape == (2, 12, 16 * 16 * 3)  # masked patches only: 12 of 16
    target = torch.empty_like(pred)
    for b in range(2):
        for j, index in enumerate(masks.ids_mask[b].tolist()):
            row, col = divmod(index, 4)
            patch = x[b, :, 16 * row:16 * row + 16, 16 * col:16 * col + 16]
            values = patch.permute(1, 2, 0).reshape(-1)  # (row, column, channel) order
            target[b, j] = ((values - values.mean()) / (values.var() + 1e-6).sqrt()
                            if norm_pix_loss else values)
    mim = ((pred - target) ** 2).mean()
    assert torch.allclose(out.mim, mim, rtol=1e-5)
    assert out.mfm > 0 and torch.allclose(out.loss.detach(), mim + 0.25 * out.mfm, rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruct_gives_pixels_of_every_patch(norm_pix_loss):
    """Under norm_pix the decoder's per-patch normalised predictions come back with each true
    patch's mean and standard deviation; without it they are the pixels already."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 3 - 1
    masks = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    model = build_pretrain_model(_args(mfm="none", norm_pix_loss=norm_pix_loss)).eval()
    preds = []
    model.decoder.register_forward_hook(lambda module, inputs, out: preds.append(out))
    recon = model.reconstruct(x, masks)
    (pred,) = preds
    assert recon.shape == pred.shape == (2, 16, 16 * 16 * 3)
    patches = patchify(x)
    if norm_pix_loss:
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        assert torch.allclose(recon, pred * std + patches.mean(dim=-1, keepdim=True), atol=1e-5)
    else:
        assert torch.equal(recon, pred)


def test_clip_teacher_targets(tiny_clip):
    import open_clip

    teacher = ClipTeacher(TINY_CLIP, str(tiny_clip))
    ref = open_clip.create_model(TINY_CLIP, pretrained=None)
    ref.load_state_dict(torch.load(tiny_clip, weights_only=True))
    assert torch.equal(teacher.visual.conv1.weight, ref.visual.conv1.weight)  # file weights
    assert teacher.width == 64 and teacher.target_dims == (64, 64, 64)
    assert all(not p.requires_grad for p in teacher.parameters())

    x = torch.randn(2, 3, 64, 64)
    tokens = teacher.tokens(x)
    assert tokens.shape == (2, 64, 3, 3)  # the teacher's own 48-px grid
    # The documented tokens: last block, after ln_post, before the projection (class token
    # dropped) -- what open_clip returns with output_tokens=True.
    ref.visual.output_tokens = True
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    img = torch.nn.functional.interpolate(x * std + mean, size=(48, 48), mode="bilinear",
                                          antialias=True)
    img = (img - teacher.mean) / teacher.std
    _, ref_tokens = ref.visual(img)
    assert torch.allclose(tokens.flatten(2).transpose(1, 2), ref_tokens, atol=1e-5)

    ids_mask = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    targets = teacher(x, ids_mask)
    assert [tuple(t.shape) for t in targets] == [(2, 4, 4, 4, 64), (2, 4, 2, 2, 64),
                                                 (2, 4, 1, 1, 64)]
    for t in targets:  # layer-normalised per sub-token
        assert t.mean(-1).abs().max() < 1e-4
        assert torch.allclose(t.var(-1, unbiased=False), torch.ones(()), atol=1e-3)

    # A checkpoint of the image tower alone loads too.
    visual_only = tiny_clip.parent / "visual_only.pt"
    torch.save(ref.visual.state_dict(), visual_only)
    t2 = ClipTeacher(TINY_CLIP, str(visual_only))
    assert torch.equal(t2.tokens(x), tokens)


def test_clip_teacher_errors(tiny_clip, tmp_path):
    with pytest.raises(TeacherError, match="--teacher_checkpoint"):
        ClipTeacher(TINY_CLIP, None)
    with pytest.raises(TeacherError, match="not found"):
        ClipTeacher(TINY_CLIP, str(tmp_path / "missing.pt"))
    with pytest.raises(TeacherError, match="unknown open_clip model"):
        ClipTeacher("no-such-model", str(tiny_clip))
    wrong = tmp_path / "wrong.pt"
    torch.save(build_itpn("itpn_nano").state_dict(), wrong)
    with pytest.raises(TeacherError, match="does not fit"):
        ClipTeacher(TINY_CLIP, str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read"):
        ClipTeacher(TINY_CLIP, str(junk))


def test_lr_schedule_warmup_then_cosine():
    from pretrain.engine import lr_at

    lrs = [lr_at(s, 1.0, 0.1, 4, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay
    assert lr_at(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)


def test_weight_decay_groups():
    from pretrain.engine import param_groups

    model = build_pretrain_model(_args(rpe=True, layer_scale_init=0.1))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.backbone.pos_embed" in nd and "decoder.mask_token" in nd
    assert any("rel_pos_table" in n for n in nd) and any(n.endswith(".gamma") for n in nd)
    assert all(not n.endswith(".bias") and "norm" not in n for n in d)
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in d
    assert not any(n.startswith("teacher.") for n in nd | d)  # the EMA teacher is not trained

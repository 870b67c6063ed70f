"""Published iTPN checkpoints: golden outputs, full-size key layouts, the converter tool."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itpn_d2.checkpoint import CheckpointError, check_state_dict, load_checkpoint
from itpn_d2.convert import (convert_official_checkpoint, convert_official_state_dict,
                             infer_official_config)
from itpn_d2.modeling import build_itpn

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]
KEY_FILES = sorted((DATA / "official_keys").glob("*.txt"))


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA / "golden_tiny.pt", weights_only=False)


def _converted_model(case):
    sd, name, overrides, skipped = convert_official_state_dict(
        case["checkpoint"]["model"], num_heads=case["config"]["num_heads"])
    model = build_itpn(name, **overrides).eval()
    model.load_state_dict(sd, strict=True)
    return model, overrides, skipped


@pytest.mark.parametrize("case_name", ["pixel_rpe0", "pixel_rpe1", "clip_layerscale"])
def test_golden_pyramid_outputs(golden, case_name):
    case = golden["fixtures"][case_name]
    model, overrides, _ = _converted_model(case)
    assert overrides["rpe"] if case["config"]["rpe"] else "rpe" not in overrides
    with torch.no_grad():
        _, levels = model.forward_stages_and_levels(golden["input"])
    # the fixture orders levels by stride 16, 8, 4 in the published token layout
    for ref, ours in zip(case["pyramid_full"], reversed(levels)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    if "pyramid_masked" in case:
        with torch.no_grad():
            masked = model.forward_pyramid(golden["input"], ids_keep=golden["ids_keep"])
        for ref, ours in zip(case["pyramid_masked"], reversed(masked)):
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_golden_nchw_layout_matches_the_published_token_layout(golden):
    """NCHW pixel (y, x) of stride 4 is sub-pixel (y % 4, x % 4) of token (y // 4) * 8 + x // 4
    of the published (B, N, 4, 4, C) output on its 8 x 8 token grid."""
    case = golden["fixtures"]["pixel_rpe0"]
    model, _, _ = _converted_model(case)
    with torch.no_grad():
        maps = model.forward_pyramid(golden["input"])
    ref = case["pyramid_full"][2]  # stride 4, (B, N, 4, 4, C)
    B, N, h, w, C = ref.shape
    ys, xs = torch.arange(8 * h)[:, None], torch.arange(8 * w)[None, :]
    expected = ref[:, (ys // h) * 8 + xs // w, ys % h, xs % w, :]  # (B, 8h, 8w, C)
    torch.testing.assert_close(maps[0], expected.movedim(-1, 1), rtol=0, atol=1e-4)


def test_skipped_keys_are_reported_by_name(golden):
    _, _, skipped = _converted_model(golden["fixtures"]["clip_layerscale"])
    assert {"lm_head.weight", "norm_cls.weight", "cls_pt_layers.0.gamma_1",
            "mask_token"} <= set(skipped)
    assert not any(k.startswith(("blocks.", "fpn_modules", "patch_embed")) for k in skipped)


def _random_state_dict(path):
    sd = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        sd[key] = torch.empty(ast.literal_eval(shape))
    return sd


@pytest.mark.parametrize("key_file", KEY_FILES, ids=[p.stem for p in KEY_FILES])
def test_full_size_key_layouts_convert_and_fit(key_file):
    sd = _random_state_dict(key_file)
    state, name, overrides, skipped = convert_official_state_dict(sd)
    with torch.device("meta"):
        model = build_itpn(name, **overrides)
    check_state_dict(model, state)  # no missing, unexpected or mis-shaped key
    expected = {
        "itpn_base_dec512d8b": ("itpn_base", {}),
        "itpn_large_dec512d8b": ("itpn_large", {}),
        "clip_tpn_base_3324_patch16_224": (
            "itpn_base", {"rpe": True, "layer_scale_init": 0.1, "fpn_depth": 1}),
        "itpn_base_3324_patch16_224": ("itpn_base", {"rpe": True, "pyramid": False}),
    }[key_file.stem]
    assert (name, overrides) == expected
    n_backbone = sum(1 for k in state if k.startswith("backbone."))
    assert n_backbone == len(model.backbone.state_dict())
    if overrides.get("pyramid", True):
        assert sum(1 for k in state if k.startswith("pyramid.")) == len(model.pyramid.state_dict())
    assert len(state) + len(skipped) == len(sd)


def test_pixel_base_weights_load_for_real():
    sd = {k: torch.randn(v.shape) for k, v in
          _random_state_dict(DATA / "official_keys" / "itpn_base_dec512d8b.txt").items()}
    state, name, overrides, _ = convert_official_state_dict(sd)
    model = build_itpn(name, **overrides)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.backbone.blocks[23].mlp.fc2.weight, sd["blocks.31.mlp.fc2.weight"])
    assert torch.equal(model.pyramid.out4.norm.weight, sd["fpn_modules.2.norm2.weight"])
    assert torch.equal(model.pyramid.fuse8[1].mlp.fc1.bias, sd["block_16to8.1.mlp.fc1.bias"])


def test_finetune_checkpoint_warns_no_pyramid(tmp_path):
    sd = _random_state_dict(DATA / "official_keys" / "itpn_base_3324_patch16_224.txt")
    src = tmp_path / "ft.pth"
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in sd.items()}}, src)
    with pytest.warns(UserWarning, match="NO feature pyramid"):
        out = convert_official_checkpoint(src, verbose=False)
    assert out["model_overrides"]["pyramid"] is False


def test_cli_converts_published_checkpoint_with_args_namespace(golden, tmp_path):
    case = golden["fixtures"]["pixel_rpe1"]
    src, dst = tmp_path / "published.pth", tmp_path / "converted.pth"
    # Published files pickle their CLI namespace and numpy scalars next to the weights.
    torch.save({"model": case["checkpoint"]["model"], "epoch": 1599,
                "args": argparse.Namespace(lr=np.float64(1.5e-4), model="itpn_base_dec512d8b")},
               src)
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_official_checkpoint.py"), str(src),
         str(dst), "--num-heads", "2"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "skipped (pretraining-only)" in result.stdout and "decoder_blocks" in result.stdout
    ckpt = load_checkpoint(dst)
    assert ckpt["model_name"] == "itpn_nano" and ckpt["model_overrides"]["rpe"] is True
    assert ckpt["channel_order"] == "RGB" and ckpt["format_version"] == 1
    model = build_itpn(ckpt["model_name"], **ckpt["model_overrides"])
    model.load_state_dict(ckpt["model"], strict=True)


def test_cli_rejects_non_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_official_checkpoint.py"), str(bad),
         str(tmp_path / "out.pth")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "is not a PyTorch checkpoint" in result.stderr


def test_converter_rejects_our_own_format(tmp_path):
    src = tmp_path / "ours.pth"
    torch.save({"model": build_itpn("itpn_nano").state_dict()}, src)
    with pytest.raises(CheckpointError, match="does not look like a published"):
        convert_official_checkpoint(src)


def test_heads_cannot_be_guessed_for_unknown_width(golden):
    sd = golden["fixtures"]["pixel_rpe0"]["checkpoint"]["model"]  # 64-d, no rel-pos table
    with pytest.raises(CheckpointError, match="num_heads"):
        infer_official_config(sd)

"""Convert checkpoints of the published iTPN code to this project's format.

Handles the pixel pretraining model (``iTPNMaskedAutoencoder``), the CLIP-distillation model
(``iTPNClipDistill``) and the classification fine-tune model (``iTPN``), weights under
``"model"`` or as a bare state dict. The architecture is inferred from keys and shapes.

Published constructor arguments and their ``build_itpn`` overrides:

============================  ==========================  =====================================
published                     here                        inferred from
============================  ==========================  =====================================
``embed_dim``                 ``embed_dim``               ``patch_embed.proj.weight`` (x4)
``mlp_depth``, ``mlp_depth1``, ``mlp_depth``              positions of the two ``PatchMerge``
``mlp_depth2`` (equal)                                    blocks in ``blocks.*``
``depth``                     ``depth``                   attention blocks after the 2nd merge
``num_heads``                 ``num_heads``               ``relative_position_bias_table``; else
                                                          the published arch for ``embed_dim``
``bridge_mlp_ratio``          ``bridge_mlp_ratio``        ``blocks.0.mlp.fc1.weight``
``mlp_ratio``                 ``mlp_ratio``               attention blocks' ``mlp.fc1.weight``
``qkv_bias``                  ``qkv_bias``                ``attn.qkv.bias`` present
``ape``                       ``abs_pos_embed``           ``absolute_pos_embed`` present
``rpe``                       ``rpe``                     ``relative_position_bias_table``
``init_values``               ``layer_scale_init``        ``gamma_1``/``gamma_2`` present
``img_size`` (patch 16)       ``img_size``                position table length
``fpn_dim``                   ``fpn_dim``                 ``split_16to8.reduction.weight`` (/4)
``fpn_depth``                 ``fpn_depth``               ``block_16to8.*`` count
``num_outs=3`` / ``-1``       ``pyramid=True`` / False    ``fpn_modules.*`` present
``drop_path_rate``            ``drop_path_rate``          (training setting, not stored)
============================  ==========================  =====================================
"""

from __future__ import annotations

import argparse
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .checkpoint import (D2_LOAD_FLAGS, CheckpointError, PathLike, check_state_dict,
                         load_checkpoint, model_metadata, save_checkpoint)
from .errors import run_cli
from .modeling.features import stage_channels
from .modeling.hivit import PATCH_SIZE
from .modeling.itpn import ARCHS, build_itpn, itpn_arguments

# Heads of the published architectures, by width (not recoverable from weights without rpe).
PUBLISHED_HEADS = {128: 4, 384: 6, 512: 8, 768: 12, 896: 14, 1024: 16}
# Parts of the published pretraining models that are not backbone or pyramid.
SKIPPED_PREFIXES = ("decoder_", "mask_token", "lm_head", "lm_cls_head", "norm.", "norm_cls.",
                    "cls_pt_layers.", "fc_norm.", "head.", "relative_position_index")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_MLP_RENAMES = {"norm2.": "norm.", "gamma_2": "ls.gamma"}
_ATTN_RENAMES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",
                 "attn.relative_position_bias_table": "attn.rel_pos_table"}
_PYRAMID_RENAMES = {
    "align_dim_16tofpn.": "lateral16.", "align_dim_16to8.": "lateral8.",
    "align_dim_8to4.": "lateral4.", "split_16to8.": "split16to8.", "split_8to4.": "split8to4.",
    "block_16to8.": "fuse8.", "block_8to4.": "fuse4.", "fpn_modules.0.": "out16.",
    "fpn_modules.1.": "out8.", "fpn_modules.2.": "out4.",
}


def is_official_state_dict(sd: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)


def _rename(suffix: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if suffix.startswith(old):
            return new + suffix[len(old):]
    return suffix


def _merge_positions(sd: Mapping[str, torch.Tensor]) -> List[int]:
    return sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))
                   and m.group(2) == "reduction.weight"})


def infer_official_config(sd: Mapping[str, torch.Tensor],
                          num_heads: Optional[int] = None) -> Dict[str, Any]:
    """``ITPN`` constructor arguments matching a published state dict."""
    merges = _merge_positions(sd)
    if len(merges) != 2:
        raise CheckpointError(f"expected two patch-merge blocks in a HiViT state dict, found "
                              f"{len(merges)} (blocks.*.reduction.weight)")
    m1, m2 = merges[0], merges[1] - merges[0] - 1
    if m1 != m2:
        raise CheckpointError(f"stride-4 and stride-8 stages have different depths ({m1}, {m2}); "
                              f"build_itpn supports equal depths only")
    block_ids = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    depth = max(block_ids) - merges[1]
    embed_dim = sd["patch_embed.proj.weight"].shape[0] * 4
    first_attn = merges[1] + 1
    rpe = f"blocks.{first_attn}.attn.relative_position_bias_table" in sd
    if num_heads is None:
        if rpe:
            num_heads = sd[f"blocks.{first_attn}.attn.relative_position_bias_table"].shape[1]
        elif embed_dim in PUBLISHED_HEADS:
            num_heads = PUBLISHED_HEADS[embed_dim]
        else:
            raise CheckpointError(f"cannot infer num_heads for embed_dim {embed_dim} without a "
                                  f"relative position table; pass num_heads explicitly")
    if "absolute_pos_embed" in sd:
        n_tokens = sd["absolute_pos_embed"].shape[1]
    elif rpe:
        n_tokens = ((sd[f"blocks.{first_attn}.attn.relative_position_bias_table"].shape[0] ** 0.5
                     + 1) / 2) ** 2
    else:
        n_tokens = 196
    grid = round(n_tokens ** 0.5)
    has_pyramid = "split_16to8.reduction.weight" in sd
    cfg = dict(
        img_size=PATCH_SIZE * grid, in_chans=sd["patch_embed.proj.weight"].shape[1], embed_dim=embed_dim,
        mlp_depth=m1, depth=depth, num_heads=int(num_heads),
        bridge_mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / stage_channels(embed_dim)[0],
        mlp_ratio=sd[f"blocks.{first_attn}.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias=f"blocks.{first_attn}.attn.qkv.bias" in sd,
        abs_pos_embed="absolute_pos_embed" in sd, rpe=rpe,
        layer_scale_init=0.1 if f"blocks.{first_attn}.gamma_1" in sd else None,
        pyramid=has_pyramid,
    )
    if has_pyramid:
        cfg["fpn_dim"] = sd["split_16to8.reduction.weight"].shape[0] // 4
        cfg["fpn_depth"] = len({k.split(".")[1] for k in sd if k.startswith("block_16to8.")})
    return cfg


def _name_and_overrides(cfg: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """The named model needing the fewest overrides to match ``cfg``."""
    best = None
    for name in ARCHS:
        base = itpn_arguments(name)
        overrides = {k: v for k, v in cfg.items() if base[k] != v}
        if best is None or len(overrides) < len(best[1]):
            best = (name, overrides)
    return best


def convert_official_state_dict(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None
                                ) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any], List[str]]:
    """Map a published state dict to ``(state_dict, model_name, overrides, skipped_keys)``."""
    cfg = infer_official_config(sd, num_heads)
    m = cfg["mlp_depth"]
    merge1, merge2 = m, 2 * m + 1
    out: Dict[str, torch.Tensor] = {}
    skipped: List[str] = []
    for key, value in sd.items():
        match = _BLOCK.match(key)
        if match:
            i, suffix = int(match.group(1)), match.group(2)
            if i < merge1:
                new = f"backbone.stage4.{i}.{_rename(suffix, _MLP_RENAMES)}"
            elif i == merge1:
                new = f"backbone.merge4to8.{suffix.replace('reduction', 'proj')}"
            elif i < merge2:
                new = f"backbone.stage8.{i - merge1 - 1}.{_rename(suffix, _MLP_RENAMES)}"
            elif i == merge2:
                new = f"backbone.merge8to16.{suffix.replace('reduction', 'proj')}"
            else:
                new = f"backbone.blocks.{i - merge2 - 1}.{_rename(suffix, _ATTN_RENAMES)}"
        elif key.startswith("patch_embed."):
            new = "backbone." + key
        elif key == "absolute_pos_embed":
            new = "backbone.pos_embed"
        elif any(key.startswith(p) for p in _PYRAMID_RENAMES):
            suffix = _rename(key, _PYRAMID_RENAMES)
            if suffix.startswith(("fuse8.", "fuse4.", "out16.", "out8.", "out4.")):
                suffix = suffix.replace(".norm2.", ".norm.")
            new = "pyramid." + suffix.replace(".reduction.", ".proj.")
        elif key.startswith(SKIPPED_PREFIXES):
            skipped.append(key)
            continue
        else:
            raise CheckpointError(f"unrecognised key in published checkpoint: {key}")
        out[new] = value
    name, overrides = _name_and_overrides(cfg)
    return out, name, overrides, skipped


def convert_official_checkpoint(src: PathLike, dst: Optional[PathLike] = None,
                                num_heads: Optional[int] = None, verbose: bool = True
                                ) -> Dict[str, Any]:
    """Convert a published checkpoint file; write it to ``dst`` if given; return the dict.

    The result is verified by building the model and loading the weights strictly.
    """
    ckpt = load_checkpoint(src)
    sd = ckpt["model"]
    if not is_official_state_dict(sd):
        raise CheckpointError(f"{src} does not look like a published iTPN/HiViT checkpoint "
                              f"(no 'patch_embed.proj.weight' / 'blocks.*' keys)")
    state, name, overrides, skipped = convert_official_state_dict(sd, num_heads)
    model = build_itpn(name, **overrides)
    check_state_dict(model, state, what=f"converted {src}")
    out = {"model": state, **model_metadata(name, overrides), **D2_LOAD_FLAGS}
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    out["source"] = {"path": str(src), "epoch": ckpt.get("epoch") if isinstance(
        ckpt.get("epoch"), (int, float)) else None, "skipped": skipped}
    if verbose:
        print(f"converted {src}: {len(state)} tensors -> build_itpn({name!r}, **{overrides})")
        if skipped:
            groups = sorted({k.split(".")[0] for k in skipped})
            print(f"skipped (pretraining-only) {len(skipped)} tensors: {', '.join(groups)}")
    if not overrides.get("pyramid", True):
        warnings.warn(f"{src} has NO feature pyramid (a fine-tuning checkpoint?): only the "
                      f"backbone converts; a detector built from it starts with a random pyramid",
                      stacklevel=2)
    if dst is not None:
        save_checkpoint(out, dst)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``itpn-convert-checkpoint SRC DST [--num-heads N]`` (also ``tools/convert_official_checkpoint.py``)."""
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint of the published iTPN code (pixel, CLIP or fine-tune "
                    "model) to iTPN-D2: backbone + pyramid and the metadata to rebuild it; "
                    "pretraining-only parts are listed as skipped.")
    parser.add_argument("src", help="published checkpoint (.pth; weights under 'model' or bare)")
    parser.add_argument("dst", help="where to write the converted checkpoint")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for non-published widths without relative "
                             "position tables (otherwise inferred)")
    args = parser.parse_args(argv)
    convert_official_checkpoint(args.src, args.dst, num_heads=args.num_heads)
    print(f"wrote {args.dst}")
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    """The command line; expected errors give one ``error:`` line and exit status 2."""
    return run_cli(lambda: main(argv))

#!/usr/bin/env python
"""Parameters and FLOPs (fvcore) of a config's model at a given input size.

    python tools/analyze_model.py --config-file configs/coco/mask_rcnn_itpn_b.py --size 1024 1024

FLOPs count one fused multiply-add as one FLOP (fvcore's convention) for one image in inference
mode; attention through ``scaled_dot_product_attention`` is counted (2 * B * heads * N^2 * d).
The detector total depends on the number of proposals, so the backbone (with pyramid) is also
reported on its own.
"""

import argparse
import sys

import torch

import itpn_d2.d2  # noqa: F401  (first: imports detectron2 without torch's warnings)
from detectron2.config import instantiate
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import flop_count_table, parameter_count
from fvcore.nn.jit_handles import get_shape

from itpn_d2.d2.config import ConfigError, load_config
from itpn_d2.errors import run_cli


def sdpa_flop_jit(inputs, outputs):
    """q @ k^T and attn @ v: 2 * B * heads * Nq * Nk * d multiply-adds."""
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return 2 * batch * q[-2] * k[-2] * q[-1]


def analyze(cfg, height: int, width: int, device: str = "cpu", max_depth: int = 2):
    """Return ``(params, backbone_flops, model_flops, table)`` for one ``height x width`` image."""
    model = instantiate(cfg.model).to(device).eval()
    params = parameter_count(model)[""]
    image = torch.rand(3, height, width, device=device) * 255
    with torch.no_grad():
        inputs = [{"image": image}]
        full = FlopCountAnalysis(model, inputs)
        full.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        full.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        images = model.preprocess_image(inputs).tensor
        backbone = FlopCountAnalysis(model.backbone, (images,))
        backbone.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        backbone.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return params, backbone.total(), full.total(), flop_count_table(full, max_depth=max_depth)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    p.add_argument("--max-depth", type=int, default=2, help="module depth of the table")
    p.add_argument("--device", default="cpu")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    h, w = args.size
    if h < 32 or w < 32 or args.max_depth < 0:
        raise ConfigError(f"--size {h} {w} must be at least 32 x 32, --max-depth >= 0")
    params, bb_flops, flops, table = analyze(cfg, h, w, args.device, args.max_depth)
    print(table)
    print(f"input {h}x{w}: parameters {params / 1e6:.2f}M, backbone+pyramid {bb_flops / 1e9:.2f} "
          f"GFLOPs, detector {flops / 1e9:.2f} GFLOPs (inference, proposals as produced)")


if __name__ == "__main__":
    sys.exit(run_cli(main))

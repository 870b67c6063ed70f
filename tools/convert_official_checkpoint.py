#!/usr/bin/env python
"""Convert a checkpoint of the published iTPN code (pixel, CLIP or fine-tune model) to iTPN-D2.

    python tools/convert_official_checkpoint.py itpn_base_pixel_1600e.pth itpn_base_pixel.pth

The output holds ``model`` (backbone + pyramid, exactly what ``build_itpn`` loads) and the
metadata to rebuild it (``model_name``, ``model_overrides``, pixel mean/std, channel order).
Pretraining-only parts (pixel decoder, ``lm_head``, ``cls_pt_layers``...) are listed as skipped.
"""

import argparse
import sys

from itpn_d2.convert import convert_official_checkpoint
from itpn_d2.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="published checkpoint (.pth; weights under 'model' or bare)")
    parser.add_argument("dst", help="where to write the converted checkpoint")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for non-published widths without relative "
                             "position tables (otherwise inferred)")
    args = parser.parse_args(argv)
    convert_official_checkpoint(args.src, args.dst, num_heads=args.num_heads)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

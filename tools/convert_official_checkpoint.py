#!/usr/bin/env python
"""Convert a checkpoint of the published iTPN code (pixel, CLIP or fine-tune model) to iTPN-D2.

    python tools/convert_official_checkpoint.py itpn_base_pixel_1600e.pth itpn_base_pixel.pth

The same command as ``itpn-convert-checkpoint`` (:func:`itpn_d2.convert.main`).

The output holds ``model`` (backbone + pyramid, exactly what ``build_itpn`` loads) and the
metadata to rebuild it (``model_name``, ``model_overrides``, pixel mean/std, channel order).
Pretraining-only parts (pixel decoder, ``lm_head``, ``cls_pt_layers``...) are listed as skipped.
"""

import sys

from itpn_d2.convert import cli, main  # noqa: F401  (main(argv): the parser, for callers)

if __name__ == "__main__":
    sys.exit(cli())

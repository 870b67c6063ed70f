#!/usr/bin/env python
"""Export the backbone + pyramid of a pretraining checkpoint (:mod:`pretrain.export`).

    python tools/export_backbone.py output/pretrain/checkpoint-last.pth itpn_nano_backbone.pth

The same command as ``itpn-export-backbone``.
"""

import sys

from pretrain.export import cli as main

if __name__ == "__main__":
    sys.exit(main())

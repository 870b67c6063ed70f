#!/usr/bin/env python
"""Original / masked / reconstruction grid of a pretraining checkpoint on some images.

Each image is resized (shorter side) and center-cropped to the checkpoint's input size; the
mask is drawn from ``--seed``. Rows are images; columns original, masked input (grey = masked)
and reconstruction (visible patches as they are, masked patches predicted; see
:mod:`pretrain.visualize`). The same command as ``itpn-visualize-reconstruction``.

    python tools/visualize_reconstruction.py output/pretrain/checkpoint-last.pth a.jpg b.jpg \\
        --out grid.png
"""

import sys

from pretrain.visualize import cli as main

if __name__ == "__main__":
    sys.exit(main())

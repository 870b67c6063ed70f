#!/usr/bin/env python
"""Make ``ADEChallengeData2016/annotations_detectron2`` from the raw ADE20K annotations.

Raw labels 0 ("other") -> 255 (ignore), k -> k - 1 (see :mod:`itpn_d2.data.ade20k`). The same
command as ``itpn-prepare-ade20k``.

    python tools/prepare_ade20k.py                     # $DETECTRON2_DATASETS/ADEChallengeData2016
    python tools/prepare_ade20k.py /data/ADEChallengeData2016 --workers 8
"""

import sys

from itpn_d2.data.ade20k import SPLITS, cli, convert_label, convert_split, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())

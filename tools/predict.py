#!/usr/bin/env python
"""Predict image files with a recipe and its weights: predictions.json and drawings.

    python tools/predict.py --config-file configs/coco/mask_rcnn_itpn_b.py \
        --checkpoint output/mask_rcnn_itpn_b/model_final.pth --input img1.jpg photos/ --output pred/
    python tools/predict.py --config-file configs/ade20k/upernet_itpn_b.py \
        --checkpoint output/upernet_itpn_b_ade20k/model_final.pth --input photos/ --output seg/

``--input`` takes image files and folders (their images in name order). Writes
``<output>/predictions.json``: for detection recipes a COCO results list (``image_id`` = position
in the input order, ``file_name``, ``category_id``, ``bbox`` x y w h, ``score``, RLE
``segmentation``), for segmentation recipes one entry per image naming its PNG label map
(``sem_seg/<stem>.png``, class ids); drawings go to ``<output>/vis/``. Images are read with their
EXIF orientation and resized as the recipe's test mapper does; outputs are in the original
image's pixels. Trailing ``key=value`` arguments override the config. In Python:
``itpn_d2.Predictor`` (see ``itpn_d2.d2.predictor``). The same command as ``itpn-predict``.
"""

import sys

from itpn_d2.d2.predictor import cli, main  # noqa: F401  (main(argv): without run_cli)

if __name__ == "__main__":
    sys.exit(cli())

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
``itpn_d2.Predictor`` (see ``itpn_d2.d2.predictor``).
"""

import argparse
import sys
from typing import Optional, Sequence

from itpn_d2.errors import run_cli


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig recipe")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (default: the config's train.init_checkpoint)")
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA if present)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="detections below it are left out of predictions.json and the "
                             "drawings (0 keeps all, e.g. for COCO evaluation)")
    parser.add_argument("--no-vis", action="store_true", help="write no drawings")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from itpn_d2.d2.predictor import Predictor, list_images, predict_files

    list_images(args.input)  # fail on a missing input before building the model
    predictor = Predictor(args.config_file, args.checkpoint, device=args.device,
                          overrides=args.opts)
    path = predict_files(predictor, args.input, args.output,
                         score_threshold=args.score_threshold, visualize=not args.no_vis)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main()))

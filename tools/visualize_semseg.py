#!/usr/bin/env python
"""Draw a semantic segmentation model's predicted masks over images, as PNG files.

    python tools/visualize_semseg.py --config-file configs/ade20k/upernet_itpn_b.py \
        --checkpoint output/upernet_itpn_b_ade20k/model_final.pth \
        --input img1.jpg img2.jpg --output vis/
    python tools/visualize_semseg.py --config-file configs/toy/upernet_itpn_nano.py \
        --checkpoint output/toy_upernet/model_final.pth --num-images 4 --output vis/

Without ``--input`` the first ``--num-images`` images of the config's test dataset are drawn,
each with its ground truth beside the prediction. Images go through the config's test mapper
(resize) and the model's inference mode (sliding window or whole); masks are drawn over the
original image by Detectron2's ``Visualizer`` with the test dataset's ``stuff_classes``
(pixels with the ignore label are left as they are).
Writes ``<output>/<image stem>.png``. Trailing ``key=value`` arguments override the config.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

import itpn_d2.d2  # noqa: F401  (first: imports detectron2 without torch's warnings)
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog

from itpn_d2.d2.checkpoint import load_for_inference
from itpn_d2.d2.cli import InputFileError
from itpn_d2.d2.config import ConfigError, load_config
from itpn_d2.d2.data import read_image
from itpn_d2.d2.predictor import draw_sem_seg
from itpn_d2.d2.semseg_data import align_label, exif_orientation, read_label_png


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig recipe")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (default: the config's train.init_checkpoint)")
    parser.add_argument("--input", nargs="*", default=None, help="image files")
    parser.add_argument("--num-images", type=int, default=4,
                        help="without --input: images of the test dataset to draw")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--opacity", type=float, default=0.5, help="mask opacity")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="draw even when the weights leave part of the model random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def _test_dataset(cfg) -> str:
    name = cfg.dataloader.test.dataset.names
    name = name if isinstance(name, str) else name[0]
    if name.startswith("itpn_toy"):
        from itpn_d2.data.toy import register_toy_datasets

        register_toy_datasets()
    return name


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    if args.num_images < 1 or not 0 <= args.opacity <= 1:
        raise ConfigError(f"--num-images must be >= 1 and --opacity in [0, 1], got "
                          f"{args.num_images} and {args.opacity}")
    cfg = load_config(args.config_file, args.opts)
    dataset = _test_dataset(cfg)
    metadata = MetadataCatalog.get(dataset)
    if args.input:
        for path in args.input:
            if not Path(path).is_file():
                raise InputFileError(f"input image {path} does not exist")
        records = [{"file_name": path} for path in args.input]
    else:
        records = DatasetCatalog.get(dataset)[:args.num_images]

    model = instantiate(cfg.model).to(args.device).eval()
    checkpoint = args.checkpoint if args.checkpoint is not None else cfg.train.init_checkpoint
    load_for_inference(model, checkpoint, args.allow_random_weights, check_inputs="warn")
    mapper = instantiate(cfg.dataloader.test.mapper)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        inputs = mapper(record)
        with torch.no_grad():
            logits = model([inputs])[0]["sem_seg"]
        pred = logits.argmax(dim=0).cpu().numpy()
        image = read_image(record["file_name"], format="RGB")  # upright, as the mapper reads it
        panels = [draw_sem_seg(image, pred, metadata, args.opacity)]
        if "sem_seg_file_name" in record:
            gt = align_label(read_label_png(record["sem_seg_file_name"]),
                             exif_orientation(record["file_name"]), image.shape[:2],
                             record["sem_seg_file_name"], record["file_name"])
            panels.append(draw_sem_seg(image, gt, metadata, args.opacity))
        path = out_dir / f"{Path(record['file_name']).stem}.png"
        Image.fromarray(np.concatenate(panels, axis=1)).save(path)
        print(f"wrote {path}")
        written.append(path)
    return written


if __name__ == "__main__":
    from itpn_d2.errors import run_cli

    sys.exit(run_cli(lambda: main() and 0))

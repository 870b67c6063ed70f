#!/usr/bin/env python
"""Draw a detector's predictions on a few images with Detectron2's Visualizer (PNG files).

    python tools/visualize_predictions.py --config-file configs/toy/mask_rcnn_itpn_nano.py \
        --checkpoint output/toy/model_final.pth --num-images 4 --output vis/
    python tools/visualize_predictions.py --config-file ... --checkpoint ... --input a.jpg b.jpg

Without ``--input`` the first ``--num-images`` images of the config's test dataset are drawn.
Trailing ``key=value`` arguments override the config, as in the train tool.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import itpn_d2.d2  # noqa: F401  (first: imports detectron2 without torch's warnings)
import detectron2.data.transforms as T
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from PIL import Image

from itpn_d2.d2.bad_images import json_errors_named
from itpn_d2.d2.checkpoint import load_for_inference
from itpn_d2.d2.cli import InputFileError
from itpn_d2.d2.config import ConfigError, load_config
from itpn_d2.d2.data import config_dataset_names, prepare_datasets, read_image
from itpn_d2.d2.predictor import draw_instances


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--checkpoint", default=None,
                   help="weights to load (default: the config's train.init_checkpoint)")
    p.add_argument("--input", nargs="*", default=None, help="image files (default: test dataset)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--output", default="visualizations", help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--allow-random-weights", action="store_true",
                   help="draw even when the weights leave part of the model random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return p.parse_args(argv)


def images_and_metadata(cfg, args):
    """Image paths to draw and the metadata (class names) of the config's test dataset."""
    names = config_dataset_names(cfg, splits=("test",))
    if not names:
        raise ConfigError("the config has no dataloader.test.dataset.names (class names)")
    if args.input:
        missing = [p for p in args.input if not Path(p).is_file()]
        if missing:
            raise InputFileError(f"input images not found: {', '.join(missing)}")
        if names[0].startswith("itpn_toy"):
            prepare_datasets(cfg, splits=("test",))
        return list(args.input), MetadataCatalog.get(names[0])
    prepare_datasets(cfg, splits=("test",))
    with json_errors_named(cfg, "test"):
        dicts = DatasetCatalog.get(names[0])[:args.num_images]
    return [d["file_name"] for d in dicts], MetadataCatalog.get(names[0])


def main(argv=None):
    args = parse_args(argv)
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images} must be >= 1")
    cfg = load_config(args.config_file, args.opts)
    paths, metadata = images_and_metadata(cfg, args)

    model = instantiate(cfg.model).to(args.device).eval()
    load_for_inference(model, args.checkpoint if args.checkpoint is not None
                       else cfg.train.get("init_checkpoint", ""), args.allow_random_weights)
    augs = T.AugmentationList([instantiate(a) for a in cfg.dataloader.test.mapper.augmentations])
    fmt = model.input_format

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = read_image(path, format=fmt)  # HWC uint8 in the model's channel order
        aug_input = T.AugInput(image)
        augs(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        with torch.no_grad():
            out = model([{"image": tensor.to(args.device), "height": image.shape[0],
                          "width": image.shape[1]}])[0]
        instances = out["instances"].to("cpu")
        instances = instances[instances.scores >= args.score_threshold]
        drawn = draw_instances(convert_image_to_rgb(image, fmt), instances, metadata)
        dst = out_dir / (Path(path).stem + ".png")
        Image.fromarray(drawn).save(dst)
        print(f"{dst}: {len(instances)} detections >= {args.score_threshold}")


if __name__ == "__main__":
    from itpn_d2.errors import run_cli

    sys.exit(run_cli(lambda: main() and 0))

"""Figures of the experiments: pretraining loss curve, top-scoring detections beside the ground
truth, image tiling. matplotlib and detectron2 are imported inside the functions that use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from .stages import StageError


def plot_loss_curve(rows: List[Dict], path: Path) -> Path:
    """Pretraining loss per epoch (total, MIM, MFM) from log.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("train_loss", "total"), ("train_mim", "MIM (pixels)"),
                       ("train_mfm", "MFM (EMA teacher features)")):
        ax.plot(epochs, [r[key] for r in rows], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("itpn_nano pretraining on toy train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_top_detections(results_json: Path, data_root: Path, out_dir: Path,
                        num_images: int) -> List[Path]:
    """For the first ``num_images`` val images: ground truth beside the k highest-scoring
    detections (k = number of ground-truth objects), drawn by Detectron2's Visualizer from the
    COCO evaluator's ``coco_instances_results.json``. A fixed score threshold would show
    nothing for a detector trained for minutes, whose scores are low."""
    from collections import defaultdict

    import numpy as np
    from .. import d2  # noqa: F401  (imports detectron2 without fvcore's import-time warning)
    from detectron2.data.catalog import Metadata
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image
    import pycocotools.mask as mask_util
    import torch

    gt = json.loads((data_root / "annotations" / "instances_val.json").read_text())
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    meta = Metadata(thing_classes=[c["name"] for c in categories])
    anns, dets = defaultdict(list), defaultdict(list)
    for a in gt["annotations"]:
        anns[a["image_id"]].append(a)
    for d in json.loads(Path(results_json).read_text()):
        dets[d["image_id"]].append(d)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in sorted(gt["images"], key=lambda i: i["id"])[:num_images]:
        rgb = np.asarray(Image.open(data_root / "images" / "val" / image["file_name"])
                         .convert("RGB"))
        truth = {"annotations": [
            {"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "segmentation": a["segmentation"],
             "category_id": contiguous[a["category_id"]]} for a in anns[image["id"]]]}
        left = Visualizer(rgb, meta, scale=2.0).draw_dataset_dict(truth).get_image()
        top = sorted(dets[image["id"]], key=lambda d: -d["score"])[:max(1, len(anns[image["id"]]))]
        inst = Instances(rgb.shape[:2])
        boxes = [BoxMode.convert(d["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for d in top]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([d["score"] for d in top])
        inst.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in top],
                                         dtype=torch.long)
        if top and "segmentation" in top[0]:
            masks = np.stack([mask_util.decode(d["segmentation"]) for d in top]).astype(bool)
            inst.pred_masks = BitMasks(torch.from_numpy(masks)).tensor
        right = Visualizer(rgb, meta, scale=2.0, instance_mode=ColorMode.IMAGE) \
            .draw_instance_predictions(inst).get_image()
        path = out_dir / (Path(image["file_name"]).stem + ".png")
        Image.fromarray(np.concatenate([left, right], axis=1)).save(path)
        paths.append(path)
    return paths


def upscale(path: Path, min_width: int) -> Path:
    """Enlarge a small image in place by an integer factor (nearest neighbour)."""
    from PIL import Image

    image = Image.open(path)
    factor = -(-min_width // image.width)
    if factor > 1:
        image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(path)
    return path


def montage(paths: Sequence[Path], out: Path, title: str, columns: int = 4) -> Path:
    """Tile PNG files into one figure (nearest-neighbour upscaling keeps small images sharp)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if not paths:
        raise StageError(f"no images to tile into {out}")
    images = [Image.open(p).convert("RGB") for p in paths]
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    aspect = max(im.width / im.height for im in images)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * aspect * columns, 3.2 * rows + 0.4),
                             dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, p in zip(axes.flat, images, paths):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(p.stem, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_eval_curves(curves: Dict[str, Dict[str, List[Dict]]], path: Path,
                     title: str = "") -> Path:
    """One panel per metric (``"bbox"``, ``"segm"``, ``"sem_seg"``): value against
    iteration for each run of ``curves`` (``{run: {metric: [{"iteration", "value"}]}}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("bbox", "segm", "sem_seg") if any(m in c for c in curves.values())]
    labels = {"bbox": "box AP", "segm": "mask AP", "sem_seg": "mIoU"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run, curve in curves.items():
            if metric in curve:
                ax.plot([p["iteration"] for p in curve[metric]],
                        [p["value"] for p in curve[metric]], marker="o", markersize=3, label=run)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{labels[metric]} (toy val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

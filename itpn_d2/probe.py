"""Linear probing: how much a frozen backbone / pyramid level knows, with a 95% interval.

Three protocols, each run on every feature source (backbone stages ``c2``-``c4``, pyramid
levels ``p2``-``p4``) of the model under test and, always, on **raw pixels** and on a **random
model** of the same architecture:

* ``object``: the features of each ground-truth box (ROIAlign to a ``pool x pool`` grid) of a
  COCO-format dataset, a linear classifier over the categories; accuracy.
* ``dense``: a per-pixel linear classifier on each level, its logits upsampled (bilinear) to the
  label map; mIoU and pixel accuracy as Detectron2's ``SemSegEvaluator`` computes them.
* ``image``: globally pooled features of an ImageFolder dataset, a linear classifier (MAE's
  linear probe: frozen features, a normalisation without affine parameters, a linear layer);
  top-1 accuracy.

Features are computed once per image (one forward gives all six sources). Every classifier is
multinomial logistic regression on standardised features, fit full-batch with L-BFGS; its L2
weight is chosen on a fifth of the training items held out, then the fit is redone on all of
them. Intervals are percentile bootstraps over val items (objects, images). Since a linear map
commutes with bilinear upsampling, the dense classifier is fit on features sampled at labelled
pixel positions (``grid_sample``, the same interpolation as ``F.interpolate``), and evaluated on
the full upsampled logits; its training pixels are sampled class-balanced per image. Imports
detectron2 only to read registered datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm import tqdm

from .checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, model_from_checkpoint
from .data.images import IGNORE_LABEL, load_rgb_image
from .errors import UserError, run_cli
from .modeling import ARCHS, build_itpn
from .modeling.features import LEVELS, STAGES
from .modeling.layers import tokens_to_map
from .zoo import ZOO_PREFIX, ZooError, zoo_path

PROTOCOLS = ("object", "dense", "image")
SOURCES = tuple(name for name, _, _ in STAGES + LEVELS)  # c2 c3 c4 p2 p3 p4
PIXELS = "pixels"
STRIDES = {PIXELS: 1, **{name: stride for name, stride, _ in STAGES + LEVELS}}
RANDOM_PREFIX = "random:"
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)  # L2 weights tried on the held-out fifth
BOOTSTRAP_SAMPLES = 1000
# Labelled pixels sampled per training image for the dense probe (all when fewer).
DENSE_SAMPLES_PER_IMAGE = 256


class ProbeError(UserError, ValueError):
    """A bad probe setting or dataset."""


# ----------------------------------------------------------------------------- classifier
@dataclass
class LinearProbe:
    """``logits = ((x - mean) / std) @ weight + bias``: a fitted probe.

    ``mean`` / ``std`` are the training features' statistics (a BatchNorm without affine
    parameters, frozen after the fit)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, K]
    bias: torch.Tensor  # [K]
    weight_decay: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


def _lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
           init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, max_iter: int = 100
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised ``x`` [N, C], labels ``y`` [N],
    started from ``init`` (weight, bias) or zeros."""
    if init is None:
        init = (torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes))
    weight = init[0].clone().requires_grad_(True)
    bias = init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     weight_decays: Sequence[float] = WEIGHT_DECAYS, seed: int = 0
                     ) -> LinearProbe:
    """Fit a probe on features ``x`` [N, C] (float) and labels ``y`` [N] (0..K-1).

    The L2 weight is the one of ``weight_decays`` with the best accuracy on a random fifth of
    the items (fit on the rest, strongest first, each fit started from the previous one); the
    final fit uses every item, started from the chosen held-out fit.
    """
    x = x.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mean)
    z = (x - mean) / std
    weight_decays = sorted(weight_decays, reverse=True)
    chosen, init = weight_decays[0], None
    if len(weight_decays) > 1 and len(x) >= 10:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        held, kept = order[: len(x) // 5], order[len(x) // 5:]
        best = -1.0
        for wd in weight_decays:
            fit = _lbfgs(z[kept], y[kept], num_classes, wd, init)
            score = ((z[held] @ fit[0] + fit[1]).argmax(-1) == y[held]).float().mean().item()
            if score > best:
                best, chosen, start = score, wd, fit
            init = fit
        init = start
    weight, bias = _lbfgs(z, y, num_classes, chosen, init)
    return LinearProbe(mean, std, weight, bias, chosen)


# ------------------------------------------------------------------------------- statistics
def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], num_items: int,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of ``statistic(counts)`` over bootstrap resamples of the items.

    ``statistic`` maps a ``[S, num_items]`` array of resampling counts (how often each item is
    drawn in each of the ``S`` resamples) to ``S`` values."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=samples)
    values = statistic(counts.astype(np.float64))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def accuracy_with_interval(correct: np.ndarray, seed: int = 0) -> Dict[str, object]:
    """Accuracy in % of a boolean vector, with its bootstrap 95% interval."""
    correct = np.asarray(correct, dtype=np.float64)
    low, high = bootstrap_interval(lambda c: 100 * (c @ correct) / len(correct), len(correct),
                                   seed=seed)
    return {"accuracy": 100 * float(correct.mean()), "ci95": [low, high]}


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """``[K, K]`` counts, rows ground truth, columns prediction; ignored pixels left out."""
    keep = label != ignore_label
    index = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """mIoU and pixel accuracy in % of confusion matrices ``[..., K, K]`` (rows ground truth).

    As Detectron2's ``SemSegEvaluator``: the mean IoU over classes that occur in the ground
    truth (and have a non-empty union), the pixel accuracy over labelled pixels."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    pos_gt = conf.sum(-1)
    pos_pred = conf.sum(-2)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    iou = np.where(valid, tp / np.maximum(union, 1), 0.0)
    miou = 100 * iou.sum(-1) / np.maximum(valid.sum(-1), 1)
    pacc = 100 * tp.sum(-1) / np.maximum(pos_gt.sum(-1), 1)
    return miou, pacc


def segmentation_with_interval(per_image: np.ndarray, seed: int = 0) -> Dict[str, object]:
    """mIoU / pixel accuracy of per-image confusion matrices ``[N, K, K]``, with bootstrap 95%
    intervals over images."""
    miou, pacc = segmentation_scores(per_image.sum(0))
    flat = per_image.reshape(len(per_image), -1).astype(np.float64)
    k = per_image.shape[-1]

    def resampled(counts):
        return segmentation_scores((counts @ flat).reshape(len(counts), k, k))

    out = {"miou": float(miou), "pixel_accuracy": float(pacc)}
    out["miou_ci95"] = list(bootstrap_interval(lambda c: resampled(c)[0], len(per_image),
                                               seed=seed))
    out["pixel_accuracy_ci95"] = list(bootstrap_interval(lambda c: resampled(c)[1],
                                                         len(per_image), seed=seed))
    return out


# ---------------------------------------------------------------------------------- models
@dataclass
class FeatureModel:
    """A frozen feature extractor: ``features(images)`` -> ``{source: NCHW map}``.

    ``name`` is ``"pixels"``, ``"random"`` or ``"checkpoint"``."""

    name: str
    net: Optional[torch.nn.Module]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    sources: Tuple[str, ...]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``images``: ``[B, 3, H, W]`` RGB floats on the 0-255 scale."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        x = (images - mean) / std
        if self.net is None:
            return {PIXELS: x}
        feats, levels = self.net.forward_stages_and_levels(x)
        maps = dict(zip(("c2", "c3", "c4"), (feats.s4, feats.s8, feats.s16)))
        if levels is not None:
            maps.update(zip(("p2", "p3", "p4"), levels))
        return {s: tokens_to_map(maps[s], feats.grid) for s in self.sources}


def parse_model_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``random:<model name>`` -> ``("random", name)``; anything else is a checkpoint path."""
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in ARCHS:
            raise ProbeError(f"unknown model {name!r} in {spec!r}; use random:<name> with one "
                             f"of {', '.join(ARCHS)}, or a checkpoint file")
        return "random", name
    return "checkpoint", spec


def load_models(spec: str, sources: Sequence[str], seed: int = 0) -> List[FeatureModel]:
    """Raw pixels, a random model of the same architecture, and (unless ``spec`` is
    ``random:<name>``) the checkpoint's model, each frozen in eval mode.

    Args:
        spec: a checkpoint of this project (pretraining checkpoint, export, converted
            published file), a shipped one (``itpn-zoo://<name>``) or ``random:<name>``.
        sources: feature sources to compute (a subset of :data:`SOURCES`).
        seed: seed of the random model's initialisation.
    """
    kind, value = parse_model_spec(spec)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if kind == "checkpoint" and value.startswith(ZOO_PREFIX):
        try:
            value = str(zoo_path(value))
        except ZooError as e:
            raise ProbeError(str(e)) from None
    if kind == "checkpoint":
        if not os.path.isfile(value):
            raise ProbeError(f"checkpoint {value} does not exist; give a checkpoint file or "
                             f"random:<model name>")
        ckpt = load_checkpoint(value)
        net, ckpt = model_from_checkpoint(ckpt)
        name, overrides = ckpt["model_name"], dict(ckpt.get("model_overrides", {}))
        mean, std = tuple(ckpt.get("pixel_mean", mean)), tuple(ckpt.get("pixel_std", std))
        if ckpt.get("channel_order", "RGB") != "RGB":
            raise ProbeError(f"{value} expects {ckpt['channel_order']} input; the probe feeds "
                             f"RGB images")
    else:
        name, overrides, net = value, {}, None
    torch.manual_seed(seed)
    random_net = build_itpn(name, **overrides)
    if random_net.pyramid is None:
        missing = [s for s in sources if s.startswith("p")]
        if missing:
            raise ProbeError(f"{spec} has no pyramid, so it has no {', '.join(missing)}; "
                             f"choose --sources among c2 c3 c4")
    models = [FeatureModel(PIXELS, None, mean, std, (PIXELS,)),
              FeatureModel("random", random_net.eval(), mean, std, tuple(sources))]
    if net is not None:
        models.append(FeatureModel("checkpoint", net.eval(), mean, std, tuple(sources)))
    for m in models:
        if m.net is not None:
            m.net.requires_grad_(False)
    return models


# -------------------------------------------------------------------------------- datasets
@dataclass
class Item:
    """One image of a probe dataset, resized to the probe size when read."""

    file_name: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # XYXY
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    label_file: Optional[str] = None
    image_class: int = -1


def _dataset_dicts(name: str) -> Tuple[List[Dict], object]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise ProbeError(f"dataset {name!r} is not registered; give a registered Detectron2 "
                         f"dataset name or a COCO json file (toy data: itpn-make-toy "
                         f"--num-probe 768)")
    try:
        return DatasetCatalog.get(name), MetadataCatalog.get(name)
    except FileNotFoundError as e:
        raise ProbeError(str(e)) from None


def object_items(spec: str, image_root: Optional[str] = None) -> Tuple[List[Item], List[str]]:
    """Items with boxes of a registered instance dataset, or of a COCO json + ``image_root``."""
    from detectron2.structures import BoxMode

    if spec.endswith(".json"):
        from detectron2.data.datasets import load_coco_json

        if not os.path.isfile(spec) or image_root is None:
            raise ProbeError(f"COCO json {spec} needs to exist and an image folder "
                             f"(--train-images / --val-images)")
        dicts = load_coco_json(spec, image_root, dataset_name=None)
        with open(spec) as f:
            classes = [c["name"] for c in sorted(json.load(f)["categories"],
                                                 key=lambda c: c["id"])]
    else:
        dicts, meta = _dataset_dicts(spec)
        classes = list(meta.get("thing_classes", []))
    items = []
    for d in dicts:
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        items.append(Item(d["file_name"], np.asarray(boxes, np.float32).reshape(-1, 4),
                          np.asarray([a["category_id"] for a in anns], np.int64)))
    if not any(len(i.classes) for i in items):
        raise ProbeError(f"dataset {spec} has no boxes to probe")
    if not classes:
        classes = [str(k) for k in range(int(max(i.classes.max() for i in items
                                                 if len(i.classes))) + 1)]
    return items, classes


def dense_items(spec: str) -> Tuple[List[Item], List[str], int]:
    """Items with label files of a registered semantic segmentation dataset."""
    dicts, meta = _dataset_dicts(spec)
    if not dicts or "sem_seg_file_name" not in dicts[0]:
        raise ProbeError(f"dataset {spec} has no semantic labels (sem_seg_file_name); give a "
                         f"semantic segmentation dataset such as itpn_toy_sem_seg_probe")
    classes = list(meta.get("stuff_classes", []))
    ignore = int(meta.get("ignore_label", IGNORE_LABEL))
    return [Item(d["file_name"], label_file=d["sem_seg_file_name"]) for d in dicts], classes, ignore


def image_items(folder: str) -> Tuple[List[Item], List[str]]:
    """Items of an ImageFolder layout (``folder/<class>/<image>``), classes sorted by name."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ProbeError(f"image folder {folder} does not exist; give a folder of class "
                         f"folders (ImageFolder layout)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [Item(str(f), image_class=k) for k, c in enumerate(classes)
             for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMG_EXTENSIONS]
    if len(classes) < 2 or not items:
        raise ProbeError(f"image folder {folder} needs at least two class folders with images")
    return items, classes


def _read_label(path: str) -> np.ndarray:
    from .d2.semseg_data import read_label_png

    return read_label_png(path, dtype=None).astype(np.int64)


def _read_image(item: Item, size: int) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """``[3, size, size]`` float 0-255 and the (x, y) scale from the file to it."""
    try:
        img = load_rgb_image(item.file_name)
    except (OSError, ValueError) as e:
        raise ProbeError(f"cannot read image {item.file_name}: {e}") from None
    scale = (size / img.width, size / img.height)
    if img.size != (size, size):
        img = img.resize((size, size), resample=3)  # bicubic
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float(), scale


def _batches(items: Sequence[Item], size: int, batch_size: int, desc: str, progress: bool
             ) -> Iterator[Tuple[List[Item], torch.Tensor, List[Tuple[float, float]]]]:
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = list(items[start:start + batch_size])
        read = [_read_image(i, size) for i in chunk]
        yield chunk, torch.stack([r[0] for r in read]), [r[1] for r in read]
        bar.update(len(chunk))
    bar.close()


# ------------------------------------------------------------------------------- protocols
@dataclass
class ProbeSettings:
    size: int = 128
    batch_size: int = 32
    pool: int = 4
    seed: int = 0
    progress: bool = True


def _object_features(models: Sequence[FeatureModel], items: Sequence[Item], s: ProbeSettings,
                     desc: str) -> Tuple[Dict[Tuple[str, str], torch.Tensor], torch.Tensor]:
    """ROIAligned features ``{(model, source): [objects, C * pool * pool]}`` and labels."""
    out: Dict[Tuple[str, str], List[torch.Tensor]] = {}
    labels = []
    for chunk, images, scales in _batches(items, s.size, s.batch_size, desc, s.progress):
        rois = []
        for b, (item, (sx, sy)) in enumerate(zip(chunk, scales)):
            boxes = torch.from_numpy(item.boxes) * torch.tensor([sx, sy, sx, sy])
            rois.append(torch.cat([torch.full((len(boxes), 1), float(b)), boxes], 1))
            labels.append(torch.from_numpy(item.classes))
        rois = torch.cat(rois)
        for m in models:
            for source, fmap in m.features(images).items():
                pooled = roi_align(fmap, rois, s.pool, spatial_scale=1 / STRIDES[source],
                                   sampling_ratio=2, aligned=True)
                out.setdefault((m.name, source), []).append(pooled.flatten(1))
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def probe_object(models, train: Sequence[Item], val: Sequence[Item], num_classes: int,
                 s: ProbeSettings) -> List[Dict[str, object]]:
    """Object accuracy per (model, source), fit on ``train``'s boxes, scored on ``val``'s."""
    x_train, y_train = _object_features(models, train, s, "object features (train)")
    x_val, y_val = _object_features(models, val, s, "object features (val)")
    rows = []
    for key in x_train:
        probe = fit_linear_probe(x_train[key], y_train, num_classes, seed=s.seed)
        correct = (probe.predict(x_val[key].float()) == y_val).numpy()
        rows.append({"model": key[0], "source": key[1], **accuracy_with_interval(correct, s.seed),
                     "weight_decay": probe.weight_decay})
    return rows


def _sample_positions(label: np.ndarray, count: int, ignore: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """``[n, 2]`` (y, x) of up to ``count`` labelled pixels, class-balanced: an equal share for
    each class present in ``label`` (all pixels of a class with fewer). Sampled in proportion
    to area, background (~87% of toy pixels) would make "background everywhere" the best
    linear fit for any features, and the probe would not tell features apart."""
    present = [c for c in np.unique(label) if c != ignore]
    share = max(1, count // max(len(present), 1))
    picks = []
    for c in present:
        ys, xs = np.nonzero(label == c)
        pick = rng.choice(len(ys), size=min(share, len(ys)), replace=False)
        picks.append(np.stack([ys[pick], xs[pick]], 1))
    return np.concatenate(picks) if picks else np.zeros((0, 2), np.int64)


def probe_dense(models, train: Sequence[Item], val: Sequence[Item], num_classes: int,
                ignore: int, s: ProbeSettings) -> List[Dict[str, object]]:
    """mIoU / pixel accuracy per (model, source) of per-pixel linear classifiers."""
    rng = np.random.default_rng(s.seed)
    feats: Dict[Tuple[str, str], List[torch.Tensor]] = {}
    labels = []
    for chunk, images, _ in _batches(train, s.size, s.batch_size, "dense features (train)",
                                     s.progress):
        grids = []
        for item in chunk:
            label = _read_label(item.label_file)
            pos = _sample_positions(label, DENSE_SAMPLES_PER_IMAGE, ignore, rng)
            labels.append(torch.from_numpy(label[pos[:, 0], pos[:, 1]]))
            h, w = label.shape  # pixel centres in grid_sample's [-1, 1] (align_corners=False)
            grids.append(torch.from_numpy(np.stack([(pos[:, 1] + 0.5) / w * 2 - 1,
                                                    (pos[:, 0] + 0.5) / h * 2 - 1], 1)).float())
        for m in models:
            for source, fmap in m.features(images).items():
                for b, grid in enumerate(grids):
                    sampled = F.grid_sample(fmap[b:b + 1], grid.view(1, 1, -1, 2),
                                            mode="bilinear", padding_mode="border",
                                            align_corners=False)
                    feats.setdefault((m.name, source), []).append(sampled[0, :, 0].T)
    y_train = torch.cat(labels)
    if y_train.numel() and int(y_train.max()) >= num_classes:
        raise ProbeError(f"label value {int(y_train.max())} is not a class id (0-"
                         f"{num_classes - 1}) nor the ignore label {ignore}")
    probes = {k: fit_linear_probe(torch.cat(v), y_train, num_classes, seed=s.seed)
              for k, v in feats.items()}

    conf = {k: [] for k in probes}
    for chunk, images, _ in _batches(val, s.size, s.batch_size, "dense evaluation (val)",
                                     s.progress):
        label_maps = [_read_label(item.label_file) for item in chunk]
        shapes = sorted({label.shape for label in label_maps})
        for m in models:
            for source, fmap in m.features(images).items():
                probe = probes[(m.name, source)]
                logits = probe.logits(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                per_image = [None] * len(chunk)
                for shape in shapes:  # one upsampling per label size in the batch
                    idx = [b for b, label in enumerate(label_maps) if label.shape == shape]
                    pred = F.interpolate(logits[idx], size=shape, mode="bilinear",
                                         align_corners=False).argmax(1).numpy()
                    for j, b in enumerate(idx):
                        per_image[b] = confusion_matrix(pred[j], label_maps[b], num_classes,
                                                        ignore)
                conf[(m.name, source)].extend(per_image)
    return [{"model": k[0], "source": k[1],
             **segmentation_with_interval(np.stack(v), s.seed),
             "weight_decay": probes[k].weight_decay} for k, v in conf.items()]


def _image_features(models, items: Sequence[Item], s: ProbeSettings, desc: str):
    out: Dict[Tuple[str, str], List[torch.Tensor]] = {}
    for _, images, _ in _batches(items, s.size, s.batch_size, desc, s.progress):
        for m in models:
            for source, fmap in m.features(images).items():
                out.setdefault((m.name, source), []).append(fmap.mean((2, 3)))
    return ({k: torch.cat(v) for k, v in out.items()},
            torch.tensor([i.image_class for i in items]))


def probe_image(models, train: Sequence[Item], val: Sequence[Item], num_classes: int,
                s: ProbeSettings) -> List[Dict[str, object]]:
    """Top-1 accuracy per (model, source) of globally pooled features."""
    x_train, y_train = _image_features(models, train, s, "image features (train)")
    x_val, y_val = _image_features(models, val, s, "image features (val)")
    rows = []
    for key in x_train:
        probe = fit_linear_probe(x_train[key], y_train, num_classes, seed=s.seed)
        correct = (probe.predict(x_val[key]) == y_val).numpy()
        rows.append({"model": key[0], "source": key[1], **accuracy_with_interval(correct, s.seed),
                     "weight_decay": probe.weight_decay})
    return rows


# ------------------------------------------------------------------------------ reporting
def _metric(protocol: str) -> str:
    return "miou" if protocol == "dense" else "accuracy"


def format_table(report: Dict) -> str:
    """The report as one Markdown table per protocol."""
    lines = []
    for protocol, result in report["protocols"].items():
        metric = _metric(protocol)
        extra = " | pixel acc. %" if protocol == "dense" else ""
        lines += [f"{protocol} probe ({result['num_val']} val items, chance "
                  f"{result['chance']:.1f}%): {metric} % [95% interval]",
                  f"| features | source | {metric} %{extra} |", "| --- | --- | --- |"
                  + (" --- |" if extra else "")]
        for row in result["rows"]:
            low, high = row.get(f"{metric}_ci95", row.get("ci95"))
            cell = f"{row[metric]:.1f} [{low:.1f}, {high:.1f}]"
            if protocol == "dense":
                pl, ph = row["pixel_accuracy_ci95"]
                cell += f" | {row['pixel_accuracy']:.1f} [{pl:.1f}, {ph:.1f}]"
            lines.append(f"| {row['model']} | {row['source']} | {cell} |")
        lines.append("")
    return "\n".join(lines)


def plot_report(report: Dict, out_dir: Path) -> List[Path]:
    """One bar plot per protocol (``probe_<protocol>.png``): sources x models, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for protocol, result in report["protocols"].items():
        metric = _metric(protocol)
        rows = result["rows"]
        pixels = [r for r in rows if r["model"] == PIXELS]
        models = [m for m in ("random", "checkpoint") if any(r["model"] == m for r in rows)]
        sources = [s for s in SOURCES if any(r["source"] == s for r in rows)]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sources), 3.2))
        width = 0.8 / max(len(models), 1)
        for j, m in enumerate(models):
            vals, errs = [], [[], []]
            for src in sources:
                r = next(r for r in rows if r["model"] == m and r["source"] == src)
                low, high = r.get(f"{metric}_ci95", r.get("ci95"))
                vals.append(r[metric])
                errs[0].append(r[metric] - low)
                errs[1].append(high - r[metric])
            ax.bar(np.arange(len(sources)) + (j - (len(models) - 1) / 2) * width, vals, width,
                   yerr=errs, capsize=2, label=m if m != "checkpoint" else result["model"])
        for r in pixels:
            ax.axhline(r[metric], color="k", ls="--", lw=1, label="raw pixels")
        ax.axhline(result["chance"], color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(np.arange(len(sources)), sources)
        ax.set_ylabel(f"{metric} %")
        ax.set_title(f"{protocol} linear probe", fontsize=9)
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out_dir / f"probe_{protocol}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- run
def run_probe(args: argparse.Namespace) -> Dict:
    """Run the protocols of ``args`` (see :func:`get_parser`); return the report."""
    sources = tuple(args.sources)
    models = load_models(args.checkpoint, sources, seed=args.seed)
    s = ProbeSettings(size=args.input_size, batch_size=args.batch_size, pool=args.pool,
                      seed=args.seed, progress=not args.no_progress)
    if any(p in args.protocols for p in ("object", "dense")):
        from .data.toy import register_toy_datasets

        try:  # a given root replaces earlier registrations; the default one is read lazily
            register_toy_datasets(args.toy_root, lazy=args.toy_root is None)
        except FileNotFoundError as e:
            raise ProbeError(str(e)) from None
    report = {"checkpoint": args.checkpoint, "sources": list(sources),
              "settings": asdict(s), "protocols": {}}
    torch.manual_seed(args.seed)
    for protocol in args.protocols:
        if protocol == "object":
            train, classes = object_items(args.object_train, args.train_images)
            val, _ = object_items(args.object_val, args.val_images)
            rows = probe_object(models, train, val, len(classes), s)
            counts = (sum(len(i.classes) for i in train), sum(len(i.classes) for i in val))
            data = (args.object_train, args.object_val)
        elif protocol == "dense":
            train, classes, ignore = dense_items(args.dense_train)
            val, _, _ = dense_items(args.dense_val)
            rows = probe_dense(models, train, val, len(classes), ignore, s)
            counts = (len(train), len(val))
            data = (args.dense_train, args.dense_val)
        else:
            if not (args.image_train and args.image_val):
                raise ProbeError("the image protocol needs --image-train and --image-val "
                                 "(ImageFolder layouts)")
            train, classes = image_items(args.image_train)
            val, _ = image_items(args.image_val)
            pooled = ProbeSettings(**{**asdict(s), "pool": 1})
            rows = probe_image(models, train, val, len(classes), pooled)
            counts = (len(train), len(val))
            data = (args.image_train, args.image_val)
        report["protocols"][protocol] = {
            "train": data[0], "val": data[1], "num_train": counts[0], "num_val": counts[1],
            "classes": classes, "chance": 100.0 / len(classes),
            "model": Path(args.checkpoint).name if models[-1].name == "checkpoint" else "random",
            "rows": rows}
    return report


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Linear probes of a frozen iTPN (object, dense, image protocols) beside raw "
                    "pixels and a random model of the same architecture, with 95% intervals.")
    p.add_argument("checkpoint", help="checkpoint (pretraining, export or converted published "
                                      "file), itpn-zoo://<shipped name>, or random:<model name>")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["object", "dense"])
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                   help="backbone stages and pyramid levels to probe (default: all)")
    p.add_argument("--output", type=Path, default=Path("output/probe"),
                   help="folder for probe.json and probe_<protocol>.png")
    p.add_argument("--toy-root", type=Path, default=None,
                   help="toy dataset folder (default: $ITPN_TOY_ROOT, else datasets/itpn_toy)")
    p.add_argument("--object-train", default="itpn_toy_train",
                   help="registered instance dataset or COCO json (with --train-images)")
    p.add_argument("--object-val", default="itpn_toy_probe")
    p.add_argument("--train-images", help="image folder of a --object-train json")
    p.add_argument("--val-images", help="image folder of a --object-val json")
    p.add_argument("--dense-train", default="itpn_toy_sem_seg_train",
                   help="registered semantic segmentation dataset")
    p.add_argument("--dense-val", default="itpn_toy_sem_seg_probe")
    p.add_argument("--image-train", help="ImageFolder layout (image protocol)")
    p.add_argument("--image-val", help="ImageFolder layout (image protocol)")
    p.add_argument("--input-size", type=int, default=128,
                   help="images are resized to this square side (a multiple of 16)")
    p.add_argument("--pool", type=int, default=4, help="ROIAlign grid of the object protocol")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.input_size < 16 or args.input_size % 16:
        raise ProbeError(f"--input-size must be a positive multiple of 16, got {args.input_size}")
    if args.pool < 1 or args.batch_size < 1:
        raise ProbeError("--pool and --batch-size must be >= 1")
    report = run_probe(args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "probe.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, args.output)
    print(format_table(report))
    print(f"report: {args.output / 'probe.json'}")
    return report


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``itpn-probe`` / ``python tools/probe.py``; errors give one ``error:`` line, exit 2."""
    return run_cli(lambda: (main(argv), 0)[1])


__all__ = ["LinearProbe", "ProbeError", "accuracy_with_interval", "bootstrap_interval",
           "confusion_matrix", "fit_linear_probe", "load_models", "probe_dense",
           "probe_image", "probe_object", "run_probe", "segmentation_scores", "cli"]

"""Semantic segmentation on the iTPN backbone: UPerNet + auxiliary FCN head, sliding-window test.

* :class:`UPerNetHead` (built with ``LazyCall`` in the recipes): a pyramid pooling module
  (PPM) on the coarsest input level, top-down fusion over all levels (1x1 lateral convs, 3x3
  output convs), concatenation of every level upsampled to the finest stride, a fused 3x3 conv
  and a 1x1 classifier. Its lateral convs only adapt channels: the feature pyramid itself is
  the pre-trained one (``p2``-``p4`` of :class:`~itpn_d2.d2.ITPNBackbone`; ``p5`` is its
  parameter-free 2x pooling of ``p4``).
* :class:`FCNHead`: the auxiliary head (convs + classifier on one level, loss weight 0.4).
* :class:`EncoderDecoderSegmentor`: a ``SemanticSegmentor`` that adds the auxiliary loss,
  sliding-window inference (overlapping window logits averaged) or whole-image inference, and
  optionally concatenates each pyramid level with the backbone stage of the same stride, as the
  published iTPN segmentation model does (see :func:`concat_backbone_stages`).

Both heads compute cross-entropy with ``ignore_value`` (255) on logits bilinearly upsampled to
the label resolution, in float32 (also under autocast).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone
from detectron2.modeling.meta_arch import SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..data.images import IGNORE_LABEL
from ..modeling.itpn import itpn_arguments
from .backbone import itpn_output_shapes

__all__ = [
    "SEG_LEVELS", "EncoderDecoderSegmentor", "FCNHead", "UPerNetHead",
    "concat_backbone_stages", "itpn_feature_shapes", "seg_feature_shapes",
    "sliding_window_starts",
]

# Levels UPerNet reads by default: the pyramid at strides 4, 8, 16, 32.
SEG_LEVELS = ("p2", "p3", "p4", "p5")
# Pyramid level -> backbone stage of the same stride (p5: the stride-16 stage, max-pooled).
_STAGE_OF_LEVEL = {"p2": "c2", "p3": "c3", "p4": "c4"}


# --------------------------------------------------------------------------------- features


def concat_backbone_stages(features: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The published iTPN segmentation features: each pyramid level concatenated (channels) with
    the backbone stage of the same stride.

    ``p2 = cat(p2, c2)``, ``p3 = cat(p3, c3)``, ``p4 = cat(p4, c4)`` and, as published, the
    coarsest level ``p5 = maxpool2x(cat(p4, c4))`` (the backbone's average-pooled ``p5`` is not
    used). For ``itpn_base`` (fpn_dim 256) the channels are 384, 512, 768, 768.

    Args:
        features: backbone outputs holding ``p2``-``p4`` and ``c2``-``c4`` (NCHW).
    """
    missing = [k for k in (*_STAGE_OF_LEVEL, *_STAGE_OF_LEVEL.values()) if k not in features]
    if missing:
        raise KeyError(f"concatenating backbone stages needs backbone outputs {missing}; add "
                       f"them to the backbone's out_features")
    out = {level: torch.cat([features[level], features[stage]], dim=1)
           for level, stage in _STAGE_OF_LEVEL.items()}
    out["p5"] = F.max_pool2d(out["p4"], kernel_size=2, stride=2)
    return out


def seg_feature_shapes(backbone_shapes: Mapping[str, ShapeSpec], concat_stages: bool = False
                       ) -> Dict[str, ShapeSpec]:
    """Shapes of the features the heads see, given the backbone's ``output_shape()``.

    Without ``concat_stages`` these are the backbone's own; with it, those of
    :func:`concat_backbone_stages` (``p2``-``p5`` only).
    """
    if not concat_stages:
        return dict(backbone_shapes)
    missing = [k for k in (*_STAGE_OF_LEVEL, *_STAGE_OF_LEVEL.values()) if k not in backbone_shapes]
    if missing:
        raise KeyError(f"concat_stages needs backbone outputs {missing}; add them to the "
                       f"backbone's out_features")
    out = {level: ShapeSpec(channels=backbone_shapes[level].channels
                            + backbone_shapes[stage].channels,
                            stride=backbone_shapes[level].stride)
           for level, stage in _STAGE_OF_LEVEL.items()}
    out["p5"] = ShapeSpec(channels=out["p4"].channels, stride=2 * out["p4"].stride)
    return out


def itpn_feature_shapes(model_name: str, concat_stages: bool = False,
                        features: Optional[Sequence[str]] = SEG_LEVELS,
                        embed_dim: Optional[int] = None, fpn_dim: Optional[int] = None
                        ) -> Dict[str, ShapeSpec]:
    """Head input shapes for ``ITPNBackbone(build_itpn(model_name))``, without building it.

    For LazyConfig recipes, so that heads follow the backbone's size:
    ``input_shape=L(itpn_feature_shapes)(model_name="${...backbone.net.name}")``.

    Args:
        model_name: a key of :data:`~itpn_d2.modeling.ARCHS`.
        concat_stages: shapes after :func:`concat_backbone_stages`.
        features: names to return (``None``: all).
        embed_dim, fpn_dim: the model's overrides of these, if any.
    """
    arch = itpn_arguments(model_name)
    embed_dim = embed_dim or arch["embed_dim"]
    fpn_dim = fpn_dim or arch["fpn_dim"]
    shapes = seg_feature_shapes(itpn_output_shapes(embed_dim, fpn_dim), concat_stages)
    if features is None:
        return shapes
    unknown = [f for f in features if f not in shapes]
    if unknown:
        raise KeyError(f"features {unknown} not available; choose from {list(shapes)}")
    return {f: shapes[f] for f in features}


# ------------------------------------------------------------------------------------ heads


def _conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> Conv2d:
    conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                  bias=not norm, norm=get_norm(norm, out_channels), activation=F.relu)
    weight_init.c2_msra_fill(conv)
    return conv


class _SegHead(nn.Module):
    """Shared classifier, loss and inference output of the segmentation heads.

    Subclasses set ``in_features`` / ``input_shape`` and implement :meth:`layers` (features ->
    ``(B, channels, H/s, W/s)`` at stride ``self.output_stride``).
    """

    def __init__(self, *, channels: int, num_classes: int, dropout: float, loss_weight: float,
                 loss_name: str, ignore_value: int,
                 class_weight: Optional[Sequence[float]] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_weight is not None and len(class_weight) != num_classes:
            raise ValueError(f"class_weight has {len(class_weight)} entries for {num_classes} "
                             f"classes")
        self.num_classes = num_classes
        # A buffer, so it follows the model's device; not persistent: checkpoints do not hold it.
        self.register_buffer("class_weight", None if class_weight is None else
                             torch.tensor([float(w) for w in class_weight]), persistent=False)
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_name = loss_name
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def layers(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: Mapping[str, torch.Tensor],
                targets: Optional[torch.Tensor] = None):
        """Detectron2's head contract.

        Returns:
            training: ``(None, {loss_name: loss})`` (``targets``: ``(B, H, W)`` long labels of
            the padded images); inference: ``(logits (B, K, H, W) at the input resolution, {})``.
        """
        x = self.predictor(self.dropout(self.layers(features)))  # (B, K, H/s, W/s)
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__} needs targets in training mode")
            return None, self.losses(x, targets)
        return F.interpolate(x, scale_factor=self.output_stride, mode="bilinear",
                             align_corners=False), {}

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = F.cross_entropy(logits, targets, weight=self.class_weight,
                               ignore_index=self.ignore_value)
        return {self.loss_name: loss * self.loss_weight}


def _select(input_shape: Mapping[str, ShapeSpec], in_features: Optional[Sequence[str]]
            ) -> List[Tuple[str, ShapeSpec]]:
    names = list(input_shape) if in_features is None else list(in_features)
    missing = [f for f in names if f not in input_shape]
    if missing or not names:
        raise ValueError(f"in_features {names} must be a non-empty subset of the input "
                         f"features {list(input_shape)}")
    return sorted(((f, input_shape[f]) for f in names), key=lambda kv: kv[1].stride)


class UPerNetHead(_SegHead):
    """UPerNet decode head (Xiao et al., 2018) over a feature pyramid.

    Args:
        input_shape: shapes of the available features (e.g. :func:`itpn_feature_shapes`).
        in_features: features to use (``None``: all of ``input_shape``), fused finest-first;
            the PPM runs on the coarsest.
        num_classes: output classes.
        channels: width of every conv of the head (768 in the published ADE20K recipe).
        pool_scales: output sizes of the PPM's adaptive average pools.
        norm: normalisation after each conv (``"SyncBN"``, ``"BN"``, ``"GN"``, ``""``...).
        dropout: channel dropout before the classifier.
        loss_weight: weight of the cross-entropy loss ``loss_sem_seg``.
        ignore_value: label ignored by the loss (padding is filled with it too).
        class_weight: per-class weights of the cross-entropy (``None``: all 1), as
            mmsegmentation's ``class_weight``; the weighted mean divides by the weights of the
            counted pixels.
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int,
                 in_features: Optional[Sequence[str]] = None, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), norm: str = "SyncBN",
                 dropout: float = 0.1, loss_weight: float = 1.0,
                 ignore_value: int = IGNORE_LABEL,
                 class_weight: Optional[Sequence[float]] = None):
        super().__init__(channels=channels, num_classes=num_classes, dropout=dropout,
                         loss_weight=loss_weight, loss_name="loss_sem_seg",
                         ignore_value=ignore_value, class_weight=class_weight)
        selected = _select(input_shape, in_features)
        self.in_features = [name for name, _ in selected]
        self.input_shape = dict(selected)
        self.output_stride = selected[0][1].stride
        in_channels = [shape.channels for _, shape in selected]

        # PPM on the coarsest level: pooled branches + the level itself -> 3x3 bottleneck.
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale),
                          _conv_norm_act(in_channels[-1], channels, 1, norm))
            for scale in pool_scales)
        self.ppm_bottleneck = _conv_norm_act(in_channels[-1] + len(pool_scales) * channels,
                                             channels, 3, norm)
        # Laterals and output convs of the finer levels (the coarsest is the PPM's output).
        self.lateral_convs = nn.ModuleList(_conv_norm_act(c, channels, 1, norm)
                                           for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_norm_act(channels, channels, 3, norm)
                                       for _ in in_channels[:-1])
        self.fuse = _conv_norm_act(len(in_channels) * channels, channels, 3, norm)

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                  for branch in self.ppm]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def layers(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = [features[f] for f in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self._ppm(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear",
                align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                            for x in outs[1:]]
        return self.fuse(torch.cat(outs, dim=1))


class FCNHead(_SegHead):
    """FCN head on one feature level; the auxiliary head of UPerNet (loss ``loss_sem_seg_aux``).

    Args:
        input_shape: shapes of the available features.
        in_feature: the level to read (published: the stride-16 one).
        num_classes: output classes.
        channels: conv width (256 published).
        num_convs: 3x3 convs before the classifier.
        concat_input: concatenate the input with the conv output before the classifier (through
            one more 3x3 conv), as FCN's ``concat_input``.
        norm, dropout, ignore_value, class_weight: as for :class:`UPerNetHead`.
        loss_weight: weight of the auxiliary loss (0.4 published).
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int,
                 in_feature: str = "p4", channels: int = 256, num_convs: int = 1,
                 concat_input: bool = False, norm: str = "SyncBN", dropout: float = 0.1,
                 loss_weight: float = 0.4, ignore_value: int = IGNORE_LABEL,
                 class_weight: Optional[Sequence[float]] = None):
        super().__init__(channels=channels, num_classes=num_classes, dropout=dropout,
                         loss_weight=loss_weight, loss_name="loss_sem_seg_aux",
                         ignore_value=ignore_value, class_weight=class_weight)
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        (name, shape), = _select(input_shape, [in_feature])
        self.in_features = [name]
        self.input_shape = {name: shape}
        self.output_stride = shape.stride
        self.convs = nn.Sequential(*(_conv_norm_act(shape.channels if i == 0 else channels,
                                                    channels, 3, norm)
                                     for i in range(num_convs)))
        self.concat = (_conv_norm_act(shape.channels + channels, channels, 3, norm)
                       if concat_input else None)

    def layers(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_features[0]]
        y = self.convs(x)
        return y if self.concat is None else self.concat(torch.cat([x, y], dim=1))


# -------------------------------------------------------------------------------- segmentor


def sliding_window_starts(size: int, window: int, stride: int) -> List[int]:
    """Window offsets along one axis of length ``size >= window``: every ``stride`` pixels, the
    last one moved back to end at the border (so windows never leave the image)."""
    count = max(math.ceil((size - window) / stride), 0) + 1
    return [min(i * stride, size - window) for i in range(count)]


class EncoderDecoderSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` with an auxiliary head, sliding-window inference and the
    "pyramid level + backbone stage" features of the published iTPN segmentation model.

    Args:
        backbone: e.g. :class:`~itpn_d2.d2.ITPNBackbone` with out_features ``p2``-``p5`` (plus
            ``c2``-``c4`` for ``concat_stages``).
        sem_seg_head: the decode head (:class:`UPerNetHead`).
        pixel_mean, pixel_std: input normalisation (0-255 scale, ``input_format`` order).
        auxiliary_head: optional head trained alongside (:class:`FCNHead`); unused at test time.
        concat_stages: feed the heads :func:`concat_backbone_stages` of the backbone outputs
            (the published model) instead of the backbone outputs (the default: the pyramid).
        inference_mode: ``"slide"``: windows of ``window_size`` every ``window_stride`` pixels,
            logits of overlapping windows averaged, images smaller than a window padded;
            ``"whole"``: the whole (padded) image at once.
        window_size, window_stride: ``(H, W)`` or an int; sizes must be multiples of the
            backbone's ``size_divisibility``, strides at most the window.
        input_format: channel order the model expects (``"RGB"`` for iTPN checkpoints).
    """

    def __init__(self, *, backbone: Backbone, sem_seg_head: nn.Module,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 auxiliary_head: Optional[nn.Module] = None, concat_stages: bool = False,
                 inference_mode: str = "slide", window_size: Union[int, Sequence[int]] = 512,
                 window_stride: Union[int, Sequence[int]] = 341, input_format: str = "RGB"):
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean,
                         pixel_std=pixel_std)
        self.auxiliary_head = auxiliary_head
        self.concat_stages = concat_stages
        self.input_format = input_format
        if inference_mode not in ("slide", "whole"):
            raise ValueError(f"inference_mode must be 'slide' or 'whole', got {inference_mode!r}")
        self.inference_mode = inference_mode
        self.window_size = to_2tuple(window_size)
        self.window_stride = to_2tuple(window_stride)
        divisor = max(backbone.size_divisibility, 1)
        if any(w <= 0 or w % divisor for w in self.window_size):
            raise ValueError(f"window_size {self.window_size} must be positive multiples of the "
                             f"backbone's size_divisibility {divisor}")
        if any(not 0 < s <= w for s, w in zip(self.window_stride, self.window_size)):
            raise ValueError(f"window_stride {self.window_stride} must be in 1..window_size "
                             f"{self.window_size}")
        self._check_heads(seg_feature_shapes(backbone.output_shape(), concat_stages))

    def _check_heads(self, shapes: Mapping[str, ShapeSpec]) -> None:
        """Fail at construction, not in the first forward, when a head's ``input_shape`` does
        not describe the features it will get."""
        available = {k: (v.channels, v.stride) for k, v in shapes.items()}
        source = "the backbone" + (" with concat_stages" if self.concat_stages else "")
        for attr in ("sem_seg_head", "auxiliary_head"):
            for name, want in getattr(getattr(self, attr), "input_shape", {}).items():
                if available.get(name) != (want.channels, want.stride):
                    raise ValueError(
                        f"{attr} expects feature {name!r} with {want.channels} channels at "
                        f"stride {want.stride}, but {source} gives (channels, stride) "
                        f"{available.get(name)}; available: {available}")

    def extract_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Normalised, padded images ``(B, C, H, W)`` -> the features the heads read."""
        features = self.backbone(images)
        return concat_backbone_stages(features) if self.concat_stages else features

    def _preprocess(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def forward(self, batched_inputs: List[dict]):
        """Training: ``{"loss_sem_seg", "loss_sem_seg_aux"}``; inference: one
        ``{"sem_seg": (K, height, width) logits}`` per input, resized to its ``height`` /
        ``width`` (the original image size) as Detectron2's ``SemanticSegmentor`` does."""
        images = self._preprocess(batched_inputs)
        if self.training:
            if "sem_seg" not in batched_inputs[0]:
                raise KeyError("training inputs need 'sem_seg' labels (a dataset mapper with "
                               "is_train=True on a semantic segmentation dataset)")
            targets = ImageList.from_tensors(
                [x["sem_seg"].to(self.device) for x in batched_inputs],
                self.backbone.size_divisibility, self.sem_seg_head.ignore_value,
                self.backbone.padding_constraints).tensor
            features = self.extract_features(images.tensor)
            _, losses = self.sem_seg_head(features, targets)
            if self.auxiliary_head is not None:
                losses.update(self.auxiliary_head(features, targets)[1])
            return losses

        if self.inference_mode == "whole":
            logits = self.whole_inference(images.tensor)
        else:
            logits = [self.slide_inference(images.tensor[i, :, :h, :w])
                      for i, (h, w) in enumerate(images.image_sizes)]
        results = []
        for logit, inputs, (h, w) in zip(logits, batched_inputs, images.image_sizes):
            height, width = inputs.get("height", h), inputs.get("width", w)
            results.append({"sem_seg": sem_seg_postprocess(logit, (h, w), height, width)})
        return results

    def whole_inference(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` (float32) of normalised images whose sides are multiples of
        the backbone's ``size_divisibility``."""
        logits, _ = self.sem_seg_head(self.extract_features(images))
        return logits.float()

    def slide_inference(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, H, W)`` of one normalised image ``(C, H, W)``, by sliding windows.

        An image smaller than a window is zero-padded (zero is the mean pixel after
        normalisation) to the window size first; windows are run as one batch and the logits of
        every pixel averaged over the windows that cover it.
        """
        (wh, ww), (sh, sw) = self.window_size, self.window_stride
        height, width = image.shape[-2:]
        image = F.pad(image, (0, max(ww - width, 0), 0, max(wh - height, 0)))
        ph, pw = image.shape[-2:]
        boxes = [(y, x) for y in sliding_window_starts(ph, wh, sh)
                 for x in sliding_window_starts(pw, ww, sw)]
        crops = torch.stack([image[:, y:y + wh, x:x + ww] for y, x in boxes])
        window_logits = self.whole_inference(crops)  # (N, K, wh, ww)
        total = window_logits.new_zeros((window_logits.shape[1], ph, pw))
        count = window_logits.new_zeros((1, ph, pw))
        for (y, x), logits in zip(boxes, window_logits):
            total[:, y:y + wh, x:x + ww] += logits
            count[:, y:y + wh, x:x + ww] += 1
        return (total / count)[:, :height, :width]

"""Export of a recipe's backbone + pyramid (TorchScript, ONNX, ``torch.export``) and, for
TorchScript, of the whole R-CNN through Detectron2's ``TracingAdapter``; every export is
checked against the eager model at the trace size and at other sizes.

The exported backbone takes normalised images ``(B, 3, H, W)`` (``(image - pixel_mean) /
pixel_std`` in the model's ``input_format`` channel order; H and W multiples of 32) and returns
the levels of ``out_features`` (``p2`` ... ``p6``) in that order. The traced detector takes one
unnormalised image ``(3, H, W)`` (0-255, ``input_format`` order, already resized as the recipe's
test mapper does, any H and W) and returns the flattened ``Instances`` before post-processing:
boxes in input-image coordinates and ROI-sized mask probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from detectron2.config import instantiate
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN

from ..export import (EXPORT_MULTIPLE, EXPORT_SIZE_RANGE, EXPORT_TOLERANCE, ExportError,
                      check_diffs, check_export_size, compare_at_sizes, export_onnx,
                      export_program, onnx_runner, trace_torchscript)
from .backbone import ITPNBackbone
from .checkpoint import load_for_inference

__all__ = ["EXPORT_FORMATS", "BackboneOutputs", "detector_adapter", "export_model"]

EXPORT_FORMATS = ("torchscript", "onnx", "torch_export")
Size = Tuple[int, int]


class BackboneOutputs(nn.Module):
    """A Detectron2 backbone returning a tuple in ``names`` order instead of a dict (flat
    outputs for TorchScript and ONNX).

    Args:
        backbone: e.g. :class:`~itpn_d2.d2.ITPNBackbone`.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.names: List[str] = list(backbone.output_shape())

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        return tuple(features[name] for name in self.names)


def _rcnn_inference(model: GeneralizedRCNN, inputs: List[Dict[str, torch.Tensor]]):
    # Without post-processing: the traced graph holds no resize to the original image size.
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def detector_adapter(model: GeneralizedRCNN, image: torch.Tensor) -> TracingAdapter:
    """``TracingAdapter`` of an R-CNN (eval mode) for one ``(3, H, W)`` image: the module maps
    the image to ``(*sorted Instances fields, image_size)``."""
    return TracingAdapter(model, [{"image": image}], _rcnn_inference)


def _sizes(*sizes: Size) -> List[Size]:
    return list(dict.fromkeys(tuple(int(s) for s in size) for size in sizes))


def _load_model(cfg, checkpoint: Optional[str], device: str, allow_random: bool) -> nn.Module:
    if not checkpoint and not allow_random:
        raise ExportError("no checkpoint given: the export would hold random weights; give the "
                          "model_final.pth that training wrote (or allow random weights: "
                          "--allow-random-weights, allow_random=True)")
    model = instantiate(cfg.model).to(device).eval()
    load_for_inference(model, checkpoint, allow_random, check_inputs="warn")
    if not isinstance(getattr(model, "backbone", None), ITPNBackbone):
        raise ExportError("the config's model.backbone is not an ITPNBackbone; export_model "
                          "exports iTPN recipes (configs/)")
    return model


def export_model(cfg, output: Union[str, Path], fmt: str = "torchscript", *,
                 checkpoint: Optional[str] = None, size: Optional[Sequence[int]] = None,
                 device: str = "cpu", tol: float = EXPORT_TOLERANCE, allow_random: bool = False,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Export a recipe's model to ``output`` and check it; return the report (also written to
    ``output/export.json``).

    Writes ``backbone.ts`` (+ ``model.ts``, the whole R-CNN, for ``GeneralizedRCNN`` recipes),
    ``backbone.onnx`` or ``backbone.pt2`` (``torch.export.save``). The backbone is checked at
    the trace size, the pretraining size, 64 x 96 (``p6`` one pixel) and one more non-square
    size; the detector at the trace size, the pretraining size and one other size.

    Args:
        cfg: a LazyConfig (overrides already applied).
        output: folder for the files.
        fmt: one of :data:`EXPORT_FORMATS`.
        checkpoint: weights to load: a trained model of the recipe (``model_final.pth``).
        allow_random: export even with no checkpoint or one that leaves part of the model
            random (a pretraining checkpoint leaves the heads random): to test the export.
        overwrite: replace the files of an earlier export in ``output``.
        size: ``(H, W)`` of the example input (default: the backbone's pretraining size).
        device: where the model runs for tracing and the checks.
        tol: largest accepted exported-vs-eager difference.

    Raises:
        ExportError: unknown format, bad size, missing optional packages, an ``output``
            that is a file or holds an export (without ``overwrite``), no checkpoint (without
            ``allow_random``), or outputs that differ from the eager model's by more than
            ``tol``.
        CheckpointError: the checkpoint leaves part of the model random (without
            ``allow_random``) or does not fit the recipe.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r} is unknown; choose from {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--output {out_dir} is a file; give a folder for the exported files")
    if (out_dir / "export.json").exists() and not overwrite:
        raise ExportError(f"--output {out_dir} already holds an export (export.json); choose "
                          f"another folder or pass --overwrite to replace it")
    if size is not None:  # before the (slow) model build
        size = check_export_size(size)
    model = _load_model(cfg, checkpoint, device, allow_random)
    net = model.backbone.net
    pretrain = tuple(net.backbone.img_size)
    size = check_export_size(size if size is not None else pretrain)
    other = check_export_size((min(size[0] + 32, EXPORT_SIZE_RANGE[1]),
                               min(size[1] + 64, EXPORT_SIZE_RANGE[1])))
    backbone_sizes = _sizes(size, pretrain, (64, 96), other)
    out_dir.mkdir(parents=True, exist_ok=True)

    module = BackboneOutputs(model.backbone).eval()
    in_chans = net.backbone.patch_embed.proj.in_channels
    example = torch.randn(1, in_chans, *size, device=device)
    generator = torch.Generator().manual_seed(0)
    on_device = dict(make_input=lambda s: torch.randn(1, in_chans, *s, generator=generator)
                     .to(device))
    report: Dict[str, Any] = {
        "format": fmt, "checkpoint": checkpoint, "trace_size": list(size),
        "pretrain_size": list(pretrain), "tolerance": tol, "files": {}, "checks": {},
        "backbone": {
            "input": "(B, 3, H, W) float32: (image - pixel_mean) / pixel_std, H and W "
                     f"multiples of {EXPORT_MULTIPLE}",
            "input_format": getattr(model, "input_format", "RGB"),
            "pixel_mean": model.pixel_mean.flatten().tolist(),
            "pixel_std": model.pixel_std.flatten().tolist(),
            "outputs": module.names,
            "strides": [model.backbone.output_shape()[n].stride for n in module.names],
            "channels": [model.backbone.output_shape()[n].channels for n in module.names],
        },
    }
    if fmt == "torchscript":
        traced = trace_torchscript(module, example)
        traced.save(str(out_dir / "backbone.ts"))
        report["files"]["backbone"] = "backbone.ts"
        runner = traced
    else:
        program = export_program(module, example)
        dynamic = {"min_size": EXPORT_SIZE_RANGE[0], "max_size": EXPORT_SIZE_RANGE[1],
                   "multiple": EXPORT_MULTIPLE}
        report["backbone"]["dynamic_hw"] = dynamic
        if fmt == "torch_export":
            torch.export.save(program, str(out_dir / "backbone.pt2"))
            report["files"]["backbone"] = "backbone.pt2"
            runner = program.module()
        else:
            export_onnx(program, example, out_dir / "backbone.onnx", output_names=module.names)
            report["files"]["backbone"] = "backbone.onnx"
            runner = onnx_runner(out_dir / "backbone.onnx")
            module, on_device = module.cpu(), {}  # onnxruntime runs on the CPU: compare there
    report["checks"]["backbone"] = compare_at_sizes(module, runner, backbone_sizes, **on_device)

    if fmt == "torchscript" and isinstance(model, GeneralizedRCNN):
        def image(s: Size) -> torch.Tensor:  # an unnormalised image, 0-255
            return torch.rand(in_chans, *s, generator=generator).mul(255).to(device)

        adapter = detector_adapter(model, image(size)).eval()
        traced_model = trace_torchscript(adapter, adapter.flattened_inputs[0])
        traced_model.save(str(out_dir / "model.ts"))
        with torch.no_grad():
            fields = model.inference([{"image": image(size)}], do_postprocess=False)[0]
        report["files"]["detector"] = "model.ts"
        report["detector"] = {
            "input": "(3, H, W) float32 image, 0-255, input_format channel order, resized as "
                     "the recipe's test mapper does",
            "outputs": sorted(fields.get_fields()) + ["image_size"],
        }
        report["checks"]["detector"] = compare_at_sizes(
            adapter, traced_model, _sizes(size, pretrain, other), make_input=image)

    (out_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    for part, diffs in report["checks"].items():
        check_diffs(diffs, f"the exported {part} ({report['files'][part]})", tol)
    return report

"""Export of backbone + pyramid (TorchScript, torch.export, ONNX) and of the toy Mask R-CNN
(TorchScript through TracingAdapter): outputs equal to eager at the trace size and at other
sizes, the pretraining size (128 x 128 for the toy model) included."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.d2 import ITPNBackbone  # noqa: E402
from itpn_d2.d2.export import BackboneOutputs, detector_adapter, export_model  # noqa: E402
from itpn_d2.export import (EXPORT_TOLERANCE, ExportError, compare_at_sizes,  # noqa: E402
                            export_onnx, export_program, onnx_runner, trace_torchscript)
from itpn_d2.modeling import build_itpn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs/toy/mask_rcnn_itpn_nano.py"
PRETRAIN = (128, 128)  # token grid 8 x 8: the size whose "no resize" branch used to be traced
# 64 x 96: p6 is one pixel; 160 x 224: non-square, neither the trace nor the pretraining size.
CHECK_SIZES = [(64, 96), PRETRAIN, (160, 224)]


def toy_backbone(**overrides) -> BackboneOutputs:
    torch.manual_seed(0)
    net = build_itpn("itpn_nano", img_size=PRETRAIN, **overrides)
    return BackboneOutputs(ITPNBackbone(net)).eval()


@pytest.fixture(scope="module")
def backbone():
    return toy_backbone()


@pytest.fixture(scope="module")
def shallow():
    """One attention block instead of four: the same export paths, a smaller graph to export."""
    return toy_backbone(depth=1)


@pytest.fixture(scope="module")
def program(shallow):
    """torch.export with dynamic H, W, traced at a size that is not the pretraining size."""
    return export_program(shallow, torch.randn(1, 3, 160, 224))


@pytest.mark.parametrize("trace_size", [PRETRAIN, (160, 224)])
def test_torchscript_backbone_equals_eager_at_other_sizes(backbone, trace_size):
    traced = trace_torchscript(backbone, torch.randn(1, 3, *trace_size))
    diffs = compare_at_sizes(backbone, traced, CHECK_SIZES)
    assert max(diffs.values()) <= EXPORT_TOLERANCE, diffs


def test_torchscript_relative_position_bias_resizes_in_the_trace():
    backbone = toy_backbone(rpe=True)
    traced = trace_torchscript(backbone, torch.randn(1, 3, *PRETRAIN))
    diffs = compare_at_sizes(backbone, traced, [(64, 96), (160, 224)])
    assert max(diffs.values()) <= EXPORT_TOLERANCE, diffs


def test_torch_export_accepts_dynamic_sizes(shallow, program):
    # 64 and 96: p6 one pixel high/wide; 128: the pretraining grid; 1344: the largest size.
    sizes = [(64, 64), (96, 96), PRETRAIN, (320, 320), (64, 1344), (1344, 64), (96, 160)]
    diffs = compare_at_sizes(shallow, program.module(), sizes)
    assert max(diffs.values()) <= EXPORT_TOLERANCE, diffs
    ranges = {(int(r.lower), int(r.upper)) for r in program.range_constraints.values()}
    assert (64, 1344) in ranges and (2, 42) in ranges  # H, W = 32 * (2 ... 42)


def test_export_program_names_the_valid_sizes(backbone):
    with pytest.raises(ExportError, match="multiples of 32 between 64 and 1344"):
        export_program(backbone, torch.randn(1, 3, 80, 96))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed (pip install -e '.[export]')")
def test_onnx_backbone_equals_eager(shallow, program, tmp_path):
    path = export_onnx(program, torch.randn(1, 3, 160, 224), tmp_path / "backbone.onnx",
                       output_names=shallow.names)
    diffs = compare_at_sizes(shallow, onnx_runner(path), CHECK_SIZES)
    assert max(diffs.values()) <= EXPORT_TOLERANCE, diffs


def test_export_model_traces_mask_rcnn_for_other_sizes(tmp_path):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(TOY)), [
        "model.backbone.net.img_size=128", "model.backbone.net.depth=1",
        "model.proposal_generator.post_nms_topk=[1000,100]",
        "model.roi_heads.box_predictor.test_topk_per_image=20"])  # a quicker detector
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    report = export_model(cfg, tmp_path / "out", "torchscript", checkpoint=str(checkpoint),
                          size=(160, 224))
    assert set(report["checks"]["backbone"]) >= {"160x224", "128x128", "64x96"}
    assert set(report["checks"]["detector"]) >= {"160x224", "128x128"}
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["checks"] == report["checks"] and saved["files"] == {
        "backbone": "backbone.ts", "detector": "model.ts"}
    assert report["detector"]["outputs"] == ["pred_boxes", "pred_classes", "pred_masks",
                                             "scores", "image_size"]

    # The saved detector, at a size it was not traced at, against the eager model.
    traced = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    image = torch.rand(3, 96, 160).mul(255)
    eager = detector_adapter(model, image)(image)
    with torch.no_grad():
        exported = traced(image)
    assert len(eager[0]) > 0  # random heads still give detections to compare
    assert [t.shape for t in exported] == [t.shape for t in eager]
    assert all(torch.allclose(a, b, atol=EXPORT_TOLERANCE) for a, b in zip(eager, exported))


def test_export_tool_rejects_bad_size_before_building(tmp_path):
    spec = importlib.util.spec_from_file_location("_export_model", ROOT / "tools/export_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(ExportError, match=r"size 80x96: .*multiples of 32 .*\(--size H W\)"):
        tool.main(["--config-file", str(TOY), "--format", "onnx", "--output", str(tmp_path),
                   "--size", "80", "96", "model.backbone.net.img_size=128"])


def test_export_refuses_random_weights_and_overwriting(tmp_path):
    from itpn_d2.checkpoint import CheckpointError
    from itpn_d2.zoo import zoo_path

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(TOY)), [
        "model.backbone.net.img_size=128", "model.backbone.net.depth=1"])
    with pytest.raises(ExportError, match=r"^no checkpoint given: the export would hold random "
                                          r"weights; .*--allow-random-weights"):
        export_model(cfg, tmp_path / "a", checkpoint=None)
    pretraining = LazyConfig.apply_overrides(LazyConfig.load(str(TOY)),
                                             ["model.backbone.net.img_size=128"])
    with pytest.raises(CheckpointError, match=r"leaves part of the model random: heads \(\d+ "
                                              r"tensors: proposal_generator\.rpn_head\.\* "
                                              r"\(6\), roi_heads\.box"):
        export_model(pretraining, tmp_path / "a",
                     checkpoint=str(zoo_path("itpn_nano_toy_integral")))
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=f"^--output {tmp_path / 'file'} is a file; give a "
                                          f"folder for the exported files$"):
        export_model(cfg, tmp_path / "file", checkpoint=None, allow_random=True)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "export.json").write_text("{}")
    with pytest.raises(ExportError, match=r"already holds an export \(export.json\); choose "
                                          r"another folder or pass --overwrite to replace it$"):
        export_model(cfg, tmp_path / "done", checkpoint=None, allow_random=True)
    assert (tmp_path / "done" / "export.json").read_text() == "{}"


@pytest.mark.slow
def test_torch_export_every_multiple_of_32_from_64_to_1344(shallow, program):
    sides = range(64, 1345, 32)
    sizes = [(s, 64) for s in sides] + [(64, s) for s in sides] + [(s, s) for s in sides
                                                                    if s <= 512]
    diffs = compare_at_sizes(shallow, program.module(), sizes)
    assert max(diffs.values()) <= EXPORT_TOLERANCE, {k: v for k, v in diffs.items() if v > 0}

"""Export of the iTPN network (backbone + pyramid) to TorchScript, ``torch.export`` and ONNX.

Detectron2-free: works on any module that maps NCHW images to a sequence of tensors, e.g. the
bare :class:`~itpn_d2.modeling.ITPN` (pyramid levels ``[s4, s8, s16]``); ``itpn_d2.d2.export``
adds the Detectron2 backbone and detector. Exported graphs take any input size: the position
tables are resized inside the graph at every size (see ``resize_pos_embed``), and
``torch.export`` runs with dynamic H and W (multiples of ``multiple`` in ``[min_size,
max_size]``). :func:`compare_at_sizes` measures exported-vs-eager differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn

from .errors import UserError

# torch.export / ONNX: H and W any multiple of EXPORT_MULTIPLE in EXPORT_SIZE_RANGE (the
# Detectron2 backbone pads to 32; 1344 covers COCO's 1333 longest side).
EXPORT_MULTIPLE = 32
EXPORT_SIZE_RANGE = (64, 1344)
# Largest exported-vs-eager difference accepted by the export tool's checks.
EXPORT_TOLERANCE = 1e-4

Size = Tuple[int, int]


class ExportError(UserError, RuntimeError):
    """An export that cannot be made or whose outputs differ from the eager model's."""


def check_export_size(size: Size, min_size: int = EXPORT_SIZE_RANGE[0],
                      max_size: int = EXPORT_SIZE_RANGE[1],
                      multiple: int = EXPORT_MULTIPLE) -> Size:
    """``size`` ``(H, W)`` if both sides are multiples of ``multiple`` in range, else an error."""
    h, w = (int(s) for s in size)
    if any(s % multiple or not min_size <= s <= max_size for s in (h, w)):
        raise ExportError(f"size {h}x{w}: height and width must be multiples of {multiple} "
                          f"between {min_size} and {max_size} (--size H W)")
    return h, w


def image_dynamic_shapes(min_size: int = EXPORT_SIZE_RANGE[0],
                         max_size: int = EXPORT_SIZE_RANGE[1],
                         multiple: int = EXPORT_MULTIPLE) -> Dict[int, object]:
    """``dynamic_shapes`` entry of an NCHW image input: H and W any multiple of ``multiple``
    from ``min_size`` to ``max_size`` (batch and channels static)."""
    h = torch.export.Dim("h", min=min_size // multiple, max=max_size // multiple)
    w = torch.export.Dim("w", min=min_size // multiple, max=max_size // multiple)
    return {2: multiple * h, 3: multiple * w}


def export_program(module: nn.Module, example: torch.Tensor, *,
                   min_size: int = EXPORT_SIZE_RANGE[0], max_size: int = EXPORT_SIZE_RANGE[1],
                   multiple: int = EXPORT_MULTIPLE) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module(images)`` with dynamic H, W (see :func:`image_dynamic_shapes`).

    Exported with ``backed_size_oblivious``: otherwise PyTorch's metadata pass asks "is this
    dimension 1?" of every intermediate whose size may be 1 (the Detectron2 backbone's ``p6``,
    H/64, is one pixel at H = 64 or 96) and adds a guard that rejects those sizes at run time.
    A size-1 dimension changes only strides there, never values.
    """
    check_export_size(example.shape[-2:], min_size, max_size, multiple)
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        return torch.export.export(
            module, (example,),
            dynamic_shapes=(image_dynamic_shapes(min_size, max_size, multiple),))


def trace_torchscript(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module(images)``; the trace runs at any H, W the module takes."""
    with torch.no_grad():
        return torch.jit.trace(module, (example,), check_trace=False)


def export_onnx(program: torch.export.ExportedProgram, example: torch.Tensor,
                path: Union[str, Path], input_name: str = "images",
                output_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``program`` (from :func:`export_program`, dynamic H and W kept) as ONNX to ``path``.

    Needs the optional packages onnx and onnxscript (``pip install -e '.[export]'``).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the optional packages onnx and onnxscript "
                          f"({e}); install them with pip install -e '.[export]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(program, (example,), str(path), input_names=[input_name],
                      output_names=list(output_names) if output_names else None, dynamo=True,
                      verbose=False)
    return path


def onnx_runner(path: Union[str, Path]) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """A function running the ONNX file ``path`` with onnxruntime on the CPU:
    ``images`` tensor -> list of output tensors."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"running ONNX files needs onnxruntime ({e}); install it with "
                          f"pip install -e '.[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> List[torch.Tensor]:
        outputs = session.run(None, {input_name: images.detach().cpu().numpy()})
        return [torch.from_numpy(o) for o in outputs]

    return run


def _flat(outputs) -> List[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in _flat(o)]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two (nested) tensor outputs; ``inf`` when their
    number or shapes differ (e.g. a different number of detections)."""
    a, b = _flat(a), _flat(b)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    diffs = [(x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item()
             for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


def compare_at_sizes(reference: Callable, exported: Callable, sizes: Iterable[Size], *,
                     make_input: Optional[Callable[[Size], torch.Tensor]] = None,
                     in_chans: int = 3, seed: int = 0) -> Dict[str, float]:
    """``{"HxW": max |exported - reference|}`` on one random input per size.

    Args:
        reference: the eager module (or function).
        exported: the traced / exported / ONNX runner, called on the same input.
        sizes: ``(H, W)`` pairs.
        make_input: ``(H, W) -> input`` (default: ``randn(1, in_chans, H, W)``, a normalised
            image).
        in_chans, seed: channels and seed of the default inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    if make_input is None:
        def make_input(size: Size) -> torch.Tensor:
            return torch.randn(1, in_chans, *size, generator=generator)
    diffs = {}
    for size in sizes:
        x = make_input(tuple(size))
        with torch.no_grad():
            diffs[f"{size[0]}x{size[1]}"] = max_abs_diff(exported(x), reference(x))
    return diffs


def check_diffs(diffs: Dict[str, float], what: str, tol: float = EXPORT_TOLERANCE) -> None:
    """Raise :class:`ExportError` if any difference of ``diffs`` exceeds ``tol``."""
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise ExportError(f"{what} differs from the eager model by more than {tol} at sizes "
                          f"{bad} (all: {diffs}); this is a bug, please report it")


__all__ = [
    "EXPORT_MULTIPLE", "EXPORT_SIZE_RANGE", "EXPORT_TOLERANCE", "ExportError", "check_diffs",
    "check_export_size", "compare_at_sizes", "export_onnx", "export_program",
    "image_dynamic_shapes", "max_abs_diff", "onnx_runner", "trace_torchscript",
]

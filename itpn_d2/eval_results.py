"""``<output_dir>/eval_results.json``: the last evaluation of a Detectron2 run, as a file.

``tools/lazyconfig_train_net.py`` writes it after each evaluation (the dict ``do_test``
returns, e.g. ``{"bbox": {"AP": ...}, "segm": {...}, "sem_seg": {"mIoU": ...}}``, plus the
iteration it evaluated); the experiment stages (:mod:`itpn_d2.experiments`) read it instead of
the tool's printed text. Every evaluation of a run is also in Detectron2's ``metrics.json``
(flattened ``bbox/AP`` keys per iteration). Imports no detectron2.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .checkpoint import TEMP_SUFFIX, default_file_mode

EVAL_RESULTS = "eval_results.json"

PathLike = Union[str, os.PathLike]


def write_eval_results(output_dir: PathLike, results: Mapping[str, Mapping[str, float]],
                       iteration: Optional[int] = None) -> Path:
    """Write ``results`` (``{task: {metric: value}}``) and ``iteration`` atomically.

    Args:
        output_dir: the run's ``train.output_dir`` (created if missing).
        results: what Detectron2's evaluators returned; AP on the 0-100 scale, NaN kept (JSON
            ``NaN``, which Python's ``json`` reads back) where COCO could not compute a metric.
        iteration: training iterations done before this evaluation (``None``: ``--eval-only``).

    Returns:
        The path written. A reader never sees a half-written file (temporary + rename).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record: Dict[str, Any] = {"iteration": iteration}
    record.update({task: {k: float(v) for k, v in metrics.items()}
                   for task, metrics in results.items()})
    path = output_dir / EVAL_RESULTS
    fd, tmp = tempfile.mkstemp(prefix=f".{EVAL_RESULTS}.", suffix=TEMP_SUFFIX, dir=output_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide it from the group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_eval_results(output_dir: PathLike) -> Dict[str, Any]:
    """The record :func:`write_eval_results` left in ``output_dir`` (raises ``OSError`` if
    none, ``ValueError`` if it is not JSON)."""
    return json.loads((Path(output_dir) / EVAL_RESULTS).read_text())


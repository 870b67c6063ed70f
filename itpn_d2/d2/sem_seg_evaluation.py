"""Detectron2's ``SemSegEvaluator`` with checked label files.

The stock evaluator computes everything; this subclass only replaces its label loader
(``sem_seg_loading_fn``), because:

* the installed detectron2's ``load_image_into_numpy_array`` passes ``copy=False`` to
  ``np.array``, which numpy 2 rejects; :func:`~itpn_d2.d2.semseg_data.read_label_png` does not;
* a label whose size differs from the prediction (the model resizes its output to the record's
  ``height`` / ``width``) would stop the stock evaluator with a numpy broadcasting error that
  names no file, and a label holding values other than class ids and the ignore label would be
  counted silently as other classes: both are errors naming the file;
* labels of EXIF-rotated images are turned like their image (:func:`align_label`).

It also builds the per-image RLE dump (``sem_seg_predictions.json``) only when ``output_dir`` is
set, the only place it goes: the stock evaluator encodes every image (about 60 ms for a
512 x 512 prediction of 15 classes, minutes per ADE20K evaluation).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from detectron2.evaluation import SemSegEvaluator

from .semseg_data import LabelError, align_label, check_label, exif_orientation, read_label_png

__all__ = ["ITPNSemSegEvaluator"]


class ITPNSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` with checked, numpy-2 safe label reading.

    Args:
        dataset_name: a registered semantic segmentation dataset (records with
            ``sem_seg_file_name``; metadata with ``stuff_classes`` and ``ignore_label``).
        distributed: gather results from all ranks before computing the metrics.
        output_dir: where to write ``sem_seg_predictions.json`` and ``sem_seg_evaluation.pth``
            (``None``: nothing is written).
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: str = None):
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir,
                         sem_seg_loading_fn=self._load_label)
        # label file -> (image file, prediction height x width) of the batch being processed
        self._expected: Dict[str, Tuple[str, Tuple[int, int]]] = {}

    def process(self, inputs, outputs):
        """Accumulate the confusion matrix of each ``(input, {"sem_seg": (K, H, W)})``."""
        self._expected = {}
        for inp, out in zip(inputs, outputs):
            gt_path = self.input_file_to_gt_file.get(inp["file_name"])
            if gt_path is None:
                raise KeyError(f"image {inp['file_name']} is not in dataset "
                               f"{self._dataset_name!r}; no label file to evaluate against")
            self._expected[gt_path] = (inp["file_name"], tuple(out["sem_seg"].shape[-2:]))
        super().process(inputs, outputs)

    def _load_label(self, gt_path: str, dtype=int) -> np.ndarray:
        """The stock evaluator's ``sem_seg_loading_fn``: read, orient and check one label."""
        image_path, pred_hw = self._expected[gt_path]
        gt = read_label_png(gt_path, dtype=None)
        orientation = exif_orientation(image_path)
        if orientation != 1:  # the prediction is of the upright image (read_image)
            gt = align_label(gt, orientation, pred_hw, gt_path, image_path)
        if gt.shape != pred_hw:
            raise LabelError(f"label file {gt_path} is {gt.shape[1]}x{gt.shape[0]} but the "
                             f"prediction for {image_path} is {pred_hw[1]}x{pred_hw[0]} "
                             f"(width x height); the record's height/width must be the "
                             f"label's size")
        check_label(gt, self._num_classes, self._ignore_label, gt_path)
        return gt.astype(dtype)

    def encode_json_sem_seg(self, sem_seg, input_file_name):
        return super().encode_json_sem_seg(sem_seg, input_file_name) if self._output_dir else []

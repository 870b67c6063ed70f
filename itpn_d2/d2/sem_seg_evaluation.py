"""mIoU / fwIoU / mACC / pACC evaluation of semantic segmentation, numpy-2 safe and checked.

Detectron2's ``SemSegEvaluator`` computes the metrics; this subclass only changes how label
files are read and accumulated:

* labels are read with :func:`~itpn_d2.d2.semseg_data.read_label_png` (the installed
  detectron2's ``load_image_into_numpy_array`` passes ``copy=False`` to ``np.array``, which
  numpy 2 rejects);
* a label file that is missing, whose size differs from the prediction (the model resizes its
  output to the record's ``height`` / ``width``), or that holds values other than class ids and
  the ignore label is an error naming the file (the stock evaluator would silently count such
  values as other classes);
* the per-image RLE dump (``sem_seg_predictions.json``) is built only when ``output_dir`` is
  set, since that is the only place it goes.
"""

from __future__ import annotations

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
                         sem_seg_loading_fn=read_label_png)

    def process(self, inputs, outputs):
        """Accumulate the confusion matrix of each ``(input, {"sem_seg": (K, H, W)})``."""
        n = self._num_classes
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"].argmax(dim=0).to(self._cpu_device).numpy().astype(np.int64)
            gt_path = self.input_file_to_gt_file.get(inp["file_name"])
            if gt_path is None:
                raise KeyError(f"image {inp['file_name']} is not in dataset "
                               f"{self._dataset_name!r}; no label file to evaluate against")
            gt = read_label_png(gt_path, dtype=None)
            orientation = exif_orientation(inp["file_name"])
            if orientation != 1:  # the prediction is of the upright image (read_image)
                gt = align_label(gt, orientation, pred.shape, gt_path, inp["file_name"])
            gt = gt.astype(np.int64)
            if gt.shape != pred.shape:
                raise LabelError(f"label file {gt_path} is {gt.shape[1]}x{gt.shape[0]} but the "
                                 f"prediction for {inp['file_name']} is {pred.shape[1]}x"
                                 f"{pred.shape[0]} (width x height); the record's height/width "
                                 f"must be the label's size")
            check_label(gt, n, self._ignore_label, gt_path)
            gt[gt == self._ignore_label] = n

            # Rows: prediction, columns: ground truth; the last column holds ignored pixels.
            self._conf_matrix += np.bincount((n + 1) * pred.reshape(-1) + gt.reshape(-1),
                                             minlength=self._conf_matrix.size
                                             ).reshape(self._conf_matrix.shape)
            if self._compute_boundary_iou:
                b_gt = self._mask_to_boundary(gt.astype(np.uint8))
                b_pred = self._mask_to_boundary(pred.astype(np.uint8))
                self._b_conf_matrix += np.bincount(
                    (n + 1) * b_pred.reshape(-1) + b_gt.reshape(-1),
                    minlength=self._conf_matrix.size).reshape(self._conf_matrix.shape)
            if self._output_dir:
                self._predictions.extend(self.encode_json_sem_seg(pred, inp["file_name"]))

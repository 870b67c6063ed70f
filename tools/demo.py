#!/usr/bin/env python
"""End-to-end iTPN demo on the synthetic toy dataset, sized for a CPU (``make demo``).

Stages (each cached in its own folder under ``--output``, see ``itpn_d2/experiments/stages.py``;
the demo itself is ``itpn_d2/experiments/demo.py``):

 1. toy data        make the shapes dataset (``itpn_d2.data.toy``)
 2. pretrain        ``pretrain/main.py``: itpn_nano, MIM + MFM with the EMA teacher; then
                    ``tools/export_backbone.py`` (backbone + pyramid for Detectron2)
 3. untrained       ``tools/lazyconfig_train_net.py --eval-only``: the Mask R-CNN with the
                    pre-trained backbone + pyramid and random heads, i.e. with zero fine-tuning
                    (the "untrained model" baseline of the box AP)
 4. detection       fine-tune ``configs/toy/mask_rcnn_itpn_nano.py`` from the export, then COCO
                    box / mask AP on the toy val split
 5. segmentation    fine-tune ``configs/toy/upernet_itpn_nano.py`` from the export, then mIoU
 6. figures         pretraining loss curve (log.txt), reconstruction grid
                    (``tools/visualize_reconstruction.py``), detection predictions on val
                    images (the top-scoring ones, from the COCO evaluator's results) and
                    segmentation predictions (``tools/visualize_semseg.py``)
 7. REPORT.md       the numbers, settings, timings, commands and figures

A second run reuses every stage whose settings did not change; ``--force`` redoes them all.
The default settings (``--preset full``) take about 11 minutes on 2 idle CPU cores;
``--preset smoke`` runs every stage in about a minute, to check an installation.

    python tools/demo.py                        # output/demo/REPORT.md
    python tools/demo.py --preset smoke --output output/demo_smoke
    python tools/demo.py --det-iters 600 --force
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

from itpn_d2.errors import run_cli
from itpn_d2.experiments import demo

# The checkout whose tools (pretrain/main.py, tools/*.py) and configs the stages run.
REPO = Path(__file__).resolve().parents[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return demo.main(demo.parse_args(argv, REPO, __doc__), REPO)


if __name__ == "__main__":
    sys.exit(run_cli(main))

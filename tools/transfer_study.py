#!/usr/bin/env python
"""Transfer study: does a pre-trained pyramid fine-tune into a better detector than a random one?

Fine-tunes the same detector recipe with the same budget from different starts, over several
seeds, and tabulates box and mask AP (mean, standard deviation, 95% t interval, and paired
differences: a seed fixes the heads' initialisation and the data order in every arm):

    integral      backbone + pyramid pre-trained together (pretrain/main.py, MIM + MFM, EMA)
    conventional  backbone pre-trained without a pyramid (--pyramid off --mfm none, HiViT + MAE);
                  the detector's pyramid starts random
    scratch       nothing pre-trained
    mim_only      (optional) backbone + pyramid pre-trained by MIM only (--mfm none)

under each protocol of ``--protocols``: ``full`` (everything trains) and ``frozen`` (the HiViT
stays fixed, model.backbone.freeze_backbone=True; pyramid and heads train). Every run is
evaluated ``--evals`` times (the box AP curve). Per protocol, a go / no-go verdict: go when some
pre-trained arm beats scratch (paired box-AP difference with a 95% interval above 0); only
then are the differences between pre-trained arms interpreted.

At toy scale (the default: itpn_nano on the synthetic shapes, CPU; about 80 minutes on 2 cores,
estimated from 2.4-minute fine-tuning runs and 4.75-minute pretrainings) the
study pre-trains the checkpoints itself with one shared budget, on an unlabelled pool of toy
images (``--num-pool``). For real data, give the
pretraining data (``--pretrain-data``, ``--model``, ``--pretrain-nproc``...) or ready
checkpoints (``--integral-checkpoint``...), a full recipe (``--config-file``), dataset names,
iterations and ``--num-gpus``. Every run is cached (``itpn_d2/experiments/stages.py``; the
study itself is ``itpn_d2/experiments/transfer_study.py``): rerunning with more seeds only runs
the new ones.

    python tools/transfer_study.py                                   # toy scale, CPU
    python tools/transfer_study.py --seeds 0 1 2 3 4 --arms integral conventional scratch mim_only
    python tools/transfer_study.py --config-file configs/coco/mask_rcnn_itpn_b.py \\
        --integral-checkpoint itpn_b_ema.pth --conventional-checkpoint itpn_b_nopyr.pth \\
        --iters 90000 --batch 16 --lr 2e-4 --num-gpus 8 --output output/transfer_coco \
        --set train.checkpointer.period=10000

Writes ``<output>/results.json``, ``results.md`` and ``transfer_study.png``.
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

from itpn_d2.errors import run_cli
from itpn_d2.experiments import transfer_study

# The checkout whose tools (pretrain/main.py, tools/*.py) and configs the stages run.
REPO = Path(__file__).resolve().parents[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return transfer_study.main(transfer_study.parse_args(argv, REPO, __doc__), REPO)


if __name__ == "__main__":
    sys.exit(run_cli(main))

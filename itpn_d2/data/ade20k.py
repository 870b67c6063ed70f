"""Make ``ADEChallengeData2016/annotations_detectron2`` from the raw ADE20K annotations.

The raw SceneParsing labels (``annotations/{training,validation}/*.png``) use 0 for "other" and
1-150 for the classes. Detectron2's builtin ``ade20k_sem_seg_{train,val}`` read
``annotations_detectron2/{training,validation}/*.png`` with classes 0-149 and 255 = ignore, so
this maps 0 -> 255 and k -> k - 1.

    itpn-prepare-ade20k                     # $DETECTRON2_DATASETS/ADEChallengeData2016
    itpn-prepare-ade20k /data/ADEChallengeData2016 --workers 8

(``python tools/prepare_ade20k.py`` in a checkout.) Imports no detectron2.
"""

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import UserError, run_cli
from .images import IGNORE_LABEL

NUM_CLASSES = 150
SPLITS = ("training", "validation")
RAW_DIR = "annotations"
OUT_DIR = "annotations_detectron2"


def default_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))) \
        / "ADEChallengeData2016"


def convert_label(raw: np.ndarray, path: str = "<array>") -> np.ndarray:
    """Raw ADE20K label (0 = other, 1-150 = classes) -> uint8 (0-149, 255 = ignore).

    Raises:
        ValueError: ``raw`` is not 2-D or holds values above 150 (naming ``path``).
    """
    if raw.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label image, got shape {raw.shape}")
    bad = raw > NUM_CLASSES
    if bad.any():
        values = np.unique(raw[bad])[:10].tolist()
        raise ValueError(f"{path}: values {values} are above {NUM_CLASSES}; raw ADE20K labels "
                         f"are 0 (other) and 1-{NUM_CLASSES}. Is this already converted?")
    out = raw.astype(np.int16) - 1
    out[raw == 0] = IGNORE_LABEL
    return out.astype(np.uint8)


def _convert_file(job: Tuple[str, str]) -> None:
    src, dst = job
    try:
        with Image.open(src) as image:
            raw = np.asarray(image)
    except (OSError, SyntaxError) as e:  # PIL: unreadable, truncated or not an image
        raise ValueError(f"{src}: cannot read the label image ({e}); re-extract the dataset") \
            from None
    Image.fromarray(convert_label(raw, src)).save(dst)


def convert_split(src_dir: Path, dst_dir: Path, workers: int = 1) -> int:
    """Convert every PNG of ``src_dir`` into ``dst_dir``; return how many."""
    if not src_dir.is_dir():
        raise FileNotFoundError(f"raw annotation folder {src_dir} does not exist (expected "
                                f"ADEChallengeData2016/{RAW_DIR}/{{{','.join(SPLITS)}}})")
    files = sorted(src_dir.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no PNG annotations in {src_dir}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(dst_dir / f.name)) for f in files]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_convert_file, jobs, chunksize=64))
    else:
        for job in jobs:
            _convert_file(job)
    return len(jobs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=None,
                        help="ADEChallengeData2016 folder (default: "
                             "$DETECTRON2_DATASETS/ADEChallengeData2016)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[int]:
    args = parse_args(argv)
    root = args.root if args.root is not None else default_root()
    counts = []
    for split in SPLITS:
        n = convert_split(root / RAW_DIR / split, root / OUT_DIR / split, args.workers)
        print(f"{split}: converted {n} labels into {root / OUT_DIR / split}")
        counts.append(n)
    return counts


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``itpn-prepare-ade20k``; bad input gives one ``error:`` line and exit status 2."""

    def run() -> None:
        try:
            main(argv)
        except (FileNotFoundError, ValueError) as e:  # what main raises for bad input
            raise UserError(str(e)) from None

    return run_cli(run)

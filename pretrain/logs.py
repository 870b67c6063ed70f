"""Training logs: ``log.txt`` (JSON lines per epoch), TensorBoard scalars, the progress bar, an
epoch's running sums, and the ``pretrain`` console logger (progress on stdout, notes on stderr)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch
from tqdm import tqdm

from itpn_d2.checkpoint import trim_json_lines

from .config import PretrainConfig
from .distributed import DistInfo, all_reduce_mean

log = logging.getLogger(__name__)


def trim_log(path: Path, epochs_done: int) -> int:
    """Drop the ``log.txt`` lines of epochs ``>= epochs_done`` and any incomplete line.

    An interrupted run may have logged epochs after its last checkpoint (``--save_every`` > 1,
    or a kill between the log line and the save); the resumed run logs them again. Returns
    the number of lines dropped; the file is replaced atomically.
    """
    return trim_json_lines(path, "epoch", epochs_done)


class Logger:
    """log.txt (JSON lines per epoch), TensorBoard scalars, and a progress bar, on rank 0."""

    def __init__(self, config: PretrainConfig, info: DistInfo, total: int, initial: int):
        self.enabled = info.is_main
        self.out = Path(config.output_dir)
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(config.log_dir or self.out) / "tensorboard"
            self.tb = SummaryWriter(log_dir=str(tb_dir))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard scalars")
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)
        self.plain = self.bar.disable  # no terminal: print a line per log interval instead

    def step(self, values: Dict[str, float], step: int, epoch: int, eta_s: float, n: int) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.plain:
            log.info(f"epoch {epoch} step {step}: loss {values['loss']:.4f} mim "
                     f"{values['mim']:.4f} mfm {values['mfm']:.4f} lr {values['lr']:.3e} "
                     f"{values['img_per_s']:.1f} img/s eta {tqdm.format_interval(max(eta_s, 0))}")
        else:
            self.bar.update(n)
            self.bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}",
                                 img_s=f"{values['img_per_s']:.1f}", lr=f"{values['lr']:.2e}")

    def epoch(self, stats: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "log.txt", "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.tb is not None:
            for k, v in stats.items():
                if k.startswith("train_"):
                    self.tb.add_scalar(f"epoch/{k[6:]}", v, stats["epoch"])
            self.tb.flush()
        msg = (f"epoch {stats['epoch']} done: loss {stats['train_loss']:.4f} "
               f"(mim {stats['train_mim']:.4f}, mfm {stats['train_mfm']:.4f}), "
               f"{stats['img_per_s']:.1f} img/s")
        if self.plain:
            log.info(msg)
        else:
            self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class EpochMeter:
    """Running sums of an epoch (rank-averaged in checkpoints, so a resumed mean is exact)."""

    sums: torch.Tensor  # loss, mim, mfm summed over steps
    count: int = 0
    bad: int = 0  # unreadable images

    def state(self, info: DistInfo) -> Dict[str, Any]:
        return {"sums": all_reduce_mean(self.sums, info).cpu().tolist(), "count": self.count,
                "bad": self.bad}


# --------------------------------------------------------------------------- console


class _ConsoleHandler(logging.Handler):
    """Messages as plain lines: INFO on stdout, warnings on stderr. The stream is looked up at
    each message, so redirections (``contextlib.redirect_stderr``, pytest's capture) see it."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def setup_logging() -> logging.Logger:
    """The ``pretrain`` logger with its console handler (added once)."""
    logger = logging.getLogger("pretrain")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one line per message, whatever the root logger holds
    return logger

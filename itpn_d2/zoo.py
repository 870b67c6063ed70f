"""Checkpoints shipped with the package: small toy-scale pretrainings, loadable by name.

Each entry is an export (backbone + pyramid + metadata, as ``itpn-export-backbone`` writes)
in ``itpn_d2/weights/``, with a JSON of its provenance beside it (command, commit, samples
seen, wall time, machine, probe numbers). Three ways to use one:

* a path: ``zoo_path("itpn_nano_toy_integral")``, for ``train.init_checkpoint``, timm's
  ``checkpoint_path``, ``itpn-probe`` and every tool that takes a checkpoint file;
* a URL ``itpn-zoo://itpn_nano_toy_integral`` wherever Detectron2 opens files through its
  ``PathManager`` (``train.init_checkpoint=itpn-zoo://...``, a stock
  ``DetectionCheckpointer(model).load(...)``); the handler is registered by ``itpn_d2.d2``;
* ``zoo_info(name)``: the provenance.

Imports no detectron2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .errors import UserError

WEIGHTS_DIR = Path(__file__).parent / "weights"
ZOO_PREFIX = "itpn-zoo://"


class ZooError(UserError, KeyError):
    """An unknown shipped checkpoint name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def zoo_names() -> List[str]:
    """Names of the shipped checkpoints (file stems in ``itpn_d2/weights/``)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pth"))


def zoo_path(name: str) -> Path:
    """The file of shipped checkpoint ``name`` (``itpn-zoo://`` prefix allowed)."""
    if name.startswith(ZOO_PREFIX):
        name = name[len(ZOO_PREFIX):]
    path = WEIGHTS_DIR / f"{name}.pth"
    if not path.is_file():
        raise ZooError(f"no shipped checkpoint named {name!r}; available: "
                       f"{', '.join(zoo_names()) or 'none'}")
    return path


def zoo_info(name: str) -> Dict:
    """Provenance of shipped checkpoint ``name`` (its JSON file)."""
    return json.loads(zoo_path(name).with_suffix(".json").read_text())


__all__ = ["WEIGHTS_DIR", "ZOO_PREFIX", "ZooError", "zoo_info", "zoo_names", "zoo_path"]

"""Helpers shared by the pretraining tests (not a test module)."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the `pretrain` package lives in the repo, not site-packages

TINY_CLIP = "itpn-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    # 48 px / patch 16: a 3x3 grid, resampled to every level's grid (and resized from the input).
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path) -> Path:
    """Register a tiny open_clip config and save random weights of the whole model; returns
    the weights file (for ``--teacher_checkpoint``)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is as fast, and immune to the slowdown
    of OpenMP threads competing with other processes for the cores. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Two CPU processes (gloo) train with DDP + DistributedSampler and end with identical weights."""

import json
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from _pretrain_utils import REPO  # noqa: F401  (puts the repo root on sys.path)

from itpn_d2.checkpoint import load_checkpoint
from itpn_d2.data.toy import make_toy_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, images: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pretrain.main import main

    result = main(["--model", "itpn_nano", "--data_path", images, "--input_size", "64",
                   "--batch_size", "4", "--accum_iter", "2", "--num_workers", "0",
                   "--output_dir", out, "--log_every", "1", "--vis_images", "0",
                   "--fpn_depth", "1", "--epochs", "2", "--max_steps", "3", "--lr", "1e-3",
                   "--warmup_epochs", "0", "--mfm", "ema", "--device", "cpu"])
    torch.save(result.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result.history, f)


def test_two_process_gloo_ranks_stay_identical(tmp_path):
    images = make_toy_dataset(tmp_path / "toy", num_train=32, num_val=1,
                              image_size=64)["train"]["image_root"]
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(images), str(out)), nprocs=2, join=True)

    sd0 = torch.load(out / "rank0.pt", weights_only=True)
    sd1 = torch.load(out / "rank1.pt", weights_only=True)
    assert sd0.keys() == sd1.keys()
    for k in sd0:  # student, decoder, MFM heads and the EMA teacher
        assert torch.equal(sd0[k], sd1[k]), k
    h0 = json.loads((out / "rank0.json").read_text())
    h1 = json.loads((out / "rank1.json").read_text())
    assert [h["step"] for h in h0] == [1, 2, 3] and h0 == h1  # losses averaged over ranks

    ckpt = load_checkpoint(out / "checkpoint-last.pth")
    assert ckpt["step"] == 3 and ckpt["args"]["world_size"] == 2
    assert ckpt["args"]["eff_batch_size"] == 4 * 2 * 2
    assert len(ckpt["rng"]) == 2  # every rank's random state, for exact resume
    assert not torch.equal(ckpt["rng"][0]["mask"], ckpt["rng"][1]["mask"])
    # 16 images per rank = 4 iterations = 2 steps per epoch: step 3 stopped in epoch 1
    assert (ckpt["epoch"], ckpt["iter_in_epoch"]) == (1, 2)


def _failing_worker(rank: int, world: int, port: int, images: str, out: str) -> None:
    """Rank 0 finds the disk full at its first checkpoint save; rank 1 trains on."""
    import contextlib
    import io

    import itpn_d2.checkpoint as ckpt_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.pop("ITPN_DEBUG", None)
    torch.set_num_threads(1)
    from pretrain.main import cli

    class FullDiskTorch:  # torch for itpn_d2.checkpoint only, whose saves find the disk full
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(*args, **kwargs):
            raise OSError(28, "No space left on device")

    if rank == 0:
        ckpt_module.torch = FullDiskTorch()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli(["--model", "itpn_nano", "--data_path", images, "--input_size", "32",
                      "--batch_size", "4", "--num_workers", "0", "--output_dir", out,
                      "--vis_images", "0", "--fpn_depth", "1", "--epochs", "2", "--mfm", "none",
                      "--device", "cpu"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"status": status, "stderr": err.getvalue()}, f)


def test_error_in_one_rank_is_one_line_and_stops_all(tmp_path):
    images = make_toy_dataset(tmp_path / "toy", num_train=16, num_val=1,
                              image_size=32)["train"]["image_root"]
    out = tmp_path / "run"
    out.mkdir()
    ctx = mp.spawn(_failing_worker, args=(2, _free_port(), str(images), str(out)), nprocs=2,
                   join=False)
    deadline = time.time() + 120  # nobody waits forever for the rank that stopped
    while not ctx.join(timeout=max(deadline - time.time(), 0.1)):  # True once both ended
        assert time.time() < deadline
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["status"] == r1["status"] == 2
    assert r0["stderr"].splitlines() == [
        f"error: no space left on device writing {out / 'checkpoint-last.pth'}: free some "
        f"space or choose another output folder; the last complete checkpoint was kept"]
    assert r1["stderr"] == ""

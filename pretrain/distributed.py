"""Multi-process training (torchrun): joining the process group, averaging values over ranks,
gathering every rank's random states, and stopping all ranks together when one fails."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from itpn_d2.errors import UserError

from .flags import SettingsError


class PeerStopped(UserError):
    """Another process of a multi-process job failed; that process reports the error."""


def raise_if_any_failed(error: Optional[BaseException], info: "DistInfo") -> None:
    """Collective: stop every rank together when any rank failed (no rank waits forever).

    The lowest failing rank raises its own ``error`` (so the job prints it once); the other
    ranks raise :class:`PeerStopped`.
    """
    if info.world_size > 1:
        failed: List[Any] = [None] * info.world_size
        dist.all_gather_object(failed, error is not None)
        first = next((r for r, f in enumerate(failed) if f), None)
        if first is not None and first != info.rank:
            raise PeerStopped(f"rank {first} stopped with an error")
    if error is not None:
        raise error


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: Optional[str]) -> Tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_name = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device cuda requested but CUDA is not available; "
                                "use --device cpu")
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        device, backend = torch.device("cuda", info.local_rank), "nccl"
    else:
        device, backend = torch.device(device_name), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
        info.initialized_here = True
    return info, device


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def gather_rng_states(state: Dict[str, Any], info: DistInfo) -> List[Dict[str, Any]]:
    if info.world_size == 1:
        return [state]
    states: List[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states

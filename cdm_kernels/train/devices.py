"""Where a run runs: its device, and this process's place in a torchrun job (its rank, the mean and
gather over the processes, the DistributedDataParallel wrapper)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..edm import EDMPrecond


class _Dist:
    """This process's place in a torch.distributed job started by torchrun (or a single process)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.group = None
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
            self.group = dist.group.WORLD

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t[0]) / self.world

    def gather(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def process_seed(seed: int, rank: int) -> int:
    """The seed of the global random generators of process `rank` (its noise, CDM eps and rollouts)."""
    return seed * 7919 + 1 + rank


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _wrap_ddp(net: EDMPrecond, device: torch.device, dd: _Dist) -> torch.nn.Module:
    if not dd.active:
        return net
    import inspect

    # The only buffer (the Fourier frequencies) is equal everywhere and never changes: no need
    # to broadcast it before every forward pass (the keyword was renamed in recent torch).
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
    )

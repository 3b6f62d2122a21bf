"""A training run between two steps (`Run`) and `set_up`, which builds one from a TrainConfig: the
network, its EMA and optimizer, the data order, the loss, the random states, a resumed checkpoint."""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data import BatchOrder, ImageDataset, ReferenceDraw, load_dataset
from ..edm import EDMPrecond
from .checkpoints import _resume_or_start, _set_rng_state
from .devices import _Dist, _resolve_device, _wrap_ddp, process_seed
from .options import TrainConfig, _check_config


def build_loss(c: TrainConfig, num_refs: int, local_batch: int, group=None, sharded: bool = False):
    """The loss object of `c.loss`. The STF losses get each step's reference batch from the loop
    (`ref=`, drawn by data.ReferenceDraw from a pool of `num_refs` images), checked against rbatch."""
    from ..losses import CDMLoss, EDMLoss, STFCDMLoss, STFLoss

    cdm = dict(num_steps=c.cdm_steps, lambda_m=c.lambda_m, eps_min=c.eps_min, eps_max=c.eps_max)
    if c.loss == "edm":
        return EDMLoss()
    if c.loss == "cdm":
        return CDMLoss(**cdm)
    if c.rbatch < local_batch:
        raise ValueError(
            f"rbatch ({c.rbatch}) must be at least the per-process batch ({local_batch}): the reference "
            "batch starts with the minibatch's own images"
        )
    if c.rbatch - local_batch > num_refs - c.batch:
        # the other references are drawn outside the global batch (data.ReferenceDraw)
        raise ValueError(
            f"rbatch ({c.rbatch}) needs {c.rbatch - local_batch} references besides the batch but the data "
            f"set offers {num_refs - c.batch} outside the global batch of {c.batch}; lower --rbatch"
        )
    stf = dict(rbatch=c.rbatch, backend=c.backend, sharded=sharded, group=group)
    if c.loss == "stf":
        return STFLoss(**stf)
    return STFCDMLoss(**cdm, **stf)


def build_references(c: TrainConfig, num_refs: int, local_batch: int, rank: int = 0,
                     world_size: int = 1) -> ReferenceDraw | None:
    """The STF losses' draw of each step's other references from a pool of `num_refs` images
    (`data.ReferenceDraw`: rbatch - local_batch of them, outside the global batch), None for the
    losses without references."""
    if c.loss not in ("stf", "stf+cdm"):
        return None
    return ReferenceDraw(num_refs, c.rbatch - local_batch, c.batch, c.seed, rank, world_size)


def build_model(c: TrainConfig, resolution: int, channels: int, label_dim: int) -> EDMPrecond:
    return EDMPrecond(
        resolution,
        channels,
        label_dim=label_dim,
        model_channels=c.model_channels,
        channel_mult=tuple(c.channel_mult),
        num_blocks=c.num_blocks,
        attn_resolutions=tuple(c.attn_resolutions),
        dropout=c.dropout,
    )


@dataclass
class Run:
    """A training run between two steps: what `set_up` builds and `train_step` advances.

    `model` is what the loss calls: `net` itself, or its DistributedDataParallel wrapper."""

    c: TrainConfig
    device: torch.device
    dd: _Dist
    ds: ImageDataset
    net: EDMPrecond
    ema: EDMPrecond
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    order: BatchOrder
    loss_fn: Callable
    refs: ReferenceDraw | None   # the STF losses' draw of each step's other references
    bank_images: torch.Tensor    # the pool the references are drawn from (the flips follow with --xflip)
    total_steps: int
    step: int = 0
    images_seen: int = 0
    resumed: str | None = None   # the checkpoint this run continues
    damaged: list[str] = field(default_factory=list)  # newer checkpoints of its folder that did not load

    @property
    def main_proc(self) -> bool:
        return self.dd.rank == 0

    @property
    def local_batch(self) -> int:
        return self.c.batch // self.dd.world

    @property
    def log_path(self) -> str:
        return os.path.join(self.c.outdir, "log.jsonl")


def _load_data(c: TrainConfig) -> ImageDataset:
    ds = load_dataset(c.data, use_labels=c.cond)
    if c.cond and ds.labels is None:
        raise ValueError(f"--cond needs labels, but the data set {c.data!r} has none (see cdm_kernels.data)")
    if c.batch > len(ds):
        raise ValueError(f"--batch {c.batch} is larger than the data set ({len(ds)} images)")
    return ds


def _check_backend(device: torch.device, backend: str) -> None:
    """Raises ValueError naming --backend when the stable target has no such backend on `device`."""
    from .. import resolve_backend

    try:
        resolve_backend("stf_target", device, backend)
    except ValueError as exc:
        raise ValueError(f"--backend {backend}: {exc}") from None


def set_up(c: TrainConfig) -> Run:
    """Set-up: checks the options, the output folder and the data, builds the model, EMA, optimizer,
    data order and loss, seeds every random generator, and restores the checkpoint a --resume
    continues. Writes nothing (`fit` prepares the output folder)."""
    _check_config(c)
    if c.threads is not None:
        # On a shared or busy CPU, fewer threads than cores avoids OpenMP's spin-waiting.
        torch.set_num_threads(c.threads)
    device = _resolve_device(c.device)
    dd = _Dist(device)
    if c.batch % dd.world:
        raise ValueError(f"batch ({c.batch}) must be divisible by the number of processes ({dd.world})")
    local_batch = c.batch // dd.world
    c, ckpt_path, ckpt, damaged = _resume_or_start(c, dd)
    ds = _load_data(c)
    if "stf" in c.loss:
        _check_backend(device, c.backend)
    total_steps = c.steps if c.steps is not None else max(1, c.images // c.batch)

    # Same initial weights everywhere (DDP also broadcasts rank 0's at construction).
    torch.manual_seed(c.seed)
    net = build_model(c, ds.resolution, ds.channels, ds.label_dim).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=1e-8)
    order = BatchOrder(len(ds), c.seed, xflip=c.xflip, rank=dd.rank, world_size=dd.world)
    # Every process draws its own noise; the seeds differ by rank.
    torch.manual_seed(process_seed(c.seed, dd.rank))
    np.random.seed(process_seed(c.seed, dd.rank) % (1 << 32))
    random.seed(process_seed(c.seed, dd.rank))

    bank_images = ds.images.to(device)
    if c.xflip:
        bank_images = torch.cat([bank_images, bank_images.flip(-1)])
    loss_fn = build_loss(c, bank_images.shape[0], local_batch, group=dd.group, sharded=dd.active)
    refs = build_references(c, bank_images.shape[0], local_batch, dd.rank, dd.world)

    run = Run(c, device, dd, ds, net, ema, net, opt, order, loss_fn, refs, bank_images, total_steps)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        order.load_state_dict(ckpt["data_order"])
        _set_rng_state(ckpt["rng"][dd.rank], device)
        run.step, run.images_seen, run.resumed, run.damaged = ckpt["step"], ckpt["images_seen"], ckpt_path, damaged
    run.model = _wrap_ddp(net, device, dd)
    return run

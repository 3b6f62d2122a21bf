"""What a run writes besides its checkpoints' contents: the step log (log.jsonl) and its plot, the
sample grids, the snapshot that writes them with a checkpoint, and sampling a checkpoint's EMA weights."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from ..edm import edm_sampler, save_image_grid
from .checkpoints import _atomic_save, _config_dict, _rng_state, load_checkpoint
from .devices import _resolve_device
from .options import TrainConfig
from .run import Run, build_model


def _read_log(log_path: str) -> list[tuple[str, dict]]:
    """The lines of log.jsonl with their records. A process killed while writing a line leaves a
    truncated last line: it is dropped. A bad line elsewhere is an error naming it."""
    with open(log_path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError("not a step record")
        except ValueError as exc:
            if i == len(lines) - 1:
                break  # the half-written last line of a killed run
            raise ValueError(f"{log_path}, line {i + 1}: not a JSON record of a step ({exc}): {line[:80]!r}") from None
        out.append((line if line.endswith("\n") else line + "\n", rec))
    return out


def _plot_losses(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [rec for _, rec in _read_log(log_path)]
    steps = [rec["step"] for rec in records]
    losses = [rec["loss"] for rec in records]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    w = max(1, len(losses) // 30)
    if len(losses) >= w > 1:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w} steps")
    # the CDM loss has a martingale term that may be negative: log scale only for positive losses
    ax.set_yscale("log" if min(losses) > 0 else "linear")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per element)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def _truncate_log(log_path: str, last_step: int) -> None:
    # Steps after the resumed snapshot were lost with the killed run; they are run again.
    if not os.path.exists(log_path):
        return
    keep = [line for line, rec in _read_log(log_path) if rec["step"] <= last_step]
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, log_path)


@torch.no_grad()
def sample_grid(net, num: int, label_dim: int, seed: int, num_steps: int, device) -> torch.Tensor:
    """`num` images from `net` with the deterministic Heun sampler, from noise of a generator keyed
    by `seed` (the global random state is untouched); labels cycle 0, 1, ..., label_dim - 1."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same latents on every device
    latents = torch.randn(num, net.img_channels, net.img_resolution, net.img_resolution, generator=g).to(device)
    labels = torch.arange(num, device=device) % label_dim if label_dim else None
    return edm_sampler(net, latents, labels, num_steps=num_steps, generator=g).float()


def snapshot(run: Run) -> dict:
    """Snapshot: a grid of samples from the EMA weights, the loss plot and a checkpoint of every
    state (written atomically). Returns the paths written (on the first process)."""
    c, dd, step = run.c, run.dd, run.step
    paths = {}
    rng = dd.gather(_rng_state(run.device))
    # DDP keeps the replicas equal; a checksum per process in the checkpoint shows that they are.
    checksums = dd.gather(float(sum(p.detach().double().sum() for p in run.net.parameters())))
    if run.main_proc:
        if c.grid:
            grid = sample_grid(run.ema, c.grid, run.ds.label_dim, c.seed, c.sample_steps, run.device)
            paths["samples"] = os.path.join(c.outdir, f"samples-{step:07d}.png")
            save_image_grid(grid, paths["samples"], ncols=int(math.ceil(math.sqrt(c.grid))))
        if os.path.exists(run.log_path):
            paths["plot"] = os.path.join(c.outdir, "loss.png")
            _plot_losses(run.log_path, paths["plot"])
        paths["checkpoint"] = os.path.join(c.outdir, f"checkpoint-{step:07d}.pt")
        _atomic_save(
            {
                "model": run.net.state_dict(),
                "ema": run.ema.state_dict(),
                "optimizer": run.opt.state_dict(),
                "step": step,
                "images_seen": run.images_seen,
                "rng": rng,
                "data_order": run.order.state_dict(),
                "world_size": dd.world,
                "param_checksums": checksums,
                "image_shape": [run.ds.channels, run.ds.resolution, run.ds.resolution],
                "label_dim": run.ds.label_dim,
                "config": _config_dict(c),
            },
            paths["checkpoint"],
        )
    if dd.active:
        dist.barrier(group=dd.group)
    return paths


def sample_checkpoint(path: str, out_png: str, num: int = 100, num_steps: int = 18, seed: int = 0,
                      device: str = "auto", S_churn: float = 0.0) -> torch.Tensor:
    """Samples `num` images from the EMA weights of a checkpoint (file, or the newest readable one of
    a run folder) with EDM's Heun sampler and writes them as a grid to `out_png`; returns the images
    (num, C, R, R) in [-1, 1]."""
    return _sample(load_checkpoint(path)[1], out_png, num, num_steps, seed, device, S_churn)


def _sample(ckpt: dict, out_png: str, num: int, num_steps: int, seed: int, device: str, S_churn: float):
    cfg = dict(ckpt["config"])
    for key in ("channel_mult", "attn_resolutions"):
        cfg[key] = tuple(cfg[key])
    c = TrainConfig(**cfg)
    dev = _resolve_device(device)
    C, R, _ = ckpt["image_shape"]
    net = build_model(c, R, C, ckpt["label_dim"]).to(dev)
    net.load_state_dict(ckpt["ema"])
    net.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num, C, R, R, generator=g).to(dev)
    labels = torch.arange(num, device=dev) % ckpt["label_dim"] if ckpt["label_dim"] else None
    images = edm_sampler(net, latents, labels, num_steps=num_steps, S_churn=S_churn, S_min=0.05, S_max=50.0,
                         generator=g).float().clamp(-1, 1)
    save_image_grid(images, out_png, ncols=int(math.ceil(math.sqrt(num))))
    return images

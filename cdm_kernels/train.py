"""A thin EDM-style training loop for the losses of cdm_kernels (EDM, STF, CDM, STF + CDM).

    python -m cdm_kernels.train --loss stf+cdm --outdir runs/digits          # or: cdm-train ...
    torchrun --nproc_per_node 2 -m cdm_kernels.train --loss stf ...          # data-parallel

One step: draw the next global batch (`data.BatchOrder`; process r of P takes every P-th image),
for the STF losses complete each process's reference batch (its own images, then rbatch - B others,
`data.ReferenceDraw`: drawn outside the global batch and disjoint across the processes, so the
union of the P reference batches that the sharded stable target uses holds no image twice),
evaluate the per-element loss, backpropagate sum(loss) / (global batch) through DDP (which averages
the gradients of the processes), set the learning rate lr * min(images / lr_rampup, 1), take an Adam
step, and update the EMA of the weights with EDM's half-life rule
beta = 0.5 ** (batch / max(min(ema_halflife, images * ema_rampup), 1e-8)).

The loop reads as four named steps: `set_up` (checks the options, the output folder and the data,
builds everything and restores a checkpoint; writes nothing), `train_step` (one step),
`snapshot` (samples, plot, checkpoint) and `fit` (the loop that logs them); `train(c)` is
`fit(set_up(c))`.

The output folder holds log.jsonl (one line a step), loss.png, samples-<step>.png (a grid from the
EMA weights with EDM's Heun sampler) and checkpoint-<step>.pt at each snapshot. A checkpoint holds
the model, the EMA, the optimizer, the step and images seen, every random state (torch, numpy,
python, of every process) and the data order, as tensors and plain data only
(`torch.load(path, weights_only=True)`); it is written to a temporary file and renamed, so a run
killed at any moment leaves the last snapshot intact, and `--resume` continues it to the same
weights, bit for bit, as an uninterrupted run.

`--resume` continues in the checkpoint's own folder (unless --outdir names an empty one) and for
the checkpoint's duration (unless --steps or --images give a new one); a run already at its end
says there is nothing to do. A checkpoint of the folder that cannot be read (a damaged copy) is
named, set aside as `.damaged`, and the newest one that loads is resumed; the temporary files of
writes a killed run left half done are removed. A fresh run refuses a folder that already holds
checkpoints (continue it with --resume, or pass --overwrite to delete its checkpoints, log, plot
and samples first), so that a later --resume can never pick up another run's checkpoint; --resume
refuses options that differ from the checkpoint's (loss, batch, model, data, seed, ...) except
those in RESUME_MAY_CHANGE (duration, snapshots, threads, device, ...). On the command line, such
errors (and every bad option value) are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .data import BatchOrder, ImageDataset, ReferenceDraw, get_batch, load_dataset
from .edm import EDMPrecond, edm_sampler, save_image_grid
from .progress import progress

__all__ = [
    "LOSSES", "RESUME_MAY_CHANGE", "Run", "TrainConfig", "build_loss", "build_model", "fit", "main", "parse_args",
    "process_seed", "set_up", "snapshot", "train", "train_step",
]

LOSSES = ("edm", "stf", "cdm", "stf+cdm")
DEFAULT_OUTDIR = "runs/train"
DEFAULT_IMAGES = 19_200


@dataclass
class TrainConfig:
    """Every option of a training run (the command line maps one-to-one onto these fields)."""

    data: str = "digits"              # "digits", a folder, a .zip or a .npy/.npz file
    outdir: str | None = None         # None: DEFAULT_OUTDIR, or with resume the checkpoint's folder
    loss: str = "stf+cdm"             # one of LOSSES
    batch: int = 64                   # global batch (split over the processes)
    rbatch: int = 1024                # STF reference batch per process (its own images first)
    cdm_steps: int = 6                # CDM: points of each rollout schedule
    lambda_m: float = 2.0             # CDM: weight of the martingale term
    eps_min: float = 0.0              # CDM: sigma_min = max(sigma - eps, 0.002), eps ~ U[eps_min, eps_max]
    eps_max: float = 0.05
    lr: float = 2e-3
    lr_rampup: int = 1_000            # images of linear learning-rate warm-up
    ema_halflife: int = 5_000         # images; EDM's half-life of the EMA weights
    ema_rampup: float = 0.05          # the half-life is at most this fraction of the images seen
    images: int | None = None         # duration in training images (steps = images / batch); None:
                                      # DEFAULT_IMAGES, or with resume (and no steps) the checkpoint's
    steps: int | None = None          # duration in steps (overrides images)
    seed: int = 0
    snap: int = 100                   # snapshot (grid, plot, checkpoint) every this many steps
    resume: str | None = None         # a checkpoint file, or an output folder (its latest checkpoint)
    device: str = "auto"              # "auto", "cpu" or "cuda"
    cond: bool = False                # class-conditional (needs labels; not with the STF losses)
    xflip: bool = False               # x-flip augmentation (off for digits: a flipped digit is not one)
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0
    sample_steps: int = 18            # Heun steps of the snapshot sampler
    grid: int = 100                   # images in the snapshot grid
    backend: str = "auto"             # stable-target backend (cdm_kernels.stf_target)
    progress: bool = True             # progress on the first process (cdm_kernels.progress)
    threads: int | None = None        # torch intra-op CPU threads (None: torch's default)
    overwrite: bool = False           # a fresh run may delete the checkpoints, log and samples in outdir


# Options that may differ between a checkpoint and the run that resumes it: the duration, the
# snapshots, where and how fast it runs. Every other option must match (`_check_resume_config`).
RESUME_MAY_CHANGE = frozenset(
    {"images", "steps", "snap", "resume", "outdir", "overwrite", "device", "threads", "progress", "grid",
     "sample_steps", "backend"}
)
# Command-line names of the options whose field names differ from them.
_FLAGS = {"model_channels": "--channels", "num_blocks": "--blocks", "attn_resolutions": "--attn"}


# ----------------------------------------------------------------------------------------------
# Random states and checkpoints
# ----------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    """Every global random state of this process, as tensors and plain data (weights_only-safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never half of one
        _fsync_dir(os.path.dirname(os.path.abspath(path)))  # and the rename itself survives a crash
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(folder: str) -> None:
    # A rename is durable once its folder is synced; some platforms (Windows) cannot open or sync one.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoints(folder: str) -> list[str]:
    """The checkpoint-<step>.pt files of a folder, by step (none if it does not exist)."""
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.pt")))
    return [p for p in found if re.fullmatch(r"checkpoint-\d+\.pt", os.path.basename(p))]


# The temporary files of writes that a killed run left half done (`_atomic_save`, `_plot_losses`,
# `_truncate_log`): a checkpoint's is as large as a checkpoint.
_TEMPORARY = (r"checkpoint-\d+\.pt\.tmp\d+", r"log\.jsonl\.tmp", r"loss\.png\.tmp\.png")
_OUTPUTS = (r"checkpoint-\d+\.pt(\.damaged)?", r"log\.jsonl", r"loss\.png", r"samples-\d+\.png")


def _clear_run(folder: str, temporary_only: bool = False) -> list[str]:
    """Deletes a run's outputs from `folder` (checkpoints, log, plot, sample grids, the leftover
    temporary files of killed writes; with `temporary_only`, those files only) and nothing else.
    Returns the names deleted."""
    patterns = _TEMPORARY if temporary_only else _TEMPORARY + _OUTPUTS
    removed = []
    for name in sorted(os.listdir(folder)):
        if any(re.fullmatch(p, name) for p in patterns) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _config_dict(c: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(c)))  # tuples as lists, as a checkpoint holds them


def _check_resume_config(saved: dict, c: TrainConfig, ckpt_path: str) -> None:
    """Raises ValueError naming every option of `c` that differs from the checkpoint's `saved`
    configuration, except those in RESUME_MAY_CHANGE (and options older checkpoints lack)."""
    def show(v):
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    now = _config_dict(c)
    diffs = []
    for name, value in now.items():
        if name in RESUME_MAY_CHANGE or name not in saved or saved[name] == value:
            continue
        old = saved[name]
        if name == "data" and os.path.exists(old) and os.path.exists(value) and os.path.samefile(old, value):
            continue  # the same data set named by another path
        diffs.append(f"{_flag(name)} {show(value)} (the checkpoint has {show(saved[name])})")
    if diffs:
        raise ValueError(
            f"--resume {ckpt_path}: this run's options differ from the checkpoint's: " + "; ".join(diffs)
            + ". Resume with the checkpoint's options, or start a new run in another --outdir"
        )


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (damaged, truncated, or not written by this loop)."""


# What every checkpoint of this loop holds; a file without them is not one.
_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "images_seen", "rng", "data_order", "world_size")


def _read_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's zip reader, the unpickler and the OS raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of cdm_kernels.train (it lacks {', '.join(missing)})")
    return ckpt


def load_checkpoint(path: str, warn: Callable[[str], None] | None = print) -> tuple[str, dict, list[str]]:
    """(file, contents, damaged) of a checkpoint file, or of the newest checkpoint-<step>.pt of a
    folder that loads; `damaged` lists the newer ones of the folder that did not, each reported
    through `warn`. Raises FileNotFoundError for no checkpoint, CheckpointError for none readable."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path!r}: no such checkpoint file or folder")
        return path, _read_checkpoint(path), []
    found = _checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path!r}: the folder holds no checkpoint-<step>.pt")
    damaged, reasons = [], []
    for candidate in reversed(found):
        try:
            return candidate, _read_checkpoint(candidate), damaged
        except CheckpointError as exc:
            damaged.append(candidate)
            reasons.append(str(exc))
            if warn is not None:
                warn(f"warning: {exc}; trying the checkpoint before it")
    raise CheckpointError(f"--resume {path!r}: none of its {len(found)} checkpoints can be read ({reasons[-1]})")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _check_config(c: TrainConfig) -> None:
    """Raises ValueError naming the first option whose value cannot work (by its command-line flag)."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if c.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {c.loss!r}")
    for name in ("batch", "rbatch", "snap", "sample_steps", "model_channels", "num_blocks"):
        if not positive_int(getattr(c, name)):
            raise ValueError(f"{_flag(name)} must be a positive int, got {getattr(c, name)!r}")
    for name in ("images", "steps", "threads"):
        if getattr(c, name) is not None and not positive_int(getattr(c, name)):
            raise ValueError(f"{_flag(name)} must be a positive int, got {getattr(c, name)!r}")
    if "cdm" in c.loss and not (positive_int(c.cdm_steps) and c.cdm_steps >= 2):
        raise ValueError(f"--cdm-steps must be an int >= 2 (the points of each rollout schedule), got {c.cdm_steps!r}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ValueError(f"--lr must be positive and finite, got {c.lr}")
    for name in ("lr_rampup", "ema_halflife", "ema_rampup", "eps_min", "lambda_m", "grid"):
        if not (getattr(c, name) >= 0 and math.isfinite(getattr(c, name))):
            raise ValueError(f"{_flag(name)} must be >= 0 and finite, got {getattr(c, name)}")
    if not c.eps_min <= c.eps_max < math.inf:
        raise ValueError(f"--eps-max must be finite and >= --eps-min ({c.eps_min}), got {c.eps_max}")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {c.dropout}")
    for name in ("channel_mult", "attn_resolutions"):
        if not all(positive_int(v) for v in getattr(c, name)) or (name == "channel_mult" and not c.channel_mult):
            raise ValueError(f"{_flag(name)} must be a list of positive ints, got {getattr(c, name)!r}")
    if c.device not in ("auto", "cpu", "cuda") and not c.device.startswith("cuda:"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {c.device!r}")
    if c.cond and c.loss in ("stf", "stf+cdm"):
        # The stable target pools references of every class: at high noise it is the mean of all
        # images whatever the label, which would teach a conditional model to ignore its label.
        raise ValueError(
            f"--cond cannot be used with loss {c.loss!r}: the stable target averages references of every "
            "class, so it is the target of an unconditional model; train unconditionally, or use 'edm'/'cdm'"
        )


def build_loss(c: TrainConfig, num_refs: int, local_batch: int, group=None, sharded: bool = False):
    """The loss object of `c.loss`. The STF losses get each step's reference batch from the loop
    (`ref=`, drawn by data.ReferenceDraw from a pool of `num_refs` images), checked against rbatch."""
    from .losses import CDMLoss, EDMLoss, STFCDMLoss, STFLoss

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


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


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


def _with_run_defaults(c: TrainConfig, ckpt_path: str | None = None, saved: dict | None = None) -> TrainConfig:
    """`c` with the output folder and the duration filled in where they are None: a fresh run takes
    DEFAULT_OUTDIR and DEFAULT_IMAGES; a resumed one continues in the checkpoint's folder, for the
    checkpoint's duration (its --steps or --images) unless this run gives one."""
    fill = {}
    if c.outdir is None:
        fill["outdir"] = (os.path.dirname(ckpt_path) or ".") if ckpt_path else DEFAULT_OUTDIR
    if c.images is None:
        fill["images"] = (saved or {}).get("images") or DEFAULT_IMAGES
        if c.steps is None and saved:
            fill["steps"] = saved.get("steps")
    return dataclasses.replace(c, **fill)


def _resume_or_start(c: TrainConfig, dd: _Dist) -> tuple[TrainConfig, str | None, dict | None, list[str]]:
    """(`c` with its run defaults, the checkpoint to resume: path, contents and the newer ones that
    did not load) or (`c`, None, None, []) for a fresh run. Refuses an output folder that holds
    another run, and a resume with changed options."""
    if not c.resume:
        c = _with_run_defaults(c)
        existing = _checkpoints(c.outdir)
        if existing and not c.overwrite:
            # Else a later --resume of this folder would continue the old run from its latest checkpoint.
            raise FileExistsError(
                f"--outdir {c.outdir!r} already holds checkpoints ({os.path.basename(existing[-1])} "
                f"the latest): continue that run with --resume {c.outdir}, choose another --outdir, or pass "
                "--overwrite to delete its checkpoints, log and samples and start afresh"
            )
        return c, None, None, []
    if c.overwrite:
        raise ValueError("--overwrite starts a fresh run and --resume continues one: give only one of them")
    ckpt_path, ckpt, damaged = load_checkpoint(c.resume, warn=print if dd.rank == 0 else None)
    saved = ckpt.get("config", {})
    c = _with_run_defaults(c, ckpt_path, saved)
    existing = _checkpoints(c.outdir)
    if existing and not os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), c.outdir):
        raise FileExistsError(
            f"--outdir {c.outdir!r} already holds checkpoints of another run than --resume {ckpt_path!r}; "
            "resume into the checkpoint's own folder or into an empty --outdir"
        )
    _check_resume_config(saved, c, ckpt_path)
    if ckpt["world_size"] != dd.world:
        raise ValueError(
            f"{ckpt_path} was written by {ckpt['world_size']} processes; resume it with the same number "
            f"(this run has {dd.world}) so that every random state carries over"
        )
    return c, ckpt_path, ckpt, damaged


def _load_data(c: TrainConfig) -> ImageDataset:
    ds = load_dataset(c.data, use_labels=c.cond)
    if c.cond and ds.labels is None:
        raise ValueError(f"--cond needs labels, but the data set {c.data!r} has none (see cdm_kernels.data)")
    if c.batch > len(ds):
        raise ValueError(f"--batch {c.batch} is larger than the data set ({len(ds)} images)")
    return ds


def _check_backend(device: torch.device, backend: str) -> None:
    """Raises ValueError naming --backend when the stable target has no such backend on `device`."""
    from . import resolve_backend

    try:
        resolve_backend("stf_target", device, backend)
    except ValueError as exc:
        raise ValueError(f"--backend {backend}: {exc}") from None


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
    refs = None
    if c.loss in ("stf", "stf+cdm"):
        refs = ReferenceDraw(bank_images.shape[0], c.rbatch - local_batch, c.batch, c.seed, dd.rank, dd.world)

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


def _prepare_outdir(run: Run) -> None:
    """The output folder as the run continues it: the log cut back to the resumed step, newer
    checkpoints that did not load set aside (`.damaged`), or a fresh folder (cleared with
    --overwrite); the temporary files of writes a killed run left half done removed."""
    c = run.c
    if run.main_proc:
        os.makedirs(c.outdir, exist_ok=True)
        removed = _clear_run(c.outdir, temporary_only=True)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of interrupted writes: {', '.join(removed)}", flush=True)
        if run.resumed is not None:
            _truncate_log(run.log_path, run.step)
            print(f"resumed {run.resumed} at step {run.step} ({run.images_seen} images)", flush=True)
            for path in run.damaged:
                if os.path.samefile(os.path.dirname(os.path.abspath(path)), c.outdir):
                    # Not removed (it may be worth a look), but out of the way of the next --resume.
                    os.replace(path, path + ".damaged")
                    print(f"set the unreadable {path} aside as {os.path.basename(path)}.damaged", flush=True)
        elif c.overwrite:
            _clear_run(c.outdir)
        elif os.path.exists(run.log_path):
            os.remove(run.log_path)  # the log of a run killed before its first checkpoint: nothing to resume
    if run.dd.world > 1:
        dist.barrier(group=run.dd.group)


def _announce(run: Run) -> None:
    c, dd = run.c, run.dd
    n_params = sum(p.numel() for p in run.net.parameters())
    print(
        f"{run.ds.describe()}; loss {c.loss}; {n_params / 1e6:.2f}M parameters; {dd.world} process(es) on "
        f"{run.device}; {run.total_steps} steps of {c.batch} images",
        flush=True,
    )
    refs = run.refs
    if refs is not None and refs.overlap:
        print(
            f"note: {dd.world} processes x {refs.k} references besides their batch = {dd.world * refs.k} exceed "
            f"the {refs.available} references outside the global batch: the processes' reference batches share "
            f"{refs.overlap} of them each step (lower --rbatch to {run.local_batch + refs.available // dd.world} "
            "for disjoint ones)",
            flush=True,
        )


def train_step(run: Run) -> dict:
    """One training step: the next global batch (this process's share), the loss (for the STF losses
    over this process's reference batch: its own images, then its slice of the step's draw),
    backpropagation of sum(loss) / (global batch), the learning-rate warm-up, an Adam step and the
    EMA update. Advances `run` and returns the step's log record."""
    c = run.c
    t0 = time.time()
    idx, flip = run.order.next_batch(c.batch)
    images, labels = get_batch(run.ds, idx, flip)
    images = images.to(run.device)
    labels = labels.to(run.device) if labels is not None else None

    run.opt.zero_grad(set_to_none=True)
    if run.refs is None:
        loss = run.loss_fn(run.model, images, labels)
    else:
        g_idx, g_flip = run.order.last_global
        exclude = g_idx + len(run.ds) * g_flip.long() if c.xflip else g_idx  # the flips follow in the bank
        others = run.bank_images[run.refs.draw(run.step, exclude).to(run.bank_images.device)]
        loss = run.loss_fn(run.model, images, labels, ref=torch.cat([images, others]))
    # EDM: sum over elements, mean over the global batch (DDP averages over the processes).
    loss.sum().mul(1.0 / run.local_batch).backward()
    # Counting this step's images as seen, so that the first step does not have lr = 0.
    lr = c.lr * min((run.images_seen + c.batch) / c.lr_rampup, 1.0) if c.lr_rampup > 0 else c.lr
    for g in run.opt.param_groups:
        g["lr"] = lr
    for p in run.net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    run.opt.step()
    run.images_seen += c.batch
    run.step += 1
    _update_ema(run)
    mean_loss = run.dd.mean(float(loss.detach().mean()))
    return {"step": run.step, "images": run.images_seen, "loss": mean_loss, "lr": lr, "sec": round(time.time() - t0, 4)}


def _update_ema(run: Run) -> None:
    # EDM's half-life rule, the half-life at most ema_rampup of the images seen.
    c = run.c
    ema_nimg = c.ema_halflife
    if c.ema_rampup > 0:
        ema_nimg = min(ema_nimg, run.images_seen * c.ema_rampup)
    beta = 0.5 ** (c.batch / max(ema_nimg, 1e-8))
    with torch.no_grad():
        for p_ema, p in zip(run.ema.parameters(), run.net.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(run.ema.buffers(), run.net.buffers()):
            b_ema.copy_(b)


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


def fit(run: Run, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Trains `run` to its last step: one `train_step` after another, each logged to log.jsonl,
    a `snapshot` every --snap steps and at the end. Returns the summary of `train`. A resumed run
    whose checkpoint is at or past its duration says so and writes nothing."""
    c = run.c
    if run.step >= run.total_steps:
        return _nothing_to_do(run)
    _prepare_outdir(run)
    if run.main_proc:
        _announce(run)
    # A bar on a terminal; in a log file a line every few steps, not one endless line.
    bar = progress(run.total_steps, initial=run.step, unit="steps", file=sys.stdout,
                   disable=not (run.main_proc and c.progress))
    t_start = time.time()
    steps_start = run.step
    last_loss = float("nan")
    paths: dict = {}
    log = open(run.log_path, "a") if run.main_proc else None
    try:
        while run.step < run.total_steps:
            record = train_step(run)
            last_loss = record["loss"]
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            img_s = (run.step - steps_start) * c.batch / max(time.time() - t_start, 1e-9)
            bar.set_postfix_str(f"loss {last_loss:.4f}, {img_s:.0f} images/s")
            bar.update(1)
            if run.step % c.snap == 0 or run.step == run.total_steps:
                paths = snapshot(run)
            if on_step is not None:
                on_step(run.step, record)
    finally:
        bar.close()
        if log is not None:
            log.close()
    seconds = time.time() - t_start
    done = run.step - steps_start
    summary = {
        "steps": run.step,
        "images": run.images_seen,
        "seconds": seconds,
        "images_per_second": done * c.batch / max(seconds, 1e-9),
        "loss": last_loss,
        **paths,
        "net": run.net,
        "ema": run.ema,
    }
    if run.main_proc:
        print(
            f"done: {run.step} steps ({run.images_seen} images) of loss {c.loss}; this session ran {done} steps in "
            f"{seconds:.1f} s ({summary['images_per_second']:.0f} images/s); last loss {last_loss:.4f}; "
            f"outputs in {c.outdir}",
            flush=True,
        )
    if run.dd.owns_group:
        dist.destroy_process_group()
    return summary


def _nothing_to_do(run: Run) -> dict:
    last = [rec for _, rec in _read_log(run.log_path) if rec["step"] == run.step] if os.path.exists(run.log_path) else []
    if run.main_proc:
        where = "the end" if run.step == run.total_steps else "past the end"
        print(
            f"nothing to do: {run.resumed} is at step {run.step}, {where} of this run's {run.total_steps} steps; "
            "to train further pass a larger --steps or --images (both count from the start of the run)",
            flush=True,
        )
    if run.dd.owns_group:
        dist.destroy_process_group()
    return {"steps": run.step, "images": run.images_seen, "seconds": 0.0, "images_per_second": 0.0,
            "loss": last[-1]["loss"] if last else float("nan"), "checkpoint": run.resumed, "net": run.net,
            "ema": run.ema}


def train(c: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) a training run: `fit(set_up(c), on_step)`.

    Returns a summary dict: steps, images, seconds, images_per_second, loss (the last step's mean
    per-element loss, averaged over the processes), the paths of the last snapshot (samples, plot,
    checkpoint) and the trained `net` and its `ema` (EDMPrecond modules).

    `on_step(step, record)` is called after every completed step (used by tests to stop a run)."""
    return fit(set_up(c), on_step)


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


def _profile_config(c: TrainConfig, steps: int, warmup: int, outdir: str) -> TrainConfig:
    # One more step than profiled: the run's final snapshot (a checkpoint write) falls outside.
    return dataclasses.replace(c, steps=warmup + steps + 1, snap=10**9, grid=0, progress=False, resume=None,
                               outdir=outdir)


def profile_training(c: TrainConfig, steps: int = 5, warmup: int = 1) -> dict:
    """Profiles `steps` training steps (after `warmup` steps) with torch.profiler on the CPU and
    splits their wall time into the cdm_kernels ops (every top-level `cdm_kernels::*` or
    `cdm_kernels_C::*` op, forward and backward: the stable target, rollout steps, the martingale
    loss, Philox noise) and the rest (the network, the optimizer, the loop). The run writes into
    a temporary folder.

    Returns {"seconds_per_step", "kernel_seconds_per_step", "kernel_share", "by_op": {name: s/step}}.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _profile(set_up(_profile_config(c, steps, warmup, tmp)), steps, warmup)


def _profile(run: Run, steps: int, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    marks = {}

    def on_step(step, record):
        # The profiler's own start and stop (stop processes every recorded event) fall outside.
        if step == warmup:
            prof.start()
            marks["t0"] = time.perf_counter()
        elif step == warmup + steps:
            marks["t1"] = time.perf_counter()
            prof.stop()

    fit(run, on_step=on_step)
    wall = marks["t1"] - marks["t0"]

    def is_kernel(name: str) -> bool:
        return name.startswith(("cdm_kernels::", "cdm_kernels_C::"))

    by_op: dict[str, float] = {}
    for ev in prof.events():
        if not is_kernel(ev.name):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:  # count an op once, not again for the ops it calls
            if is_kernel(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            by_op[ev.name] = by_op.get(ev.name, 0.0) + ev.cpu_time_total * 1e-6 / steps
    kernel = sum(by_op.values())
    return {
        "seconds_per_step": wall / steps,
        "kernel_seconds_per_step": kernel,
        "kernel_share": kernel / (wall / steps),
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the message and where to look), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m cdm_kernels.train`; every option's help states its default once."""
    d = TrainConfig()
    p = _Parser(prog="cdm-train", description="Train an EDM denoiser with the EDM, stable-target (STF) or "
                "consistency (CDM) loss. Every option's help ends with its default.")
    D = "(default: %(default)s)"
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=d.data, help=f"'digits' (built in), a folder of images, a .zip, or a .npy/.npz {D}")
    g.add_argument("--outdir", default=None, help="output folder: log, plots, sample grids, checkpoints "
                   f"(default: {DEFAULT_OUTDIR}; with --resume, the folder of the checkpoint)")
    g.add_argument("--xflip", action="store_true", help="x-flip augmentation (default: off)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --outdir that holds checkpoints, "
                   "deleting its checkpoints, log and samples (default: off: such a folder is refused)")
    g.add_argument("--cond", action="store_true", help="class-conditional model, edm and cdm losses, needs labels "
                   "(default: off)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default=d.loss, choices=LOSSES, help=f"training objective {D}")
    g.add_argument("--batch", type=int, default=d.batch, help=f"global batch size {D}")
    g.add_argument("--rbatch", type=int, default=d.rbatch, help=f"STF reference batch per process {D}")
    g.add_argument("--cdm-steps", type=int, default=d.cdm_steps, help=f"CDM rollout schedule points {D}")
    g.add_argument("--lambda-m", type=float, default=d.lambda_m, help=f"CDM martingale weight {D}")
    g.add_argument("--eps-min", type=float, default=d.eps_min, help=f"CDM: sigma_min = max(sigma - eps, 0.002), "
                   f"eps ~ U[eps-min, eps-max] {D}")
    g.add_argument("--eps-max", type=float, default=d.eps_max, help=f"see --eps-min {D}")
    g.add_argument("--backend", default=d.backend, help=f"stable-target backend (cdm_kernels.available_backends) {D}")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate {D}")
    g.add_argument("--lr-rampup", type=int, default=d.lr_rampup, help=f"images of learning-rate warm-up {D}")
    g.add_argument("--ema-halflife", type=int, default=d.ema_halflife, help=f"EMA half-life in images {D}")
    g.add_argument("--ema-rampup", type=float, default=d.ema_rampup,
                   help=f"the EMA half-life is at most this fraction of the images seen {D}")
    g.add_argument("--images", type=int, default=None, help="duration in training images "
                   f"(default: {DEFAULT_IMAGES}; with --resume, the checkpoint's duration)")
    g.add_argument("--steps", type=int, default=None,
                   help="duration in steps, counted from the start of the run; overrides --images (default: none)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the weights, the data order and the noise {D}")
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=int, default=d.model_channels, help=f"U-Net channels at the first level {D}")
    g.add_argument("--channel-mult", type=_ints, default=d.channel_mult,
                   help=f"per-level channel multipliers (default: {','.join(map(str, d.channel_mult))})")
    g.add_argument("--blocks", type=int, default=d.num_blocks, help=f"residual blocks per level {D}")
    g.add_argument("--attn", type=_ints, default=d.attn_resolutions,
                   help=f"resolutions with attention (default: {','.join(map(str, d.attn_resolutions))})")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout probability {D}")
    g = p.add_argument_group("run")
    g.add_argument("--snap", type=int, default=d.snap, help=f"snapshot (grid, plot, checkpoint) every this many steps {D}")
    g.add_argument("--resume", default=None, help="checkpoint file, or run folder (its newest readable checkpoint), "
                   "to continue (default: none: a fresh run)")
    g.add_argument("--device", default=d.device, help=f"'auto' (a CUDA GPU if there is one), 'cpu' or 'cuda[:i]' {D}")
    g.add_argument("--sample-steps", type=int, default=d.sample_steps, help=f"Heun steps of the snapshot grids {D}")
    g.add_argument("--grid", type=int, default=d.grid, help=f"images in each snapshot grid, 0 for none {D}")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress display (default: off: a bar on a "
                   "terminal, a line every few steps in a log file)")
    g.add_argument("--sample-only", metavar="PNG", default=None, help="instead of training, sample --grid images "
                   "from the EMA weights of --resume into PNG (default: none: train)")
    g.add_argument("--churn", type=float, default=0.0, help=f"S_churn of the --sample-only sampler, 0 is deterministic {D}")
    g.add_argument("--profile", type=int, default=0, metavar="N", help="instead of training, profile N steps and "
                   "print the share of time in cdm_kernels ops (default: 0: train)")
    return p


def parse_args(argv=None, with_profile: bool = False):
    """The TrainConfig of a command line (and the parsed namespace, for --profile and --sample-only,
    if `with_profile`)."""
    a = build_parser().parse_args(argv)
    c = TrainConfig(
        data=a.data, outdir=a.outdir, loss=a.loss, batch=a.batch, rbatch=a.rbatch, cdm_steps=a.cdm_steps,
        lambda_m=a.lambda_m, eps_min=a.eps_min, eps_max=a.eps_max, lr=a.lr, lr_rampup=a.lr_rampup,
        ema_halflife=a.ema_halflife, ema_rampup=a.ema_rampup, images=a.images, steps=a.steps, seed=a.seed,
        snap=a.snap, resume=a.resume, device=a.device, cond=a.cond, xflip=a.xflip,
        model_channels=a.channels, channel_mult=a.channel_mult, num_blocks=a.blocks, attn_resolutions=a.attn,
        dropout=a.dropout, sample_steps=a.sample_steps, grid=a.grid, backend=a.backend, progress=not a.no_progress,
        threads=a.threads, overwrite=a.overwrite,
    )
    return (c, a) if with_profile else c


def _fail(message: str):
    """Ends the program like a command-line error: the message on one line, status 2."""
    sys.stderr.write(f"cdm-train: error: {' '.join(message.split())}\n")
    raise SystemExit(2)


def _or_exit(fn, *args):
    """fn(*args); a ValueError or OSError it raises (a bad option, a missing or unreadable file, a
    folder that holds another run: all found before any training) is a command-line error."""
    try:
        return fn(*args)
    except (ValueError, OSError) as exc:
        _fail(str(exc))


def main(argv=None) -> None:
    """Entry point of `python -m cdm_kernels.train` and `cdm-train`."""
    c, a = parse_args(argv, with_profile=True)
    if a.sample_only:
        if not c.resume:
            _fail("--sample-only needs --resume (a checkpoint file or a run folder)")
        folder = os.path.dirname(os.path.abspath(a.sample_only))
        if not os.path.isdir(folder):
            _fail(f"--sample-only {a.sample_only!r}: the folder {folder!r} does not exist")
        ckpt_path, ckpt, _ = _or_exit(load_checkpoint, c.resume)
        _sample(ckpt, a.sample_only, c.grid or 100, c.sample_steps, c.seed, c.device, a.churn)
        print(f"wrote {c.grid or 100} samples of {ckpt_path} to {a.sample_only}")
    elif a.profile:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            r = _profile(_or_exit(set_up, _profile_config(c, a.profile, 1, tmp)), a.profile, 1)
        print(
            f"profile of {a.profile} steps, loss {c.loss}, batch {c.batch}"
            + (f", rbatch {c.rbatch}" if "stf" in c.loss else "")
            + (f", {c.cdm_steps} rollout points" if "cdm" in c.loss else "")
            + f": {r['seconds_per_step'] * 1e3:.1f} ms a step, {r['kernel_seconds_per_step'] * 1e3:.1f} ms "
            f"({100 * r['kernel_share']:.1f}%) in cdm_kernels ops"
        )
        for name, sec in r["by_op"].items():
            print(f"  {name:48s} {sec * 1e3:9.2f} ms/step")
    else:
        fit(_or_exit(set_up, c))


if __name__ == "__main__":
    main()

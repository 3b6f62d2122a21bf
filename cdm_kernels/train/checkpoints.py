"""Checkpoints of a training run: every random state, the atomic write, finding and reading a run's
checkpoints (a damaged one named and skipped), and the checks that a --resume continues the same run."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
from typing import Callable

import numpy as np
import torch

from .devices import _Dist
from .options import DEFAULT_IMAGES, DEFAULT_OUTDIR, RESUME_MAY_CHANGE, TrainConfig, _flag


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

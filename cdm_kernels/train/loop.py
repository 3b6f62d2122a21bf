"""The loop: `train_step` (one step: batch, references, loss, Adam, the learning-rate warm-up, the EMA),
`fit` (step after step, logged, with snapshots) and `train(c)`, which is `fit(set_up(c))`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..data import get_batch
from ..progress import progress
from .checkpoints import _clear_run
from .options import TrainConfig
from .run import Run, set_up
from .snapshots import _read_log, _truncate_log, snapshot


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

"""`--profile N`: the share of a training step's time spent in this library's ops (torch.profiler on
the CPU), the rest being the network, the optimizer and the loop."""

from __future__ import annotations

import dataclasses
import time

from .loop import fit
from .options import TrainConfig
from .run import Run, set_up


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

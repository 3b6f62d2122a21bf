"""The command line `python -m cdm_kernels.train` (and `cdm-train`): train, resume, --sample-only or
--profile, with every error found before training reported as one line and exit status 2."""

from __future__ import annotations

import os

from .checkpoints import load_checkpoint
from .loop import fit
from .options import _fail, _or_exit, parse_args
from .profiling import _profile, _profile_config
from .run import set_up
from .snapshots import _sample


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

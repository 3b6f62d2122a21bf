"""The Triton kernels compile for a real GPU without one: Triton -> PTX -> ptxas for sm_90, no spills
(python -m cdm_kernels.triton.compile_check runs every variant for sm_80 and sm_90; this runs the
stable target's bf16 per-chunk kernels and the float32 rollout, noise, martingale-loss and
level-check kernels)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(pytest.importorskip("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "cdm_kernels.triton.compile_check", "--arch", "90", "--quick"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| _")]
    rollout = [r for r in rows if r.startswith(("| _rollout_step_kernel", "| _martingale_kernel", "| _philox",
                                                "| _check_levels_kernel"))]
    stf = [r for r in rows if r not in rollout]
    # shift rows (queries, references), the forward update, the backward terms (distances recomputed, kept)
    assert len(stf) == 5 and all("| 0/0 |" in r for r in stf), res.stdout
    # six step variants, four of the loss, the noise, the level checks of one and two levels
    assert len(rollout) == 13 and all("| 0/0 |" in r for r in rollout), res.stdout

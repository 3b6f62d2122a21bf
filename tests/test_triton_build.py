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
    # no 32-bit size argument multiplied in 32 bits (the last column; the scan: the next test)
    assert all(r.rstrip().endswith("| 0 |") for r in rows), res.stdout


_SCAN_PROBE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cdm_kernels.triton.compile_check import size_products_in_32_bits


@triton.jit
def copy_rows(x_ptr, out_ptr, M, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) // tl.cdiv(M, BLOCK)
    cols = (tl.program_id(0) % tl.cdiv(M, BLOCK)) * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        idx = row.to(tl.int64) * M + cols
    else:
        idx = row * M + cols
    tl.store(out_ptr + idx, tl.load(x_ptr + idx, mask=cols < M), mask=cols < M)


sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
for wide in (False, True):
    ptx = triton.compile(ASTSource(copy_rows, sig, {"WIDE": wide, "BLOCK": 1024}),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(wide, len(size_products_in_32_bits(ptx, "copy_rows", copy_rows.arg_names, sig)))
"""


@pytest.mark.skipif(pytest.importorskip("triton") is None, reason="triton is not installed")
def test_the_ptx_scan_finds_a_size_multiplied_in_32_bits(tmp_path):
    # compile_check fails a kernel whose PTX multiplies a 32-bit size argument in 32 bits (an index
    # row * M that wraps once B M passes 2^31); the scan is shown to find one, and to pass the same
    # kernel with the row widened to int64 first, as every kernel of the package does.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    probe = tmp_path / "probe.py"  # triton.jit reads its kernels' source from a file
    probe.write_text(_SCAN_PROBE)
    res = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    found = dict(line.split() for line in res.stdout.splitlines())
    assert int(found["False"]) >= 1, "the scan missed row * M in 32 bits"
    assert int(found["True"]) == 0, res.stdout

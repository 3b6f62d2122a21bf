"""The device-side check of noise levels (cdm_kernels/level_status.py) as a Triton kernel, and the
record of a bad sample that the rollout kernels share."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements a program, at most: the level check's and the rollout kernels'


def _block(n: int) -> int:
    """The block of a launch over n elements: BLOCK, or the power of two at or above n (at least 16)."""
    return min(BLOCK, triton.next_power_of_2(max(n, 16)))


@triton.jit
def _record_bad_levels(status_ptr, source, sample, a, b):
    # cdm_kernels/level_status.py's word [source, sample, a bits, b bits]: whoever sets the source
    # writes the rest (sample: int64).
    if tl.atomic_cas(status_ptr, sample * 0, sample * 0 + source) == 0:
        tl.store(status_ptr + 1, sample)
        tl.store(status_ptr + 2, a.to(tl.float64).to(tl.int64, bitcast=True))
        tl.store(status_ptr + 3, b.to(tl.float64).to(tl.int64, bitcast=True))


@triton.jit
def _check_levels_kernel(a_ptr, b_ptr, out_ptr, status_ptr, B, SOURCE: tl.constexpr, HAS_B: tl.constexpr,
                         BLOCK: tl.constexpr):
    # cdm_kernels/level_status.py: a's values are valid when positive and finite (with b: both finite
    # and 0 < b <= a). out = a with NaN where not valid; the block's first bad sample is recorded
    # (the first block to record wins).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < B
    a = tl.load(a_ptr + offs, mask=m, other=1.0)
    ok = (a > 0) & (a - a == 0)
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=m, other=1.0)
        ok = ok & (b > 0) & (b - b == 0) & (b <= a)
    tl.store(out_ptr + offs, tl.where(ok, a, float("nan")), mask=m)
    first = tl.min(tl.where(m & ~ok, offs, B), axis=0)
    if first < B:
        _record_bad_levels(status_ptr, SOURCE, first.to(tl.int64), tl.load(a_ptr + first), tl.load(b_ptr + first))


def check_levels(a: torch.Tensor, b: torch.Tensor | None, status: torch.Tensor, source: int) -> torch.Tensor:
    """a with NaN where a sample's levels are not valid, the first such sample recorded in `status`
    (cdm_kernels/level_status.py); a and b are (B,) contiguous tensors of one float dtype."""
    out = torch.empty_like(a)
    B = a.numel()
    if B:
        # Triton launches on the current device's current stream: make a's device the current one.
        blk = _block(B)
        with torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext():
            _check_levels_kernel[(triton.cdiv(B, blk),)](a, a if b is None else b, out, status, B, SOURCE=source,
                                                        HAS_B=b is not None, BLOCK=blk)
    return out

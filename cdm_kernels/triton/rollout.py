"""Triton kernels of the rollout steps, Philox noise and the martingale loss: backend "triton" of the op
families rollout_step, martingale_loss and randn, the arithmetic of csrc/rollout_math.h (design:
docs/gpu_design.md, "The rollout steps and the checks of noise levels").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..level_status import status_of
from .levels import BLOCK, _block, _record_bad_levels

KIND_SDE, KIND_EULER, KIND_HEUN, KIND_CHURN = 0, 1, 2, 3
_KINDS = {"sde": KIND_SDE, "euler": KIND_EULER, "heun": KIND_HEUN, "churn": KIND_CHURN}


@triton.jit
def _philox_randn_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z = tl.randn(seed, offset + idx)
    tl.store(out_ptr + idx, z, mask=idx < n)


@triton.jit
def _rollout_step_kernel(
    x_ptr, d_ptr, xe_ptr, de_ptr, z_ptr, tc_ptr, tn_ptr, out_ptr, status_ptr, M, seed, offset, s_noise,
    KIND: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    blocks = tl.cdiv(M, BLOCK)  # one grid axis: B cdiv(M, BLOCK) programs, row by row
    row, block = tl.program_id(0) // blocks, tl.program_id(0) % blocks
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    idx = row.to(tl.int64) * M + cols
    t = tl.load(tc_ptr + row)
    tn = tl.load(tn_ptr + row)
    # rollout_math.h, levels_ok: 0 < t < inf and 0 <= t' <= t (t' > 0 for Heun; t_hat >= t for churn).
    ok = (t > 0) & (t - t == 0)
    if KIND == 3:
        ok = ok & (tn >= t) & (tn - tn == 0)
    elif KIND == 2:
        ok = ok & (tn > 0) & (tn <= t)
    else:
        ok = ok & (tn >= 0) & (tn <= t)
    if (block == 0) & (~ok):  # the first invalid sample's record, source 1 (rollout_step)
        _record_bad_levels(status_ptr, 1, row.to(tl.int64), t, tn)
    t = tl.where(ok, t, float("nan"))
    h = tn - t
    x = tl.load(x_ptr + idx, mask=mask)
    if KIND == 0 or KIND == 3:  # stochastic steps: noise passed in, or drawn here
        if HAS_NOISE:
            z = tl.load(z_ptr + idx, mask=mask)
        else:
            z = tl.randn(seed, offset + idx).to(x.dtype)
    if KIND == 0:  # docs/math.md section 3 step 4: x + 2h/t (x - D) + sqrt(2|h| t) z
        g = 2.0 * h / t
        s = tl.sqrt(2.0 * tl.abs(h) * t)
        D = tl.load(d_ptr + idx, mask=mask)
        out = x + g * (x - D) + s * z
    elif KIND == 1:  # EDM Euler: x + h/t (x - D)
        g = h / t
        D = tl.load(d_ptr + idx, mask=mask)
        out = x + g * (x - D)
    elif KIND == 2:  # EDM Heun correction: x + h/(2t) (x - D) + h/(2t') (x_e - D_e)
        g = 0.5 * h / t
        e = 0.5 * h / tn
        D = tl.load(d_ptr + idx, mask=mask)
        xe = tl.load(xe_ptr + idx, mask=mask)
        De = tl.load(de_ptr + idx, mask=mask)
        out = x + g * (x - D) + e * (xe - De)
    else:  # churn, tn = t_hat: x + sqrt(t_hat^2 - t^2) S_noise z
        s = tl.sqrt(tn * tn - t * t) * s_noise
        out = x + s * z
    tl.store(out_ptr + idx, out, mask=mask)


@triton.jit
def _martingale_kernel(
    g_ptr, d0_ptr, da_ptr, db_ptr, y_ptr, w_ptr, out_ptr, ga_ptr, gb_ptr, M, lambda_m,
    PER_ROW: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    blocks = tl.cdiv(M, BLOCK)
    row, block = tl.program_id(0) // blocks, tl.program_id(0) % blocks
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    idx = row.to(tl.int64) * M + cols
    D0 = tl.load(d0_ptr + idx, mask=mask)
    Da = tl.load(da_ptr + idx, mask=mask)
    Db = tl.load(db_ptr + idx, mask=mask)
    y = tl.load(y_ptr + idx, mask=mask)
    if PER_ROW:
        w = tl.load(w_ptr + row)
    else:
        w = tl.load(w_ptr + idx, mask=mask)
    r = D0 - y
    ea = Da - D0
    eb = Db - D0
    if BACKWARD:  # docs/math.md section 3: the three elementwise gradients times the incoming one
        g = tl.load(g_ptr + idx, mask=mask)
        tl.store(out_ptr + idx, g * (2.0 * w * r - lambda_m * (ea + eb)), mask=mask)
        tl.store(ga_ptr + idx, g * lambda_m * eb, mask=mask)
        tl.store(gb_ptr + idx, g * lambda_m * ea, mask=mask)
    else:
        tl.store(out_ptr + idx, w * r * r + lambda_m * ea * eb, mask=mask)


def philox_randn(anchor: torch.Tensor, shape, seed: int, offset: int) -> torch.Tensor:
    """Launcher of `cdm_kernels::philox_randn`: float32 tensor of `shape` on anchor's device,
    tl.randn(seed, offset + flat index)."""
    out = torch.empty(shape, device=anchor.device, dtype=torch.float32)
    n = out.numel()
    if n:
        _philox_randn_kernel[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, BLOCK=BLOCK)
    return out


def rollout_step(x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed, offset, kind, s_noise):
    """Launcher of `cdm_kernels::rollout_step` (arguments: cdm_kernels/contract.py). A sample with
    levels that are not valid gets a NaN row and a record in x's device's status word
    (cdm_kernels/level_status.py), copied to the host after the kernel."""
    B, M = x.shape
    out = torch.empty_like(x)
    blk = _block(M)
    status = status_of(x.device)
    _rollout_step_kernel[(B * triton.cdiv(M, blk),)](
        x, denoised,
        x if x_euler is None else x_euler,
        x if denoised_euler is None else denoised_euler,
        x if noise is None else noise,
        t_cur, t_next, out, status.dev, M, seed, offset, float(s_noise),
        KIND=_KINDS[kind], HAS_NOISE=noise is not None, BLOCK=blk,
    )
    status.publish()
    return out


def _loss_launch(grad, D0, D1a, D1b, y, weight, lambda_m, backward):
    B, M = D0.shape
    out = torch.empty_like(D0)
    ga = torch.empty_like(D0) if backward else out
    gb = torch.empty_like(D0) if backward else out
    blk = _block(M)
    _martingale_kernel[(B * triton.cdiv(M, blk),)](
        D0 if grad is None else grad, D0, D1a, D1b, y, weight, out, ga, gb, M, float(lambda_m),
        PER_ROW=weight.dim() == 1, BACKWARD=backward, BLOCK=blk,
    )
    return (out, ga, gb) if backward else out


def martingale_loss_forward(D0, D1a, D1b, y, weight, lambda_m):
    """Launcher of `cdm_kernels::martingale_loss`."""
    return _loss_launch(None, D0, D1a, D1b, y, weight, lambda_m, False)


def martingale_loss_backward(grad, D0, D1a, D1b, y, weight, lambda_m):
    """Launcher of `cdm_kernels::martingale_loss_backward`."""
    return _loss_launch(grad, D0, D1a, D1b, y, weight, lambda_m, True)

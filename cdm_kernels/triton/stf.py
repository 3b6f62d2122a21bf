"""Triton kernels of the stable target (math.md section 1): forward, and backward for x, sigma and ref.

Layers (docs/gpu_design_triton.md has the design, its memory and an H100 roofline):
  kernels    `_row_stats_kernel`, `_fwd_logits_kernel`, `_fwd_merge_kernel`, `_fwd_acc_kernel`,
             `_bwd_logits_kernel`, `_bwd_acc_kernel`, `_bwd_ref_kernel`
  launchers  `stf_forward`, `stf_backward` (block sizes, grids, workspaces, the refusals)
  op         registered as backend "triton" of `cdm_kernels::stf_forward` / `stf_backward` in
             cdm_kernels/triton/__init__.py.

The reference axis is streamed in chunks of `chunk_size` references. Per chunk:
  1. `_fwd_logits_kernel`, grid (B / BLOCK_B, chunk / BLOCK_N): the logit tile
     z = (X R^T - ||r||^2 / 2) / sigma^2 with a loop over D in BLOCK_D slices, written to a (B, chunk)
     workspace, and the tile's partial softmax state (m, l, l2, t) per (row, column block).
  2. `_fwd_merge_kernel`, grid (B / BLOCK_B,): merges the chunk's partial states into the running
     state exactly (math.md, the log-sum-exp merge) and writes the rescale factor alpha per row.
  3. `_fwd_acc_kernel`, grid (B / BLOCK_B, D / BLOCK_D): acc <- alpha acc + exp(z - m) R, tiled over D.
The row constant -||x||^2 / (2 sigma^2) never enters the streamed logits (it is added to lse once),
as in stf_reference.py: it is what keeps small sigma exact in float32.

Precision modes ("ieee", "tf32", "bf16"): the operands of every product are rounded to the mode's
input format inside the kernel by integer operations on the bits (tf32: 10 mantissa bits, round half
away from zero as cvt.rna does; bf16: 7 mantissa bits, round to nearest even as the GPU's cast
does), and ||r_j||^2 and ||x_i||^2 are recomputed from the same rounded values. The logits are then
exactly those of the rounded inputs up to float32 accumulation, so the cancellation of the matmul form
(math.md, "The matmul form and its numerics") costs float32 rounding, not TF32/bf16 rounding of
|x| |r|. The explicit rounding also makes the Triton interpreter, which computes every
tl.dot in float32 whatever input_precision says, reproduce the GPU's input rounding.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import stf_reference

__all__ = ["PRECISIONS", "block_sizes", "stf_backward", "stf_forward"]

PRECISIONS = ("ieee", "tf32", "bf16")
_PREC_CODE = {"ieee": 0, "tf32": 1, "bf16": 2}
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _round(t, PREC: tl.constexpr):
    """t rounded to the input format of the precision mode, kept in t's dtype."""
    if PREC == 1:
        # TF32 keeps 10 of float32's 23 mantissa bits; adding half an ulp of TF32 to the magnitude
        # bits and truncating rounds half away from zero (cvt.rna.tf32.f32).
        bits = t.to(tl.uint32, bitcast=True)
        t = tl.where(t == t, ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True), t)
    elif PREC == 2:
        # bfloat16 keeps 7 mantissa bits; round to nearest even on the bits (the interpreter's own
        # float32 -> bfloat16 cast truncates, a GPU's rounds: this is the GPU's rounding everywhere).
        # A NaN whose payload is all in the dropped bits would round to inf: NaNs pass unchanged.
        bits = t.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        t = tl.where(t == t, (bits & 0xFFFF0000).to(tl.float32, bitcast=True), t)
    return t


@triton.jit
def _operand(t, PREC: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """A rounded tile as tl.dot takes it: bfloat16 tiles on the GPU (tensor cores), else unchanged
    (the interpreter multiplies bfloat16 tiles wrongly; the values are bf16-exact either way)."""
    if PREC == 2 and NATIVE_BF16:
        t = t.to(tl.bfloat16)
    return t


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with float32 (or float64) accumulation, in the precision mode's tensor-core path."""
    if PREC == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif PREC == 2:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(
    x_ptr,  # (B, D)
    mu_ptr,  # (B, D), read if HAS_G
    g_ptr,  # (B, D), read if HAS_G
    xn_ptr,  # (B,) out: ||round(x_i)||^2
    mg_ptr,  # (B,) out: mu_i . g_i, if HAS_G
    B,
    D,
    PREC: tl.constexpr,
    HAS_G: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    xn = tl.zeros((BLOCK_B,), dtype=x_ptr.dtype.element_ty)
    mg = tl.zeros((BLOCK_B,), dtype=x_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        offs = rows64[:, None] * D + dd[None, :]
        xt = _round(tl.load(x_ptr + offs, mask=mask, other=0.0), PREC)
        xn += tl.sum(xt * xt, axis=1)
        if HAS_G:
            mt = tl.load(mu_ptr + offs, mask=mask, other=0.0)
            gt = tl.load(g_ptr + offs, mask=mask, other=0.0)
            mg += tl.sum(mt * gt, axis=1)
    tl.store(xn_ptr + rows, xn, mask=rmask)
    if HAS_G:
        tl.store(mg_ptr + rows, mg, mask=rmask)


@triton.jit
def _fwd_logits_kernel(
    x_ptr,  # (B, D)
    r_ptr,  # (n, D)
    rn_ptr,  # (n,) ||r_j||^2, read if USE_RN
    sigma_ptr,  # (B,)
    z_ptr,  # (B, WS) out: logits of the chunk
    part_ptr,  # (4, B, NBLK) out: per column block m, l, l2, t
    B,
    D,
    n0,  # first reference of the chunk
    c,  # references in the chunk
    WS,
    NBLK,
    PREC: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    USE_RN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    cmask = cols < c
    rows64 = rows.to(tl.int64)
    refs64 = n0 + cols.to(tl.int64)
    dt = x_ptr.dtype.element_ty
    s = tl.zeros((BLOCK_B, BLOCK_N), dtype=dt)
    rn = tl.zeros((BLOCK_N,), dtype=dt)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + rows64[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        rt = tl.load(r_ptr + refs64[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        xt = _round(xt, PREC)
        rt = _round(rt, PREC)
        if not USE_RN:
            rn += tl.sum(rt * rt, axis=1)
        s = _mm(_operand(xt, PREC, NATIVE_BF16), tl.trans(_operand(rt, PREC, NATIVE_BF16)), s, PREC)
    if USE_RN:
        rn = tl.load(rn_ptr + refs64, mask=cmask, other=0.0)
    sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
    inv_s2 = 1.0 / (sig * sig)
    # z_ij = (x_i . r_j - ||r_j||^2 / 2) / sigma_i^2: the logit without its row constant.
    z = (s - 0.5 * rn[None, :]) * inv_s2[:, None]
    z = tl.where(cmask[None, :], z, -float("inf"))
    tl.store(z_ptr + rows64[:, None] * WS + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])
    # This tile's partial state; every tile has at least one valid column, so m is finite.
    m = tl.max(z, axis=1)
    zc = tl.where(cmask[None, :], z - m[:, None], 0.0)
    e = tl.where(cmask[None, :], tl.exp(zc), 0.0)
    l = tl.sum(e, axis=1)
    l2 = tl.sum(e * e, axis=1)
    t = tl.sum(e * zc, axis=1)
    poffs = rows64 * NBLK + pid_n
    plane = B * NBLK
    tl.store(part_ptr + poffs, m, mask=rmask)
    tl.store(part_ptr + plane + poffs, l, mask=rmask)
    tl.store(part_ptr + 2 * plane + poffs, l2, mask=rmask)
    tl.store(part_ptr + 3 * plane + poffs, t, mask=rmask)


@triton.jit
def _fwd_merge_kernel(
    part_ptr,  # (4, B, NBLK) the chunk's partial states
    state_ptr,  # (4, B) in/out: running m, l, l2, t
    alpha_ptr,  # (B,) out: the factor that rescales the accumulator to the new m
    xn_ptr,  # (B,)
    sigma_ptr,  # (B,)
    lse_ptr,  # (B,) out if IS_LAST
    aux_ptr,  # (B, 4) out if IS_LAST: zlse, d_bar, n_eff, w_max
    B,
    NB,  # column blocks in this chunk
    NBLK,
    IS_FIRST: tl.constexpr,
    IS_LAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dt = state_ptr.dtype.element_ty
    if IS_FIRST:
        m_run = tl.full((BLOCK_B,), -float("inf"), dtype=dt)
        l_run = tl.zeros((BLOCK_B,), dtype=dt)
        l2_run = tl.zeros((BLOCK_B,), dtype=dt)
        t_run = tl.zeros((BLOCK_B,), dtype=dt)
    else:
        m_run = tl.load(state_ptr + rows, mask=rmask, other=0.0)
        l_run = tl.load(state_ptr + B + rows, mask=rmask, other=1.0)
        l2_run = tl.load(state_ptr + 2 * B + rows, mask=rmask, other=1.0)
        t_run = tl.load(state_ptr + 3 * B + rows, mask=rmask, other=0.0)
    plane = B * NBLK
    m_chunk = tl.full((BLOCK_B,), -float("inf"), dtype=dt)
    for k0 in range(0, NB, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (ks < NB)[None, :]
        mb = tl.load(part_ptr + rows64[:, None] * NBLK + ks[None, :], mask=mask, other=-float("inf"))
        m_chunk = tl.maximum(m_chunk, tl.max(mb, axis=1))
    m_chunk = tl.where(rmask, m_chunk, 0.0)  # padding rows stay finite
    m_new = tl.maximum(m_run, m_chunk)
    # The running state rebased to m_new (math.md, the merge); an empty state has l = 0.
    empty = l_run == 0.0
    m_old = tl.where(empty, m_new, m_run)  # keeps -inf out of the arithmetic (both where branches run)
    alpha = tl.where(empty, 0.0, tl.exp(m_old - m_new))
    l = l_run * alpha
    l2 = l2_run * alpha * alpha
    t = alpha * (t_run + (m_old - m_new) * l_run)
    for k0 in range(0, NB, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = rmask[:, None] & (ks < NB)[None, :]
        offs = rows64[:, None] * NBLK + ks[None, :]
        mb = tl.load(part_ptr + offs, mask=kmask, other=-float("inf"))
        lb = tl.load(part_ptr + plane + offs, mask=kmask, other=0.0)
        l2b = tl.load(part_ptr + 2 * plane + offs, mask=kmask, other=0.0)
        tb = tl.load(part_ptr + 3 * plane + offs, mask=kmask, other=0.0)
        mb = tl.where(kmask, mb, m_new[:, None])
        beta = tl.where(kmask, tl.exp(mb - m_new[:, None]), 0.0)
        l += tl.sum(lb * beta, axis=1)
        l2 += tl.sum(l2b * beta * beta, axis=1)
        t += tl.sum(beta * (tb + (mb - m_new[:, None]) * lb), axis=1)
    tl.store(state_ptr + rows, m_new, mask=rmask)
    tl.store(state_ptr + B + rows, l, mask=rmask)
    tl.store(state_ptr + 2 * B + rows, l2, mask=rmask)
    tl.store(state_ptr + 3 * B + rows, t, mask=rmask)
    tl.store(alpha_ptr + rows, alpha, mask=rmask)
    if IS_LAST:
        l = tl.where(rmask, l, 1.0)
        l2 = tl.where(rmask, l2, 1.0)
        xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
        sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
        s2 = sig * sig
        inv_l = 1.0 / l
        zlse = m_new + tl.log(l)
        # sum_j w_ij z_ij = m + t / l, and d_ij = ||x_i||^2 - 2 sigma_i^2 z_ij (clamped: d >= 0).
        dbar = tl.maximum(xn - 2.0 * s2 * (m_new + t * inv_l), 0.0)
        tl.store(lse_ptr + rows, zlse - 0.5 * xn / s2, mask=rmask)
        tl.store(aux_ptr + rows64 * 4, zlse, mask=rmask)
        tl.store(aux_ptr + rows64 * 4 + 1, dbar, mask=rmask)
        tl.store(aux_ptr + rows64 * 4 + 2, l * l / l2, mask=rmask)
        tl.store(aux_ptr + rows64 * 4 + 3, inv_l, mask=rmask)


@triton.jit
def _fwd_acc_kernel(
    z_ptr,  # (B, WS) the chunk's logits
    r_ptr,  # (n, D)
    state_ptr,  # (4, B) the merged state (m, l, ...)
    alpha_ptr,  # (B,)
    acc_ptr,  # (B, D) in/out: sum_j exp(z_ij - m_i) r_j; mu = acc / l after the last chunk
    B,
    D,
    n0,
    c,
    WS,
    IS_FIRST: tl.constexpr,
    IS_LAST: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dd < D
    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & dmask[None, :]
    aoffs = rows64[:, None] * D + dd[None, :]
    m = tl.load(state_ptr + rows, mask=rmask, other=0.0)
    if IS_FIRST:
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=acc_ptr.dtype.element_ty)
    else:
        alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0.0)
        acc = tl.load(acc_ptr + aoffs, mask=omask, other=0.0) * alpha[:, None]
    for j0 in range(0, c, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < c
        z = tl.load(z_ptr + rows64[:, None] * WS + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=-float("inf"))
        zm = tl.where(rmask[:, None] & cmask[None, :], z - m[:, None], -float("inf"))
        p = _round(tl.exp(zm), PREC)
        rt = tl.load(r_ptr + (n0 + cols.to(tl.int64))[:, None] * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        rt = _round(rt, PREC)
        acc = _mm(_operand(p, PREC, NATIVE_BF16), _operand(rt, PREC, NATIVE_BF16), acc, PREC)
    if IS_LAST:
        l = tl.load(state_ptr + B + rows, mask=rmask, other=1.0)
        acc = acc * (1.0 / l)[:, None]
    tl.store(acc_ptr + aoffs, acc, mask=omask)


@triton.jit
def _bwd_logits_kernel(
    x_ptr,  # (B, D)
    g_ptr,  # (B, D) grad of mu
    r_ptr,  # (n, D)
    rn_ptr,  # (n,), read if USE_RN
    sigma_ptr,  # (B,)
    xn_ptr,  # (B,)
    mg_ptr,  # (B,) mu_i . g_i
    aux_ptr,  # (B, 4) the forward's zlse, d_bar, ...
    glse_ptr,  # (B,) grad of lse
    p_ptr,  # (B, WS) out: w_ij (c_ij - mg_i)
    w_ptr,  # (B, WS) out if REF_GRAD: w_ij
    a_ptr,  # (B, WS) out if REF_GRAD: a_ij = w_ij (c_ij - mg_i + g_lse,i) / sigma_i^2
    cov_ptr,  # (3, B, NCOV) out: per column block sum_j w_ij (z_ij - z_bar_i)(c_ij - mg_i),
    #           s_i = sum_j w_ij (c_ij - mg_i) and sum_j w_ij (z_ij - z_bar_i), one plane each
    B,
    D,
    n0,
    c,
    WS,
    NCOV,
    cov_col0,
    PREC: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    USE_RN: tl.constexpr,
    REF_GRAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    cmask = cols < c
    rows64 = rows.to(tl.int64)
    refs64 = n0 + cols.to(tl.int64)
    dt = x_ptr.dtype.element_ty
    s = tl.zeros((BLOCK_B, BLOCK_N), dtype=dt)
    cc = tl.zeros((BLOCK_B, BLOCK_N), dtype=dt)
    rn = tl.zeros((BLOCK_N,), dtype=dt)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        qmask = rmask[:, None] & dmask[None, :]
        xt = _round(tl.load(x_ptr + rows64[:, None] * D + dd[None, :], mask=qmask, other=0.0), PREC)
        gt = _round(tl.load(g_ptr + rows64[:, None] * D + dd[None, :], mask=qmask, other=0.0), PREC)
        rt = tl.load(r_ptr + refs64[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        rt = _round(rt, PREC)
        if not USE_RN:
            rn += tl.sum(rt * rt, axis=1)
        rT = tl.trans(_operand(rt, PREC, NATIVE_BF16))
        s = _mm(_operand(xt, PREC, NATIVE_BF16), rT, s, PREC)
        cc = _mm(_operand(gt, PREC, NATIVE_BF16), rT, cc, PREC)
    if USE_RN:
        rn = tl.load(rn_ptr + refs64, mask=cmask, other=0.0)
    sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
    s2 = sig * sig
    inv_s2 = 1.0 / s2
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    mg = tl.load(mg_ptr + rows, mask=rmask, other=0.0)
    zlse = tl.load(aux_ptr + rows64 * 4, mask=rmask, other=0.0)
    dbar = tl.load(aux_ptr + rows64 * 4 + 1, mask=rmask, other=0.0)
    # The mean logit z_bar (stf_math.h, mean_logit): d - d_bar = -2 sigma^2 (z - z_bar), and the z form
    # avoids rounding d = ||x||^2 - 2 sigma^2 z at the scale of ||x||^2. z_bar's own rounding cancels
    # with the s correction below.
    zbar = (xn - dbar) / (2.0 * s2)
    z = (s - 0.5 * rn[None, :]) * inv_s2[:, None]
    valid = rmask[:, None] & cmask[None, :]
    # Normalised weights from the forward's log-normaliser: no running rescale is needed here.
    w = tl.where(valid, tl.exp(tl.where(valid, z - zlse[:, None], 0.0)), 0.0)
    cm = cc - mg[:, None]
    wc = w * cm
    woffs = rows64[:, None] * WS + cols[None, :]
    tl.store(p_ptr + woffs, wc, mask=valid)
    wd = tl.where(valid, w * (z - zbar[:, None]), 0.0)
    # The row sums of the first-order corrections (stf_math.h, grad_x_corrected / cov_corrected):
    # mg comes from unrounded mu and g, c from the (tensor-core-rounded) product, so s = sum_j w (c - mg),
    # zero in exact arithmetic, carries their rounding mismatch, which is divided by sigma^2.
    cov = tl.sum(wd * cm, axis=1)
    ssum = tl.sum(tl.where(valid, wc, 0.0), axis=1)
    dev = tl.sum(wd, axis=1)
    col = cov_col0 + pid_n
    tl.store(cov_ptr + rows64 * NCOV + col, cov, mask=rmask)
    tl.store(cov_ptr + (B + rows64) * NCOV + col, ssum, mask=rmask)
    tl.store(cov_ptr + (2 * B + rows64) * NCOV + col, dev, mask=rmask)
    if REF_GRAD:
        glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
        tl.store(w_ptr + woffs, w, mask=valid)
        tl.store(a_ptr + woffs, w * (cm + glse[:, None]) * inv_s2[:, None], mask=valid)


@triton.jit
def _bwd_acc_kernel(
    p_ptr,  # (B, WS) w_ij (c_ij - mg_i) of the chunk
    r_ptr,  # (n, D)
    x_ptr,  # (B, D)
    mu_ptr,  # (B, D)
    sigma_ptr,  # (B,)
    glse_ptr,  # (2, B), read if IS_LAST: g_lse, then s = sum_j w_ij (c_ij - mg_i) over all chunks
    gx_ptr,  # (B, D) in/out: sum_j p_ij r_j, then dL/dx after the last chunk
    B,
    D,
    n0,
    c,
    WS,
    IS_FIRST: tl.constexpr,
    IS_LAST: tl.constexpr,
    PREC: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dd < D
    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & dmask[None, :]
    aoffs = rows64[:, None] * D + dd[None, :]
    if IS_FIRST:
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=gx_ptr.dtype.element_ty)
    else:
        acc = tl.load(gx_ptr + aoffs, mask=omask, other=0.0)
    for j0 in range(0, c, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < c
        p = tl.load(p_ptr + rows64[:, None] * WS + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        rt = tl.load(r_ptr + (n0 + cols.to(tl.int64))[:, None] * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        p = _round(p, PREC)
        rt = _round(rt, PREC)
        acc = _mm(_operand(p, PREC, NATIVE_BF16), _operand(rt, PREC, NATIVE_BF16), acc, PREC)
    if IS_LAST:
        # dL/dx_i = (sum_j w_ij (c_ij - mg_i - s_i) r_j + g_lse,i (mu_i - x_i)) / sigma_i^2, with
        # sum_j w_ij (c_ij - mg_i - s_i) r_j = acc - s_i mu_i (stf_math.h, grad_x_corrected).
        sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0)
        glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
        s_row = tl.load(glse_ptr + B + rows, mask=rmask, other=0.0)
        xt = tl.load(x_ptr + aoffs, mask=omask, other=0.0)
        mt = tl.load(mu_ptr + aoffs, mask=omask, other=0.0)
        acc = (acc - s_row[:, None] * mt + glse[:, None] * (mt - xt)) * (1.0 / (sig * sig))[:, None]
    tl.store(gx_ptr + aoffs, acc, mask=omask)


@triton.jit
def _bwd_ref_kernel(
    w_ptr,  # (B, WS)
    a_ptr,  # (B, WS)
    g_ptr,  # (B, D)
    x_ptr,  # (B, D)
    r_ptr,  # (n, D)
    gr_ptr,  # (n, D) out: dL/dr_j for the chunk's references
    B,
    D,
    n0,
    c,
    WS,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < c
    dmask = dd < D
    refs64 = n0 + cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=gr_ptr.dtype.element_ty)
    asum = tl.zeros((BLOCK_N,), dtype=gr_ptr.dtype.element_ty)
    for i0 in range(0, B, BLOCK_B):
        rows = i0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        wmask = rmask[:, None] & cmask[None, :]
        qmask = rmask[:, None] & dmask[None, :]
        w = tl.load(w_ptr + rows64[:, None] * WS + cols[None, :], mask=wmask, other=0.0)
        a = tl.load(a_ptr + rows64[:, None] * WS + cols[None, :], mask=wmask, other=0.0)
        gt = tl.load(g_ptr + rows64[:, None] * D + dd[None, :], mask=qmask, other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * D + dd[None, :], mask=qmask, other=0.0)
        # Exact products: sum_i a_ij (x_i - r_j) cancels when x_i ~ r_j at small sigma.
        acc = tl.dot(tl.trans(w), gt, acc, input_precision="ieee")
        acc = tl.dot(tl.trans(a), xt, acc, input_precision="ieee")
        asum += tl.sum(a, axis=0)
    omask = cmask[:, None] & dmask[None, :]
    offs = refs64[:, None] * D + dd[None, :]
    rt = tl.load(r_ptr + offs, mask=omask, other=0.0)
    # dL/dr_j = sum_i w_ij g_i + a_ij (x_i - r_j)
    tl.store(gr_ptr + offs, acc - asum[:, None] * rt, mask=omask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


# Warps per program on a GPU; compile_check.py compiles every kernel with it and checks for spills.
NUM_WARPS = 8
# Two stages: the operands pass through registers (rounding) before the products, so every extra
# stage of software pipelining costs registers; three spilled on sm_80.
NUM_STAGES = 2
_LAUNCH = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


def block_sizes(device_type: str, float64: bool = False, precision: str = "ieee") -> dict[str, int]:
    """Tile sizes. On a GPU: (block_b x block_n) logit tiles over block_d slices; (block_b x
    block_d_acc) accumulator tiles over block_n_acc references; for the ref gradient
    (block_n_ref x block_d_acc) tiles over block_b_ref rows. The largest that compile without
    register spills on sm_80 and sm_90 (compile_check.py): "ieee" float32 has no tensor-core path
    and its FMA products need a short reduction (block_n_acc = 16); float64 halves the tiles.
    Under the interpreter: small, so the D loop, the chunk loop and the masked edges all run on
    test-sized problems."""
    if device_type == "cuda" and not _INTERPRET:
        if float64:
            return {"block_b": 32, "block_n": 32, "block_d": 16, "block_n_acc": 16, "block_d_acc": 32,
                    "block_b_ref": 16, "block_n_ref": 32}
        return {"block_b": 64, "block_n": 32, "block_d": 32, "block_n_acc": 16 if precision == "ieee" else 64,
                "block_d_acc": 64, "block_b_ref": 16, "block_n_ref": 64}
    return {"block_b": 16, "block_n": 16, "block_d": 32, "block_n_acc": 16, "block_d_acc": 32,
            "block_b_ref": 16, "block_n_ref": 16}


def _check_inputs(fn: str, x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, chunk_size, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be one of {PRECISIONS}, got {precision!r}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: x must be float32 or float64, got {x.dtype}")
    if x.dtype == torch.float64 and precision != "ieee":
        raise ValueError(
            f"{fn}: precision {precision!r} rounds float32 operands; float64 inputs take only 'ieee'"
        )
    for name, t in (("sigma", sigma), ("ref", ref), ("ref_sqnorm", ref_sqnorm)):
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but x has {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if x.dim() != 2 or ref.dim() != 2 or ref.shape[1] != x.shape[1]:
        raise ValueError(
            f"{fn}: x must be (B, D) and ref (n, D) with the same D; got x {tuple(x.shape)}, ref {tuple(ref.shape)}"
        )
    B, D = x.shape
    n = ref.shape[0]
    if tuple(sigma.shape) != (B,):
        raise ValueError(f"{fn}: sigma must have shape (B,) = ({B},), got {tuple(sigma.shape)}")
    if tuple(ref_sqnorm.shape) != (n,):
        raise ValueError(f"{fn}: ref_sqnorm must have shape (n,) = ({n},), got {tuple(ref_sqnorm.shape)}")
    if n < 1 or D < 1:
        raise ValueError(f"{fn}: needs n >= 1 references and D >= 1 features, got n = {n}, D = {D}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    for name, t in (("x", x), ("sigma", sigma), ("ref", ref), ("ref_sqnorm", ref_sqnorm)):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")


def _plan(fn: str, x: Tensor, n: int, chunk_size: int, precision: str, blocks: dict | None):
    """Block sizes and the chunk width; refuses grids CUDA cannot launch (all offsets are int64)."""
    D = x.shape[1]
    bs = block_sizes(x.device.type, x.dtype == torch.float64, precision)
    if x.is_cuda and not _INTERPRET:
        bs["block_b"], bs["block_d_acc"] = _fill_tiles(x.shape[0], D, bs["block_b"], bs["block_d_acc"], x.device)
    if blocks:
        unknown = set(blocks) - set(bs)
        if unknown:
            raise ValueError(f"{fn}: blocks has unknown keys {sorted(unknown)}; known: {sorted(bs)}")
        bs.update(blocks)
        for k, v in bs.items():
            # tl.dot needs every tile dimension >= 16; tl.arange needs powers of two.
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{fn}: blocks[{k!r}] must be a power of two >= 16, got {v!r}")
    # Axis 1 of the logits grid counts the chunk's column blocks: cap the chunk, not the problem.
    chunk = max(1, min(chunk_size, n, _MAX_GRID_YZ * bs["block_n"]))
    # The (4, B, chunk / block_n) partial-state buffer is addressed with 32-bit plane offsets.
    planes = 4 * x.shape[0] * triton.cdiv(chunk, bs["block_n"])
    if planes >= 2**31:
        raise ValueError(
            f"{fn}: B = {x.shape[0]} rows x chunk = {chunk} references need {planes} partial states, more than "
            f"2^31 - 1; pass a smaller chunk_size"
        )
    if triton.cdiv(D, bs["block_d_acc"]) > _MAX_GRID_YZ:
        raise ValueError(
            f"{fn}: D = {D} needs {triton.cdiv(D, bs['block_d_acc'])} column tiles of {bs['block_d_acc']}, "
            f"more than the {_MAX_GRID_YZ} a CUDA grid dimension allows"
        )
    return bs, chunk


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fill_tiles(B: int, D: int, block_b: int, block_d: int, device: torch.device) -> tuple[int, int]:
    """Row block and accumulator column block for the accumulation grid, cdiv(B, block_b) x
    cdiv(D, block_d) programs: halve the row block (down to 16), then the column block (down to
    16), until the grid fills every SM twice. At B = 64, D = 3072 64 x 64 tiles give 48 programs
    for 132 SMs, 16 x 32 tiles 384; at B = 16 the columns go to 16 wide (192 programs). Programs
    sharing an R tile differ only in program_id(0) and run together, so R is re-read from L2."""
    target = 2 * _sm_count(device)
    while block_b > 16 and triton.cdiv(B, block_b) * triton.cdiv(D, block_d) < target:
        block_b //= 2
    while block_d > 16 and triton.cdiv(B, block_b) * triton.cdiv(D, block_d) < target:
        block_d //= 2
    return block_b, block_d


def _native_bf16(x: Tensor) -> bool:
    return x.device.type == "cuda" and not _INTERPRET


def _on_tensors_device(launcher):
    """Runs a launcher with the current CUDA device set to its tensors' device: Triton launches on
    the current device, which need not be the one a tensor lives on (multi-GPU, DDP)."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, Tensor)), None)
        if t is not None and t.is_cuda:
            with torch.cuda.device(t.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return wrapper


@_on_tensors_device
def stf_forward(
    x: Tensor,
    sigma: Tensor,
    ref: Tensor,
    ref_sqnorm: Tensor,
    chunk_size: int,
    precision: str = "ieee",
    *,
    blocks: dict | None = None,
):
    """Triton forward: (mu, lse, aux) like `stf_reference.stf_forward`.

    x (B, D), sigma (B,), ref (n, D), ref_sqnorm (n,): contiguous, one dtype (float32 or float64),
    one device. mu (B, D), lse (B,), aux (B, 4) = [zlse, d_bar, n_eff, w_max] in that dtype, with
        z_ij = (x_i . r_j - ||r_j||^2 / 2) / sigma_i^2,  w_ij = softmax_j(z_ij),  mu_i = sum_j w_ij r_j,
        zlse_i = log sum_j exp(z_ij),  lse_i = zlse_i - ||x_i||^2 / (2 sigma_i^2).
    Memory beyond the outputs: a (B, chunk) logit workspace and O(B chunk / BLOCK_N) partial states.
    In "tf32"/"bf16" ref_sqnorm is not read: the norms come from the rounded references.
    blocks overrides entries of `block_sizes`.
    """
    _check_inputs("stf_forward (triton)", x, sigma, ref, ref_sqnorm, chunk_size, precision)
    B, D = x.shape
    n = ref.shape[0]
    bs, chunk = _plan("stf_forward (triton)", x, n, chunk_size, precision, blocks)
    BB, BN, BD, BNA, BDA = bs["block_b"], bs["block_n"], bs["block_d"], bs["block_n_acc"], bs["block_d_acc"]
    prec = _PREC_CODE[precision]
    native = _native_bf16(x)
    nblk = triton.cdiv(chunk, BN)
    z_ws = x.new_empty(B, chunk)
    part = x.new_empty(4, B, nblk)
    state = x.new_empty(4, B)
    alpha = x.new_empty(B)
    xn = x.new_empty(B)
    mu = x.new_empty(B, D)
    lse = x.new_empty(B)
    aux = x.new_empty(B, 4)
    if B == 0:
        return mu, lse, aux
    grid_b = triton.cdiv(B, BB)
    _row_stats_kernel[(grid_b,)](x, x, x, xn, xn, B, D, PREC=prec, HAS_G=False, BLOCK_B=BB, BLOCK_D=BDA, **_LAUNCH)
    starts = list(range(0, n, chunk))
    for k, n0 in enumerate(starts):
        c = min(chunk, n - n0)
        nb = triton.cdiv(c, BN)
        first, last = k == 0, k == len(starts) - 1
        _fwd_logits_kernel[(grid_b, nb)](
            x, ref, ref_sqnorm, sigma, z_ws, part, B, D, n0, c, chunk, nblk,
            PREC=prec, NATIVE_BF16=native, USE_RN=prec == 0, BLOCK_B=BB, BLOCK_N=BN, BLOCK_D=BD,
            **_LAUNCH,
        )
        _fwd_merge_kernel[(grid_b,)](
            part, state, alpha, xn, sigma, lse, aux, B, nb, nblk,
            IS_FIRST=first, IS_LAST=last, BLOCK_B=BB, BLOCK_K=32, **_LAUNCH,
        )
        _fwd_acc_kernel[(grid_b, triton.cdiv(D, BDA))](
            z_ws, ref, state, alpha, mu, B, D, n0, c, chunk,
            IS_FIRST=first, IS_LAST=last, PREC=prec, NATIVE_BF16=native, BLOCK_B=BB, BLOCK_N=BNA, BLOCK_D=BDA,
            **_LAUNCH,
        )
    return mu, lse, aux


@_on_tensors_device
def stf_backward(
    grad_mu: Tensor,
    grad_lse: Tensor,
    x: Tensor,
    sigma: Tensor,
    ref: Tensor,
    ref_sqnorm: Tensor,
    mu: Tensor,
    aux: Tensor,
    chunk_size: int,
    precision: str = "ieee",
    ref_grad: bool = False,
    *,
    blocks: dict | None = None,
):
    """Triton backward: (grad_x (B, D), grad_sigma (B,), grad_ref (n, D) or (0,)), the centred forms
    of `stf_reference.stf_backward` with w_ij = exp(z_ij - zlse_i) from the forward's aux:
        dL/dx_i     = (sum_j w_ij (c_ij - mg_i) r_j + g_lse,i (mu_i - x_i)) / sigma_i^2
        dL/dsigma_i = (sum_j w_ij (d_ij - d_bar_i)(c_ij - mg_i) + g_lse,i d_bar_i) / sigma_i^3
        dL/dr_j     = sum_i w_ij g_i + a_ij (x_i - r_j),  a_ij = w_ij (c_ij - mg_i + g_lse,i) / sigma_i^2
    with c_ij = r_j . g_i, mg_i = mu_i . g_i. mg comes from unrounded mu and g, c from the mode's
    (rounded) product, so both forms get the first-order correction of stf_math.h with the streamed
    s_i = sum_j w_ij (c_ij - mg_i) (0 in exact arithmetic): dL/dx_i - s_i mu_i / sigma_i^2 and
    dL/dsigma_i - s_i sum_j w_ij (d_ij - d_bar_i) / sigma_i^3 (streamed in the logit form,
    d - d_bar = -2 sigma^2 (z - z_bar), as stf_math.h); with ref_grad a first sweep of the
    logit products measures s and moves mg by it. The ref gradient's products are always exact
    float32 (or float64), whatever the precision mode, because sum_i a_ij (x_i - r_j) cancels.
    Memory beyond the outputs: one (B, chunk) workspace, three with ref_grad, and (3, B, n / BLOCK_N)
    partial sums.
    """
    fn = "stf_backward (triton)"
    _check_inputs(fn, x, sigma, ref, ref_sqnorm, chunk_size, precision)
    B, D = x.shape
    n = ref.shape[0]
    for name, t, shape in (("grad_mu", grad_mu, (B, D)), ("mu", mu, (B, D)), ("grad_lse", grad_lse, (B,)),
                           ("aux", aux, (B, 4))):
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device or not t.is_contiguous():
            raise ValueError(
                f"{fn}: {name} must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}; "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    bs, chunk = _plan(fn, x, n, chunk_size, precision, blocks)
    BB, BN, BD, BNA, BDA = bs["block_b"], bs["block_n"], bs["block_d"], bs["block_n_acc"], bs["block_d_acc"]
    prec = _PREC_CODE[precision]
    native = _native_bf16(x)
    grad_x = x.new_empty(B, D)
    grad_ref = torch.zeros_like(ref) if ref_grad else ref.new_zeros(0)
    if B == 0:
        return grad_x, x.new_empty(0), grad_ref
    xn = x.new_empty(B)
    mg = x.new_empty(B)
    grid_b = triton.cdiv(B, BB)
    _row_stats_kernel[(grid_b,)](
        x, mu, grad_mu, xn, mg, B, D, PREC=prec, HAS_G=True, BLOCK_B=BB, BLOCK_D=BDA, **_LAUNCH
    )
    p_ws = x.new_empty(B, chunk)
    w_ws = x.new_empty(B, chunk) if ref_grad else p_ws
    a_ws = x.new_empty(B, chunk) if ref_grad else p_ws
    starts = list(range(0, n, chunk))
    ncov = sum(triton.cdiv(min(chunk, n - n0), BN) for n0 in starts)
    # Per (row, column block): cov = sum_j w (z - z_bar)(c - mg), s = sum_j w (c - mg), dev = sum_j w (z - z_bar).
    cov = x.new_empty(3, B, ncov)

    def sweep(mg, final):
        col0 = 0
        for k, n0 in enumerate(starts):
            c = min(chunk, n - n0)
            nb = triton.cdiv(c, BN)
            last = k == len(starts) - 1
            _bwd_logits_kernel[(grid_b, nb)](
                x, grad_mu, ref, ref_sqnorm, sigma, xn, mg, aux, grad_lse, p_ws, w_ws, a_ws, cov,
                B, D, n0, c, chunk, ncov, col0,
                PREC=prec, NATIVE_BF16=native, USE_RN=prec == 0, REF_GRAD=ref_grad and final,
                BLOCK_B=BB, BLOCK_N=BN, BLOCK_D=BD, **_LAUNCH,
            )
            col0 += nb
            if not final:
                continue
            # The small (3, B, n / BLOCK_N) partial sums, merged deterministically; the last
            # accumulation reads (g_lse, s) per row for its corrected finish.
            glse = torch.stack((grad_lse, cov[1].sum(1))) if last else grad_lse
            _bwd_acc_kernel[(grid_b, triton.cdiv(D, BDA))](
                p_ws, ref, x, mu, sigma, glse, grad_x, B, D, n0, c, chunk,
                IS_FIRST=k == 0, IS_LAST=last, PREC=prec, NATIVE_BF16=native,
                BLOCK_B=BB, BLOCK_N=BNA, BLOCK_D=BDA, **_LAUNCH,
            )
            if ref_grad:
                _bwd_ref_kernel[(triton.cdiv(c, bs["block_n_ref"]), triton.cdiv(D, BDA))](
                    w_ws, a_ws, grad_mu, x, ref, grad_ref, B, D, n0, c, chunk,
                    BLOCK_B=bs["block_b_ref"], BLOCK_N=bs["block_n_ref"], BLOCK_D=BDA, **_LAUNCH,
                )

    if ref_grad:
        # a_ij = w (c - mg + g_lse) / sigma^2 cannot be corrected after the fact like dL/dx: a first
        # sweep (the logit products only) measures s and moves mg by it, as stf_reference and the
        # CPU backend do, at the price of one more pair of products, paid only when ref needs grad.
        sweep(mg, False)
        mg = mg + cov[1].sum(1)
    sweep(mg, True)
    dbar = aux[:, stf_reference.AUX_DBAR]
    cov_z, s_sum, dev_z = cov.sum(2).unbind(0)
    # dL/dsigma (stf_math.h, grad_sigma) from the z form with cov_corrected:
    # sum_j w (d - d_bar)(c - mg - s) = -2 sigma^2 (cov_z - s dev_z).
    s2 = sigma * sigma
    grad_sigma = (grad_lse * dbar - 2.0 * s2 * (cov_z - s_sum * dev_z)) / (s2 * sigma)
    return grad_x, grad_sigma, grad_ref

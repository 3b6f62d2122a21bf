"""Triton kernels of the stable target: backend "triton" of op family stf_target, the arithmetic of
`stf_reference` with cuBLAS products through torch and the work between them fused in Triton
(docs/gpu_design.md, "The Triton kernels").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import contract, stf_reference
from ..matmul_mode import products
from ..contract import AUX_COLS
from ..registry import PRECISIONS

__all__ = ["stf_backward", "stf_forward"]

_IEEE, _TF32X3, _TF32, _BF16 = (PRECISIONS.index(p) for p in ("ieee", "tf32x3", "tf32", "bf16"))
# The kernels read and write aux's columns at these offsets (contract.py's order).
assert (contract.AUX_M, contract.AUX_LOGL, contract.AUX_DBAR, contract.AUX_NEFF, contract.AUX_WMAX,
        contract.AUX_DMIN) == (0, 1, 2, 3, 4, 5)


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _round(v, PREC: tl.constexpr):
    """v (float32) as the mode's matrix units read it: TF32 (round half away, cvt.rna) or bfloat16
    (round to nearest even), by integer operations on the bits; NaN and inf unchanged."""
    if PREC == 1 or PREC == 2:
        bits = v.to(tl.uint32, bitcast=True)
        v = tl.where(v - v == 0.0, ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True), v)
    elif PREC == 3:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = tl.where(v - v == 0.0, (bits & 0xFFFF0000).to(tl.float32, bitcast=True), v)
    return v


@triton.jit
def _store_operand(ptr, lo_ptr, offs, v, mask, PREC: tl.constexpr):
    """Stores v rounded to the mode at ptr + offs; "tf32x3" stores hi there and lo at lo_ptr + offs."""
    if PREC == 1:
        hi = _round(v, PREC)
        tl.store(ptr + offs, hi, mask=mask)
        tl.store(lo_ptr + offs, _round(v - hi, PREC), mask=mask)
    else:
        tl.store(ptr + offs, _round(v, PREC), mask=mask)


@triton.jit
def _wexp(v):
    """exp(v) for v <= 0 with everything below float32's smallest normal flushed to 0 (stf_math.h)."""
    return tl.where(v < -87.0, 0.0, tl.exp(v))


@triton.jit
def _reduced_dist(S_ptr, rn_ptr, xn, offs, cols, mask, c):
    """delta_ij = ||r'_j||^2 - 2 S_ij for a tile of S = x' r'^T, clamped at -||x'_i||^2 (stf_math.h,
    reduced_dist), in the products' dtype."""
    dot = tl.load(S_ptr + offs, mask=mask, other=0.0)
    rn = tl.load(rn_ptr + cols, mask=cols < c, other=0.0)
    d = rn[None, :] - 2.0 * dot
    return tl.where(d < -xn[:, None], -xn[:, None], d)


@triton.jit
def _nan_to(x, has_nan):
    """x, or NaN where has_nan: reductions may drop NaN; the kernels put it back."""
    return tl.where(has_nan, float("nan"), x)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _shift_rows_kernel(
    src_ptr,  # (rows, D)
    centre_ptr,  # (D,), read if HAS_CENTRE
    op_ptr,  # (rows, W) out: the mode's operand rows
    norm_ptr,  # (rows,) out: the squared norms the mode's distances use, if WITH_NORMS
    rows,
    D,
    W,
    PREC: tl.constexpr,
    REF_LAYOUT: tl.constexpr,
    HAS_CENTRE: tl.constexpr,
    WITH_NORMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r64 = r.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        v = tl.load(src_ptr + r64[:, None] * D + dd[None, :], mask=mask, other=0.0)
        if HAS_CENTRE:
            v = v - tl.load(centre_ptr + dd, mask=dd < D, other=0.0)[None, :]
        offs = r64[:, None] * W + dd[None, :]
        if PREC == 1:
            hi = _round(v, PREC)
            lo = _round(v - hi, PREC)
            tl.store(op_ptr + offs, hi, mask=mask)
            if REF_LAYOUT:  # [hi | lo | hi]
                tl.store(op_ptr + offs + D, lo, mask=mask)
                tl.store(op_ptr + offs + 2 * D, hi, mask=mask)
            else:  # [hi | hi | lo]
                tl.store(op_ptr + offs + D, hi, mask=mask)
                tl.store(op_ptr + offs + 2 * D, lo, mask=mask)
        else:
            v = _round(v, PREC)
            tl.store(op_ptr + offs, v, mask=mask)
        v64 = v.to(tl.float64)
        acc += tl.sum(v64 * v64, axis=1)
    if WITH_NORMS:
        tl.store(norm_ptr + r, acc.to(norm_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _fwd_update_kernel(
    S_ptr,  # (B, c): products in
    keep_ptr,  # (B, c): the distances out, kept for the backward, if KEEP
    E_ptr,  # (B, c): the mode's weights out (S itself, or bfloat16 for "bf16")
    S_lo_ptr,  # (B, c): weights' lo ("tf32x3")
    xn_ptr,  # (B,)
    rn_ptr,  # (c,)
    k_ptr,  # (B,)
    state_ptr,  # (4, B) float64: m, l, l2, t
    arg_ptr,  # (B,) int64: the reference at each row's minimum
    acc_ptr,  # (B, D): rescaled by the rows' alpha (not for the first chunk), if RESCALE
    alpha_ptr,  # (B,): the rows' alpha out (not for the first chunk), if not RESCALE
    B,
    c,
    D,
    start,  # the chunk's first reference
    IS_FIRST: tl.constexpr,
    RESCALE: tl.constexpr,
    KEEP: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    k = tl.load(k_ptr + rows, mask=rmask, other=0.0)
    # Pass 1: reduced distances delta_ij = ||r'||^2 - 2 x' . r' (clamped at -||x'||^2) and the minima.
    mn = tl.full((BLOCK_B,), float("inf"), dtype=xn.dtype)
    mn_arg = tl.zeros((BLOCK_B,), dtype=tl.int64)
    nan = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for j0 in range(0, c, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < c)[None, :]
        offs = r64[:, None] * c + cols[None, :]
        d = _reduced_dist(S_ptr, rn_ptr, xn, offs, cols, mask, c)
        tl.store(S_ptr + offs, d, mask=mask)
        if KEEP:
            tl.store(keep_ptr + offs, d, mask=mask)
        dv = tl.where(mask & (d == d), d, float("inf"))  # NaN is flagged apart (reductions may drop it)
        bmin = tl.min(dv, axis=1)
        mn_arg = tl.where(bmin < mn, j0 + tl.argmin(dv, axis=1).to(tl.int64), mn_arg)  # first of equal ones
        mn = tl.minimum(mn, bmin)
        nan = tl.maximum(nan, tl.max(tl.where(mask & (d != d), 1, 0), axis=1))
    m_old = tl.load(state_ptr + rows, mask=rmask, other=0.0)
    if IS_FIRST:
        m_old = tl.full((BLOCK_B,), float("inf"), dtype=tl.float64)
    # A new minimum: remember its reference (for d_min, stf_math.h).
    arg_old = tl.load(arg_ptr + rows, mask=rmask & (m_old != float("inf")), other=-1)
    tl.store(arg_ptr + rows, tl.where(mn.to(tl.float64) < m_old, start + mn_arg, arg_old), mask=rmask)
    m_new = _nan_to(tl.minimum(m_old, mn.to(tl.float64)), (nan > 0) | (m_old != m_old))
    m_t = m_new.to(xn.dtype)  # exact: one of the distances (or +inf for padding rows)
    # Pass 2: weights e_ij = exp(-(delta_ij - m_i) k_i) and the sums of e, e^2, e (delta - m).
    l = tl.zeros((BLOCK_B,), dtype=tl.float64)
    l2 = tl.zeros((BLOCK_B,), dtype=tl.float64)
    t = tl.zeros((BLOCK_B,), dtype=tl.float64)
    for j0 in range(0, c, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < c)[None, :]
        offs = r64[:, None] * c + cols[None, :]
        d = tl.load(S_ptr + offs, mask=mask, other=0.0)
        dm = tl.where(mask, d - m_t[:, None], 0.0)  # padding rows have m = +inf
        e = tl.where(mask, _wexp(-dm * k[:, None]), 0.0)
        e64 = e.to(tl.float64)
        l += tl.sum(e64, axis=1)
        l2 += tl.sum(e64 * e64, axis=1)
        t += tl.sum(e64 * dm.to(tl.float64), axis=1)
        _store_operand(E_ptr, S_lo_ptr, offs, e, mask, PREC)
    # The running state rebased to m_new (stf_math.h, state_rebase), plus the chunk's sums.
    k64 = k.to(tl.float64)
    if IS_FIRST:
        l_new, l2_new, t_new = l, l2, t
        alpha = tl.zeros((BLOCK_B,), dtype=tl.float64)
    else:
        l_old = tl.load(state_ptr + B + rows, mask=rmask, other=0.0)
        l2_old = tl.load(state_ptr + 2 * B + rows, mask=rmask, other=0.0)
        t_old = tl.load(state_ptr + 3 * B + rows, mask=rmask, other=0.0)
        empty = m_old == float("inf")  # stf_math.h, state_rebase: nothing to rescale
        gap = tl.where(empty, 0.0, m_old - m_new)
        alpha = tl.where(empty | (-gap * k64 < -708.0), 0.0, tl.exp(-gap * k64))
        l_new = l_old * alpha + l
        l2_new = l2_old * alpha * alpha + l2
        t_new = tl.where(empty, 0.0, alpha * (t_old + gap * l_old)) + t
    tl.store(state_ptr + rows, m_new, mask=rmask)
    tl.store(state_ptr + B + rows, l_new, mask=rmask)
    tl.store(state_ptr + 2 * B + rows, l2_new, mask=rmask)
    tl.store(state_ptr + 3 * B + rows, t_new, mask=rmask)
    if not IS_FIRST and not RESCALE:
        tl.store(alpha_ptr + rows, alpha.to(xn.dtype), mask=rmask)
    if not IS_FIRST and RESCALE:
        a = alpha.to(xn.dtype)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (dd < D)[None, :]
            offs = r64[:, None] * D + dd[None, :]
            tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=mask, other=0.0) * a[:, None], mask=mask)


@triton.jit
def _fwd_finish_kernel(
    state_ptr,  # (4, B) float64
    k_ptr,  # (B,)
    dmin_ptr,  # (B,): ||x_i - r_j*||^2 of the reference at the minimum
    centre_ptr,  # (D,)
    mu_ptr,  # (B, D): the accumulator in, mu = a / l + c out
    lse_ptr,  # (B,)
    aux_ptr,  # (B, AUX_COLS)
    B,
    D,
    AUX: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    m = tl.load(state_ptr + rows, mask=rmask, other=0.0)
    l = tl.load(state_ptr + B + rows, mask=rmask, other=1.0)
    l2 = tl.load(state_ptr + 2 * B + rows, mask=rmask, other=1.0)
    t = tl.load(state_ptr + 3 * B + rows, mask=rmask, other=0.0)
    k = tl.load(k_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    dmin = tl.load(dmin_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    dt = mu_ptr.dtype.element_ty
    inv_l = 1.0 / l
    log_l = tl.log(l)
    # stf_math.h, state_finalize: lse = log l - d_min k, d_bar = d_min + t / l.
    tl.store(lse_ptr + rows, (log_l - dmin * k).to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX, m.to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX + 1, log_l.to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX + 2, (dmin + t * inv_l).to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX + 3, (l * l / l2).to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX + 4, inv_l.to(dt), mask=rmask)
    tl.store(aux_ptr + r64 * AUX + 5, dmin.to(dt), mask=rmask)
    il = inv_l.to(dt)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        offs = r64[:, None] * D + dd[None, :]
        cen = tl.load(centre_ptr + dd, mask=dd < D, other=0.0)
        tl.store(mu_ptr + offs, tl.load(mu_ptr + offs, mask=mask, other=0.0) * il[:, None] + cen[None, :], mask=mask)


@triton.jit
def _bwd_terms_kernel(
    S_ptr,  # (B, c): x' . r' in, or with GIVEN the forward's kept distances
    E_ptr,  # (B, c): the mode's x coefficients w (c - mg) out (S itself, or bfloat16 for "bf16")
    C_ptr,  # (B, c): g . r' in, w out if REF_GRAD
    S_lo_ptr,  # (B, c): lo of the x coefficients ("tf32x3")
    A_ptr,  # (B, c): a_ij out if REF_GRAD
    xn_ptr,
    rn_ptr,
    k_ptr,
    sigma_ptr,
    aux_ptr,  # (B, AUX_COLS)
    mg_ptr,  # (B,) float64
    glse_ptr,  # (B,)
    rows_ptr,  # (3, B) float64, accumulated: s, cov, dev
    B,
    c,
    AUX: tl.constexpr,
    FINAL: tl.constexpr,
    REF_GRAD: tl.constexpr,
    GIVEN: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    k = tl.load(k_ptr + rows, mask=rmask, other=0.0)
    m = tl.load(aux_ptr + r64 * AUX, mask=rmask, other=0.0)
    log_l = tl.load(aux_ptr + r64 * AUX + 1, mask=rmask, other=0.0)
    # delta_bar = d_bar - ||x'||^2 (stf_math.h, mean_delta)
    dbar = tl.load(aux_ptr + r64 * AUX + 2, mask=rmask, other=0.0).to(tl.float64) - xn.to(tl.float64)
    mg = tl.load(mg_ptr + rows, mask=rmask, other=0.0)
    sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0).to(tl.float64)
    glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    s = tl.zeros((BLOCK_B,), dtype=tl.float64)
    cov = tl.zeros((BLOCK_B,), dtype=tl.float64)
    dev = tl.zeros((BLOCK_B,), dtype=tl.float64)
    for j0 in range(0, c, BLOCK_C):
        cols = j0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < c)[None, :]
        offs = r64[:, None] * c + cols[None, :]
        if GIVEN:
            d = tl.load(S_ptr + offs, mask=mask, other=0.0)
        else:
            d = _reduced_dist(S_ptr, rn_ptr, xn, offs, cols, mask, c)
        v = tl.where(mask, -(d - m[:, None]) * k[:, None] - log_l[:, None], -1000.0)
        w = _wexp(v).to(tl.float64)
        cm = tl.load(C_ptr + offs, mask=mask, other=0.0).to(tl.float64) - mg[:, None]
        xc = w * cm
        s += tl.sum(xc, axis=1)
        if FINAL:
            dd = tl.where(mask, d.to(tl.float64) - dbar[:, None], 0.0)
            cov += tl.sum(w * dd * cm, axis=1)
            dev += tl.sum(w * dd, axis=1)
            _store_operand(E_ptr, S_lo_ptr, offs, xc.to(d.dtype), mask, PREC)
            if REF_GRAD:
                a = w * (cm + glse[:, None]) / (sig * sig)[:, None]
                tl.store(A_ptr + offs, a.to(d.dtype), mask=mask)
                tl.store(C_ptr + offs, w.to(d.dtype), mask=mask)
    tl.store(rows_ptr + rows, tl.load(rows_ptr + rows, mask=rmask, other=0.0) + s, mask=rmask)
    tl.store(rows_ptr + B + rows, tl.load(rows_ptr + B + rows, mask=rmask, other=0.0) + cov, mask=rmask)
    tl.store(rows_ptr + 2 * B + rows, tl.load(rows_ptr + 2 * B + rows, mask=rmask, other=0.0) + dev, mask=rmask)


@triton.jit
def _bwd_finish_kernel(
    px_ptr,  # (B, D)
    mu_ptr,
    x_ptr,
    centre_ptr,
    sigma_ptr,
    glse_ptr,
    aux_ptr,
    rows_ptr,  # (3, B) float64: s, cov, dev
    gx_ptr,  # (B, D) out
    gs_ptr,  # (B,) out
    B,
    D,
    AUX: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    s = tl.load(rows_ptr + rows, mask=rmask, other=0.0)
    cov = tl.load(rows_ptr + B + rows, mask=rmask, other=0.0)
    dev = tl.load(rows_ptr + 2 * B + rows, mask=rmask, other=0.0)
    sig = tl.load(sigma_ptr + rows, mask=rmask, other=1.0).to(tl.float64)
    glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    dbar = tl.load(aux_ptr + r64 * AUX + 2, mask=rmask, other=0.0).to(tl.float64)
    dt = gx_ptr.dtype.element_ty
    # dL/dsigma and dL/dx: stf_math.h's grad_sigma and grad_x_corrected.
    tl.store(gs_ptr + rows, (((cov - s * dev) + glse * dbar) / (sig * sig * sig)).to(dt), mask=rmask)
    inv_s2 = 1.0 / (sig * sig)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (dd < D)[None, :]
        offs = r64[:, None] * D + dd[None, :]
        cen = tl.load(centre_ptr + dd, mask=dd < D, other=0.0)[None, :]
        mu_c = (tl.load(mu_ptr + offs, mask=mask, other=0.0) - cen).to(tl.float64)
        x_c = (tl.load(x_ptr + offs, mask=mask, other=0.0) - cen).to(tl.float64)
        px = tl.load(px_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        gx = (px - s[:, None] * mu_c + glse[:, None] * (mu_c - x_c)) * inv_s2[:, None]
        tl.store(gx_ptr + offs, gx.to(dt), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _blocks(device: torch.device) -> dict[str, int]:
    """Block sizes: wide on a GPU; small under the interpreter, so that the loops over D and over a
    chunk's columns and the masked edges all run on test-sized problems."""
    if device.type == "cuda":
        return {"rows": 4, "cols": 128, "d": 256}
    return {"rows": 4, "cols": 16, "d": 32}


def _width(D: int, prec: int) -> int:
    return 3 * D if prec == _TF32X3 else D


def _operand_dtype(prec: int, dtype: torch.dtype) -> torch.dtype:
    """How the mode's operands are stored: bfloat16 for "bf16" (float64 takes "ieee" only)."""
    return torch.bfloat16 if prec == _BF16 else dtype


def _mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a b; bfloat16 operands with float32 sums into a float32 out (on a GPU cuBLAS's bf16
    product; elsewhere, where torch has none, the same sums of the operands widened exactly)."""
    if a.dtype != torch.bfloat16:
        torch.mm(a, b, out=out)
    elif out.device.type == "cuda":
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


def _shift(src: Tensor, centre: Tensor | None, prec: int, ref_layout: bool, with_norms: bool, out: Tensor | None = None):
    """(operand rows (rows, W), squared norms (rows,)) of src - centre in the mode."""
    rows, D = src.shape
    bs = _blocks(src.device)
    op = out if out is not None else src.new_empty(rows, _width(D, prec), dtype=_operand_dtype(prec, src.dtype))
    norms = src.new_empty(rows) if with_norms else op
    if rows:
        _shift_rows_kernel[(triton.cdiv(rows, bs["rows"]),)](
            src, src if centre is None else centre, op, norms, rows, D, op.shape[1],
            PREC=prec, REF_LAYOUT=ref_layout, HAS_CENTRE=centre is not None, WITH_NORMS=with_norms,
            BLOCK_R=bs["rows"], BLOCK_D=bs["d"],
        )
    return op, norms


def _accumulate(out: Tensor, W: Tensor, W_lo: Tensor, rop: Tensor, D: int, prec: int, accumulate: bool,
                tile: Tensor | None = None, alpha: Tensor | None = None) -> None:
    """out += W R' in the mode (three products for "tf32x3": hi hi + hi lo + lo hi). For "bf16",
    whose product cannot add into float32, a product into `tile` (out's shape), then out = out alpha
    + tile in one pass (alpha (B,) from the update kernel, which left out unscaled; None: 1)."""
    hi = rop[:, :D]
    with products(prec != _IEEE, out.device):
        if not accumulate:
            _mm(W, hi, out)
        elif prec == _BF16:
            _mm(W, hi, tile)
            if alpha is None:
                out.add_(tile)
            else:
                torch.addcmul(tile, out, alpha[:, None], out=out)
        else:
            out.addmm_(W, hi)
        if prec == _TF32X3:
            out.addmm_(W, rop[:, D : 2 * D])
            out.addmm_(W_lo, hi)


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(chunk, n - start)


def stf_forward(x: Tensor, sigma: Tensor, ref: Tensor, centre: Tensor, chunk_size: int, precision: str, keep: bool):
    """(mu, lse, aux, dist) of `stf_reference.stf_forward`, with the same arithmetic (module docstring);
    with `keep` the update kernel also stores each chunk's distances into dist, a (B, c) tile after
    the other."""
    B, D = x.shape
    n = ref.shape[0]
    prec = PRECISIONS.index(precision)
    bs = _blocks(x.device)
    chunk = min(chunk_size, n)
    xop, xn = _shift(x, centre, prec, False, True)
    k = (0.5 / (sigma * sigma)).clamp_max(torch.finfo(sigma.dtype).max)
    op_dtype = _operand_dtype(prec, x.dtype)
    rop_buf = x.new_empty(chunk, _width(D, prec), dtype=op_dtype)
    S_buf = x.new_empty(B * chunk)
    E_buf = x.new_empty(B * chunk, dtype=op_dtype) if prec == _BF16 else S_buf
    S_lo_buf = x.new_empty(B * chunk) if prec == _TF32X3 else S_buf
    tile = x.new_empty(B, D) if prec == _BF16 and n > chunk else None
    alpha = x.new_empty(B) if tile is not None else None  # rescaled with the tile's addition
    state = x.new_empty(4, B, dtype=torch.float64)
    arg = x.new_empty(B, dtype=torch.int64)
    mu = x.new_empty(B, D)
    dist = x.new_empty(B * n if keep else 0)
    grid = (triton.cdiv(B, bs["rows"]),)
    for start, c in _chunks(n, chunk):
        rop, rn = _shift(ref[start : start + c], centre, prec, True, True, rop_buf[:c])
        S = S_buf[: B * c].view(B, c)
        with products(prec != _IEEE, x.device):
            _mm(xop, rop.T, S)
        E = E_buf[: B * c].view(B, c)
        S_lo = S_lo_buf[: B * c].view(B, c)
        _fwd_update_kernel[grid](
            S, dist[B * start : B * (start + c)] if keep else S, E, S_lo, xn, rn, k, state, arg, mu,
            mu if alpha is None else alpha, B, c, D, start, IS_FIRST=start == 0, RESCALE=prec != _BF16, KEEP=keep,
            PREC=prec, BLOCK_B=bs["rows"], BLOCK_C=bs["cols"], BLOCK_D=bs["d"],
        )
        _accumulate(mu, E, S_lo, rop, D, prec, start > 0, tile, alpha)
    lse, aux = x.new_empty(B), x.new_empty(B, AUX_COLS)
    dmin = stf_reference.nearest_sqdist(x, ref, arg)
    _fwd_finish_kernel[grid](state, k, dmin, centre, mu, lse, aux, B, D, AUX=AUX_COLS, BLOCK_B=bs["rows"],
                             BLOCK_D=bs["d"])
    return mu, lse, aux, dist


def stf_backward(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, precision, ref_grad):
    """(grad_x, grad_sigma, grad_ref) of `stf_reference.stf_backward`, with the same arithmetic; with
    the forward's kept distances (dist not empty) the products give g . r' alone."""
    B, D = x.shape
    n = ref.shape[0]
    prec = PRECISIONS.index(precision)
    bs = _blocks(x.device)
    chunk = min(chunk_size, n)
    W = _width(D, prec)
    op_dtype = _operand_dtype(prec, x.dtype)
    xgop = x.new_empty(2 * B, W, dtype=op_dtype)  # x' rows, then grad_mu rows
    _, xn = _shift(x, centre, prec, False, True, xgop[:B])
    _shift(grad_mu, None, prec, False, False, xgop[B:])
    k = (0.5 / (sigma * sigma)).clamp_max(torch.finfo(sigma.dtype).max)
    mg = ((mu - centre).double() * grad_mu.double()).sum(1)
    rop_buf = x.new_empty(chunk, W, dtype=op_dtype)
    SC_buf = x.new_empty(2 * B * chunk)
    E_buf = x.new_empty(B * chunk, dtype=op_dtype) if prec == _BF16 else SC_buf
    S_lo_buf = x.new_empty(B * chunk) if prec == _TF32X3 else SC_buf
    tile = x.new_empty(B, D) if prec == _BF16 and n > chunk else None
    A_buf = x.new_empty(B * chunk) if ref_grad else SC_buf
    xs = x - centre if ref_grad else None
    px = x.new_empty(B, D)
    rows = x.new_zeros(3, B, dtype=torch.float64)
    grad_ref = torch.empty_like(ref) if ref_grad else ref.new_zeros(0)
    grid = (triton.cdiv(B, bs["rows"]),)
    given = dist.numel() != 0

    def sweep(final: bool) -> None:
        for start, c in _chunks(n, chunk):
            rop, rn = _shift(ref[start : start + c], centre, prec, True, True, rop_buf[:c])
            SC = SC_buf[: 2 * B * c].view(2 * B, c)
            S, C = SC[:B], SC[B:]
            with products(prec != _IEEE, x.device):
                if given:
                    _mm(xgop[B:], rop.T, C)
                    S = dist[B * start : B * (start + c)].view(B, c)
                else:
                    _mm(xgop, rop.T, SC)
            E = E_buf[: B * c].view(B, c)
            S_lo = S_lo_buf[: B * c].view(B, c)
            A = A_buf[: B * c].view(B, c)
            _bwd_terms_kernel[grid](
                S, E, C, S_lo, A, xn, rn, k, sigma, aux, mg, grad_lse, rows, B, c,
                AUX=AUX_COLS, FINAL=final, REF_GRAD=final and ref_grad, GIVEN=given, PREC=prec,
                BLOCK_B=bs["rows"], BLOCK_C=bs["cols"],
            )
            if not final:
                continue
            _accumulate(px, E, S_lo, rop, D, prec, start > 0, tile)
            if ref_grad:
                # dL/dr_j = sum_i w_ij g_i + a_ij (x'_i - r'_j), exact float32 in every mode.
                g = grad_ref[start : start + c]
                with products(False, x.device):
                    torch.mm(C.T, grad_mu, out=g)
                    g.addmm_(A.T, xs)
                g.sub_(A.sum(0)[:, None] * (ref[start : start + c] - centre))

    if ref_grad:
        # The ref gradient's a_ij needs an mg consistent with the products' rounding: a first sweep
        # measures s = sum_j w (c - mg) and moves mg by it (stf_reference.stf_backward).
        sweep(False)
        mg = mg + rows[0]
        rows.zero_()
    sweep(True)
    grad_x, grad_sigma = torch.empty_like(x), torch.empty_like(sigma)
    _bwd_finish_kernel[grid](
        px, mu, x, centre, sigma, grad_lse, aux, rows, grad_x, grad_sigma, B, D,
        AUX=AUX_COLS, BLOCK_B=bs["rows"], BLOCK_D=bs["d"],
    )
    return grad_x, grad_sigma, grad_ref

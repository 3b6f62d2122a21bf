"""Pure-PyTorch reference of the stable target (docs/math.md section 1): readable, chunked with the exact
merge, any device and float dtype (float64 to judge), every GPU precision mode emulated exactly. It is
also the `reference` backend's launcher pair and the partial states of the sharded stable target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import AUX_COLS, AUX_DBAR, AUX_DMIN, AUX_LOGL, AUX_M, AUX_NEFF, AUX_WMAX  # noqa: F401 (re-exported)
from .matmul_mode import products

__all__ = [
    "State",
    "centre_of",
    "finalize",
    "merge_states",
    "operands",
    "partial_state",
    "stf_backward",
    "stf_forward",
]

# References whose mean is the default centre: enough to sit inside the data, few enough to cost
# nothing next to the products (the centre is exact for any value).
CENTRE_REFS = 64


def centre_of(ref: Tensor) -> Tensor:
    """The default centre c (D,): the mean of the first CENTRE_REFS references (which minimises their
    mean ||r_j - c||^2, the products' rounding scale). On the CPU, 0 instead when that mean is within
    their spread of the origin (||mean||^2 <= the mean of ||r_j - mean||^2): the rounding scale
    would shrink by at most half there, and with a zero centre the CPU kernel reads the references
    as they are instead of writing a shifted copy. The GPU kernels write the shifted operands
    whatever the centre, so there the test would only cost its nine small launches (about 50 us of
    host time a call). No host synchronisation."""
    head = ref[:CENTRE_REFS]
    mean = head.mean(0)
    if ref.device.type != "cpu":
        return mean
    spread = (head - mean).pow(2).sum(1).mean()
    return torch.where(mean.pow(2).sum() <= spread, torch.zeros_like(mean), mean)


def half_inv_sq(sigma: Tensor) -> Tensor:
    """k = 1 / (2 sigma^2), clamped to the dtype's largest finite number (0 * k stays 0)."""
    return (0.5 / (sigma * sigma)).clamp_max(torch.finfo(sigma.dtype).max)


# ----------------------------------------------------------------------------------------------
# Precision modes: operands and products
# ----------------------------------------------------------------------------------------------


def _tf32(t: Tensor) -> Tensor:
    # TF32 keeps 10 of float32's 23 mantissa bits; adding half a TF32 ulp to the magnitude bits and
    # truncating rounds half away from zero (cvt.rna.tf32.f32). NaN and inf pass unchanged.
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


def _bf16(t: Tensor) -> Tensor:
    # bfloat16 keeps 7 mantissa bits, round to nearest even (the GPU's conversion).
    return t.to(torch.bfloat16).to(t.dtype)


def operands(t: Tensor, precision: str) -> tuple[Tensor, ...]:
    """t as the mode's matrix units read it: (t,) for "ieee", its TF32 or bfloat16 rounding for "tf32"
    and "bf16", and the split (hi, lo) with hi = tf32(t), lo = tf32(t - hi) for "tf32x3"."""
    if precision == "ieee" or t.dtype == torch.float64:
        return (t,)
    if precision == "tf32":
        return (_tf32(t),)
    if precision == "bf16":
        return (_bf16(t),)
    if precision == "tf32x3":
        hi = _tf32(t)
        return hi, _tf32(t - hi)
    raise ValueError(f"precision must be one of 'ieee', 'tf32x3', 'tf32', 'bf16'; got {precision!r}")


def product(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
    """sum_k a[i, k] b[k, j] of operands from `operands`: one product, or for (hi, lo) splits the
    three products hi hi + hi lo + lo hi (the 3xTF32 scheme; lo lo is below float32's rounding) summed
    in one float32 accumulation, as the kernels do (one product over the concatenated K axis)."""
    with products(False, a[0].device):  # exact float32 on a GPU, whatever the user's TF32 setting
        if len(a) == 1:
            return a[0] @ b[0]
        (ah, al), (bh, bl) = a, b
        return torch.cat([ah, ah, al], dim=1) @ torch.cat([bh, bl, bh], dim=0)


def _sqnorms(t: Tensor, ops: tuple[Tensor, ...], precision: str) -> Tensor:
    # Norms of the values the product sees: the rounded ones in the single-rounding modes (so that
    # d_ij is the distance between the rounded points), the exact ones where the product is exact to
    # float32 ("ieee", "tf32x3").
    v = ops[0] if precision in ("tf32", "bf16") else t
    return (v * v).sum(1)


def distances(xo, xn: Tensor, ro, rn: Tensor) -> Tensor:
    """delta_ij = ||r'_j||^2 - 2 x'_i . r'_j, clamped at -||x'_i||^2 (NaN stays NaN), shape (B, c)."""
    delta = rn[None, :] - 2 * product(xo, tuple(t.T for t in ro))
    return torch.maximum(delta, -xn[:, None].expand_as(delta)) if delta.numel() else delta


# ----------------------------------------------------------------------------------------------
# Streaming state (docs/math.md, "Streaming in distance space")
# ----------------------------------------------------------------------------------------------


@dataclass
class State:
    """Softmax state of each query row over a subset of the references, in distance space.

    m (B,): min_j delta_ij (+inf when empty); l (B,): sum_j e_ij; l2 (B,): sum_j e_ij^2;
    t (B,): sum_j e_ij (delta_ij - m); a (B, D): sum_j e_ij r'_j, with e_ij = exp(-(delta_ij - m_i) k_i);
    arg (B,): the index of the reference at the minimum (-1 when empty; the first of equal ones).
    """

    m: Tensor
    l: Tensor
    l2: Tensor
    t: Tensor
    a: Tensor
    arg: Tensor


def empty_state(B: int, D: int, like: Tensor) -> State:
    zeros = like.new_zeros(B, dtype=torch.float64)
    arg = torch.full((B,), -1, dtype=torch.int64, device=like.device)
    return State(torch.full_like(zeros, torch.inf), zeros, zeros.clone(), zeros.clone(), like.new_zeros(B, D), arg)


def rebase(s: State, m_new: Tensor, k: Tensor) -> State:
    """The state moved to a new running minimum m_new <= s.m: every e scales by
    alpha = exp(-(m - m_new) k), and delta - m_new = (delta - m) + (m - m_new) moves t."""
    empty = s.m == torch.inf
    gap = torch.where(empty, torch.zeros_like(s.m), s.m - m_new)
    alpha = torch.where(empty, torch.zeros_like(s.m), torch.exp(-gap * k.double()))
    t = torch.where(empty, torch.zeros_like(s.t), alpha * (s.t + gap * s.l))
    return State(m_new, s.l * alpha, s.l2 * alpha * alpha, t, s.a * alpha[:, None].to(s.a.dtype), s.arg)


def merge_states(a: State, b: State, k: Tensor) -> State:
    """Exact merge of two partial states (associative and commutative up to rounding; on a tie of the
    minima the argument of a is kept)."""
    m = torch.minimum(a.m, b.m)  # propagates NaN
    arg = torch.where(b.m < a.m, b.arg, a.arg)
    a, b = rebase(a, m, k), rebase(b, m, k)
    return State(m, a.l + b.l, a.l2 + b.l2, a.t + b.t, a.a + b.a, arg)


def chunk_state(d: Tensor, k: Tensor, ro: tuple[Tensor, ...], precision: str, start: int = 0) -> State:
    """The partial state of one chunk (references start, start + 1, ...) from its reduced distances
    d (B, c) and shifted references ro."""
    m, arg = d.min(dim=1)
    dm = d - m[:, None]
    e = torch.exp(-dm * k[:, None])
    e64 = e.double()
    sums = (e64.sum(1), (e64 * e64).sum(1), (e64 * dm.double()).sum(1))
    return State(m.double(), *sums, product(operands(e, precision), ro), arg + start)


def query_norms(x: Tensor, centre: Tensor, precision: str) -> Tensor:
    """||x'_i||^2 as the mode's distances use it (B,)."""
    xs = x - centre
    return _sqnorms(xs, operands(xs, precision), precision)


def _chunks(x: Tensor, ref: Tensor, centre: Tensor, chunk_size: int, precision: str):
    """Per chunk of references: (start, r' (c, D), its operands, reduced distances delta (B, c))."""
    xs = x - centre
    xo = operands(xs, precision)
    xn = _sqnorms(xs, xo, precision)
    for start in range(0, ref.shape[0], chunk_size):
        rs = ref[start : start + chunk_size] - centre
        ro = operands(rs, precision)
        yield start, rs, ro, distances(xo, xn, ro, _sqnorms(rs, ro, precision))


def partial_state(x: Tensor, sigma: Tensor, ref: Tensor, centre: Tensor, chunk_size: int, precision="ieee",
                  kept: list | None = None) -> State:
    """Streams over the references chunk by chunk, merging each chunk's state into the running one.
    The accumulator a is relative to `centre`. Each chunk's distances are appended to `kept` if given."""
    k = half_inv_sq(sigma)
    state = empty_state(x.shape[0], x.shape[1], x)
    for start, _, ro, d in _chunks(x, ref, centre, chunk_size, precision):
        state = merge_states(state, chunk_state(d, k, ro, precision, start), k)
        if kept is not None:
            kept.append(d.reshape(-1))
    return state


def nearest_sqdist(x: Tensor, ref: Tensor, arg: Tensor) -> Tensor:
    """d_min,i = ||x_i - r_arg_i||^2, subtract first, summed in float64 (B,) in x's dtype."""
    r = ref[arg.clamp_min(0)]
    return ((x.double() - r.double()) ** 2).sum(1).to(x.dtype)


def finalize(state: State, centre: Tensor, sigma: Tensor, dmin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mu (B, D), lse (B,) and aux (B, AUX_COLS) = [m, log l, d_bar, n_eff, w_max, d_min] of a
    finished state whose minimum m is at the squared distance dmin (`nearest_sqdist`)."""
    dt = state.a.dtype
    k = half_inv_sq(sigma).double()
    mu = state.a / state.l[:, None].to(dt) + centre
    log_l = torch.log(state.l)
    dmin = dmin.double()
    lse = log_l - dmin * k
    dbar = dmin + state.t / state.l
    aux = torch.stack([state.m, log_l, dbar, state.l * state.l / state.l2, 1.0 / state.l, dmin], dim=1)
    return mu, lse.to(dt), aux.to(dt)


def stf_forward(x: Tensor, sigma: Tensor, ref: Tensor, centre: Tensor, chunk_size: int, precision: str = "ieee",
                keep: bool = False):
    """Forward pass: (mu, lse, aux), see `finalize`, and dist: with `keep` the reduced distances for
    the backward (B n,), each chunk's (B, c) after the other, else (0,)."""
    kept = [] if keep else None
    state = partial_state(x, sigma, ref, centre, chunk_size, precision, kept)
    dist = torch.cat(kept) if keep else x.new_zeros(0)
    return (*finalize(state, centre, sigma, nearest_sqdist(x, ref, state.arg)), dist)


def stf_backward(
    grad_mu: Tensor,
    grad_lse: Tensor,
    x: Tensor,
    sigma: Tensor,
    ref: Tensor,
    centre: Tensor,
    mu: Tensor,
    aux: Tensor,
    dist: Tensor,
    chunk_size: int,
    precision: str = "ieee",
    ref_grad: bool = False,
):
    """Gradients (x, sigma, ref) of docs/math.md, streaming over reference chunks like the forward.

    Centred forms (exact because sum_j w_ij = 1 and sum_j w_ij r_j = mu_i), with w_ij recomputed as
    exp(-(delta_ij - m_i) k_i - log l_i) from the forward's aux, c_ij = g_i . r'_j, mg_i = g_i . mu'_i
    (mu' = mu - centre; the differences c - mg do not depend on the centre):
        dL/dx_i     = (sum_j w_ij (c_ij - mg_i) r'_j + g_lse,i (mu'_i - x'_i)) / sigma_i^2
        dL/dsigma_i = (sum_j w_ij (d_ij - d_bar_i)(c_ij - mg_i) + g_lse,i d_bar_i) / sigma_i^3
        dL/dr_j     = sum_i w_ij g_i + a_ij (x'_i - r'_j),  a_ij = w_ij (c_ij - mg_i + g_lse,i) / sigma_i^2
    In floating point mg (one dot product) and the c of the reference holding the weight (another)
    round differently, and their difference is divided by sigma^2: the streamed
    s_i = sum_j w_ij (c_ij - mg_i), zero in exact arithmetic, corrects that to first order
    (- s mu' for x, - s sum_j w (d - d_bar) for sigma; for ref a first sweep computes s and moves
    mg by it). d - d_bar is delta - delta_bar with delta_bar = d_bar - ||x'||^2, whose rounding the
    s correction removes. The products run in the precision mode, except the ref gradient's, which
    are exact (sum_i a_ij (x'_i - r'_j) cancels). The distances are the forward's kept `dist` when it
    is not empty (the same values), else recomputed. Returns grad_ref empty (0,) unless ref_grad.
    """
    k = half_inv_sq(sigma)
    s2 = sigma * sigma
    xs, mus = x - centre, mu - centre
    m, log_l, dbar = aux[:, AUX_M], aux[:, AUX_LOGL], aux[:, AUX_DBAR]
    delta_bar = dbar - query_norms(x, centre, precision)
    # Per-element terms and row sums in float64 (as the kernels); the products' operands in the mode.
    dt = x.dtype
    mg = (mus.double() * grad_mu.double()).sum(1)
    go = operands(grad_mu, precision)

    def weighted_chunks():
        for start, rs, ro, d in _chunks(x, ref, centre, chunk_size, precision):
            if dist.numel():  # the forward's (B, c) tile of this chunk
                d = dist[x.shape[0] * start : x.shape[0] * start + d.numel()].view(d.shape)
            w = torch.exp(-(d - m[:, None]) * k[:, None] - log_l[:, None]).double()
            yield start, rs, ro, d, w, product(go, tuple(t.T for t in ro)).double()  # c_ij = g_i . r'_j

    if ref_grad:
        mg = mg + sum((w * (c - mg[:, None])).sum(1) for *_, w, c in weighted_chunks())
    px = torch.zeros_like(x)
    s_sum, cov, dev = (torch.zeros_like(mg) for _ in range(3))
    grad_ref = torch.zeros_like(ref) if ref_grad else ref.new_zeros(0)
    for start, rs, ro, d, w, c in weighted_chunks():
        xc = w * (c - mg[:, None])
        wd = w * (d.double() - delta_bar.double()[:, None])
        px += product(operands(xc.to(dt), precision), ro)
        s_sum += xc.sum(1)
        cov += (wd * (c - mg[:, None])).sum(1)
        dev += wd.sum(1)
        if ref_grad:
            a = ((xc + w * grad_lse.double()[:, None]) / s2.double()[:, None]).to(dt)
            with products(False, x.device):
                grad_ref[start : start + rs.shape[0]] = w.to(dt).T @ grad_mu + a.T @ xs - a.sum(0)[:, None] * rs
    s64, gl64 = s2.double(), grad_lse.double()
    grad_x = (px.double() - s_sum[:, None] * mus.double() + gl64[:, None] * (mus - xs).double()) / s64[:, None]
    grad_sigma = (cov - s_sum * dev + gl64 * dbar.double()) / (s64 * sigma.double())
    return grad_x.to(dt), grad_sigma.to(dt), grad_ref

"""Pure-PyTorch reference of the stable target (math.md section 1): the spec of every backend.

Readable, chunked over the references with the exact log-sum-exp merge, any device, any float
dtype (run it in float64 to judge). Memory is O((B + chunk) D): no B x n tensor beyond one chunk.

The same partial states serve the sharded (multi-process) stable target: `partial_state` on each
shard, `merge_states` across shards, `finalize` once.

Shapes: x (B, D), sigma (B,), ref (n, D), ref_sqnorm (n,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Columns of the auxiliary output `aux` (B, 4); the same order as csrc/stf_math.h's AuxColumn.
AUX_ZLSE, AUX_DBAR, AUX_NEFF, AUX_WMAX = 0, 1, 2, 3


@dataclass
class State:
    """Running softmax state of each query over a subset of the references (math.md, the merge).

    m (B,): max_j z_ij; l (B,): sum_j e_ij; l2 (B,): sum_j e_ij^2; t (B,): sum_j e_ij (z_ij - m_i);
    a (B, D): sum_j e_ij r_j; with e_ij = exp(z_ij - m_i) and z_ij the logit without the row
    constant -||x_i||^2 / (2 sigma_i^2).
    """

    m: Tensor
    l: Tensor
    l2: Tensor
    t: Tensor
    a: Tensor


def logits(x: Tensor, inv_s2: Tensor, ref: Tensor, ref_sqnorm: Tensor) -> Tensor:
    """z_ij = (x_i . r_j - ||r_j||^2 / 2) / sigma_i^2, shape (B, n) for the given references."""
    return (x @ ref.T - 0.5 * ref_sqnorm) * inv_s2[:, None]


def _rescale(m_old: Tensor, m_new: Tensor) -> Tensor:
    # exp(m_old - m_new), with 0 for an empty state (m_old = -inf) instead of exp(nan).
    return torch.where(m_old == -torch.inf, torch.zeros_like(m_old), torch.exp(m_old - m_new))


def _rebase(s: State, m_new: Tensor) -> State:
    alpha = _rescale(s.m, m_new)
    t = torch.where(s.l == 0, torch.zeros_like(s.t), alpha * (s.t + (s.m - m_new) * s.l))
    return State(m_new, s.l * alpha, s.l2 * alpha * alpha, t, s.a * alpha[:, None])


def merge_states(a: State, b: State) -> State:
    """Exact merge of two partial states (associative and commutative up to rounding)."""
    m = torch.maximum(a.m, b.m)  # propagates NaN
    a, b = _rebase(a, m), _rebase(b, m)
    return State(m, a.l + b.l, a.l2 + b.l2, a.t + b.t, a.a + b.a)


def chunk_state(z: Tensor, ref: Tensor) -> State:
    """The partial state of one chunk from its logits z (B, c) and references (c, D)."""
    m = z.amax(dim=1)
    e = torch.exp(z - m[:, None])
    return State(m, e.sum(1), (e * e).sum(1), (e * (z - m[:, None])).sum(1), e @ ref)


def empty_state(x: Tensor) -> State:
    B, D = x.shape
    zeros = x.new_zeros(B)
    return State(torch.full_like(zeros, -torch.inf), zeros, zeros.clone(), zeros.clone(), x.new_zeros(B, D))


def partial_state(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, chunk_size: int) -> State:
    """Streams over the references chunk by chunk, merging each chunk's state into the running one."""
    inv_s2 = 1.0 / (sigma * sigma)
    state = empty_state(x)
    for start in range(0, ref.shape[0], chunk_size):
        r = ref[start : start + chunk_size]
        z = logits(x, inv_s2, r, ref_sqnorm[start : start + chunk_size])
        state = merge_states(state, chunk_state(z, r))
    return state


def finalize(state: State, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mu (B, D), lse (B,) and aux (B, 4) = [zlse, d_bar, n_eff, w_max] from a finished state."""
    s2 = sigma * sigma
    xn = (x * x).sum(1)
    mu = state.a / state.l[:, None]
    zlse = state.m + torch.log(state.l)
    lse = zlse - 0.5 * xn / s2
    # sum_j w_ij z_ij = m + t / l, and d_ij = ||x_i||^2 - 2 sigma_i^2 z_ij.
    dbar = (xn - 2 * s2 * (state.m + state.t / state.l)).clamp_min(0)
    neff = state.l * state.l / state.l2
    wmax = 1.0 / state.l
    return mu, lse, torch.stack([zlse, dbar, neff, wmax], dim=1)


def stf_forward(x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, chunk_size: int):
    """Forward pass: (mu, lse, aux), see `finalize`."""
    return finalize(partial_state(x, sigma, ref, ref_sqnorm, chunk_size), x, sigma)


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
    ref_grad: bool,
):
    """Gradients (x, sigma, ref) of math.md, streaming over reference chunks like the forward pass.

    Centred forms (exact because sum_j w_ij = 1 and sum_j w_ij r_j = mu_i):
        dL/dx_i     = (sum_j w_ij (c_ij - mg_i) r_j + g_lse,i (mu_i - x_i)) / sigma_i^2
        dL/dsigma_i = (sum_j w_ij (d_ij - d_bar_i)(c_ij - mg_i) + g_lse,i d_bar_i) / sigma_i^3
                    = (-2 sigma_i^2 sum_j w_ij (z_ij - z_bar_i)(c_ij - mg_i) + g_lse,i d_bar_i) / sigma_i^3
        dL/dr_j     = sum_i w_ij g_i + a_ij (x_i - r_j),  a_ij = w_ij (c_ij - mg_i + g_lse,i) / sigma_i^2
    with c_ij = r_j . g_i, mg_i = mu_i . g_i and z_bar_i = sum_j w_ij z_ij (d - d_bar = -2 sigma^2
    (z - z_bar)). The z form is the one computed: d recovered from z as ||x||^2 - 2 sigma^2 z rounds
    at the scale of ||x||^2, far above the spread of d, and cost dL/dsigma most of its float32
    digits at D = 3072. In floating point, mg (one dot product) and the c
    of the reference holding the weight (another) round differently, and their difference is
    divided by sigma^2: the streamed s_i = sum_j w_ij (c_ij - mg_i), zero in exact arithmetic,
    corrects that to first order (- s mu for x, - s sum_j w (d - d_bar) for sigma; for ref a
    first sweep computes s and moves mg by it). Returns grad_ref empty (0,) unless ref_grad.
    """
    s2 = sigma * sigma
    inv_s2 = 1.0 / s2
    xn = (x * x).sum(1)
    zlse, dbar = aux[:, AUX_ZLSE], aux[:, AUX_DBAR]
    zbar = (xn - dbar) / (2 * s2)  # its rounding cancels to first order with the s correction
    mg = (mu * grad_mu).sum(1)

    def chunks():
        for start in range(0, ref.shape[0], chunk_size):
            r = ref[start : start + chunk_size]
            z = logits(x, inv_s2, r, ref_sqnorm[start : start + chunk_size])
            yield start, r, z, torch.exp(z - zlse[:, None]), grad_mu @ r.T

    if ref_grad:
        mg = mg + sum((w * (c - mg[:, None])).sum(1) for _, _, _, w, c in chunks())
    px = torch.zeros_like(x)
    s_sum, cov_z, dev_z = (torch.zeros_like(sigma) for _ in range(3))
    grad_ref = torch.zeros_like(ref) if ref_grad else ref.new_zeros(0)
    for start, r, z, w, c in chunks():
        xc = w * (c - mg[:, None])
        wz = w * (z - zbar[:, None])
        px += xc @ r
        s_sum += xc.sum(1)
        cov_z += (wz * (c - mg[:, None])).sum(1)
        dev_z += wz.sum(1)
        if ref_grad:
            a = (xc + w * grad_lse[:, None]) * inv_s2[:, None]
            grad_ref[start : start + chunk_size] = w.T @ grad_mu + a.T @ x - a.sum(0)[:, None] * r
    grad_x = (px - s_sum[:, None] * mu + grad_lse[:, None] * (mu - x)) * inv_s2[:, None]
    grad_sigma = (grad_lse * dbar - 2 * s2 * (cov_z - s_sum * dev_z)) / (s2 * sigma)
    return grad_x, grad_sigma, grad_ref

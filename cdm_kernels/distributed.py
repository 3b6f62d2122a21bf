"""The stable target over references sharded across processes (math.md section 1, the merge).

With data-parallel training each process can hold its own slice of a large reference set. The
stable target of a query must still be taken over the union of all slices; the log-sum-exp merge of
partial states makes that exact with a handful of collectives and no process ever holding the union:

  1. all_gather every process's queries x and noise levels sigma (padded to the largest batch);
  2. each process computes the partial state (m, l, l2, t, a) of ALL queries over its local shard,
     with the fused stable-target op of its device (`cdm_kernels::stf_forward`, any backend);
  3. all_reduce(MAX) of m, rescale the local sums to the global m, all_reduce(SUM) of (l, l2, t, a);
  4. finalize, and keep the rows of the local queries.

Traffic per call: the gathered queries (world B_max D) plus one reduction of world B_max (D + 3)
numbers. Works with any backend of torch.distributed that has all_gather and all_reduce (gloo on the
CPU, NCCL on GPUs): every tensor stays on x's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import stf_reference
from .stf import PRECISIONS, _check_float, _check_sigma, _compute_dtype, default_chunk_size, resolve_backend

__all__ = ["stf_target_sharded"]


def _all_gather_padded(t: Tensor, rows: int, max_rows: int, world: int, group) -> Tensor:
    # all_gather needs one shape on every process; pad the batch to the largest and strip later.
    if rows < max_rows:
        pad = t.new_ones((max_rows - rows, *t.shape[1:]))  # ones: a harmless sigma for padded rows
        t = torch.cat([t, pad])
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out)


def _shard_state(xs: Tensor, sigmas: Tensor, r2: Tensor, norms: Tensor, chunk_size, backend, precision):
    """The partial state of every query over this process's shard, from the fused forward op.

    The op returns the shard's finished softmax; written as a partial state whose reference level
    is the shard's own log-normaliser zlse (instead of the row maximum), e_ij = w_ij, so
        m = zlse,  l = 1,  a = mu,  l2 = sum_j w_ij^2 = 1 / n_eff,
        t = sum_j w_ij (z_ij - zlse) = (||x_i||^2 - d_bar_i) / (2 sigma_i^2) - zlse
    (d_ij = ||x_i||^2 - 2 sigma_i^2 z_ij), which merges exactly like the streaming state.
    """
    if r2.shape[0] == 0:
        return stf_reference.empty_state(xs)
    chunk = chunk_size or default_chunk_size(xs.shape[0], r2.shape[0], xs.shape[1])
    mu, _, aux = torch.ops.cdm_kernels.stf_forward(xs, sigmas, r2, norms, chunk, backend, precision)
    zlse = aux[:, stf_reference.AUX_ZLSE]
    s2 = sigmas * sigmas
    t = ((xs * xs).sum(1) - aux[:, stf_reference.AUX_DBAR]) / (2 * s2) - zlse
    return stf_reference.State(zlse, torch.ones_like(zlse), 1.0 / aux[:, stf_reference.AUX_NEFF], t, mu)


def stf_target_sharded(
    x: Tensor,
    sigma: Tensor | float,
    ref_shard: Tensor,
    group=None,
    *,
    ref_sqnorm: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    precision: str = "ieee",
    return_lse: bool = False,
):
    """The stable target of this process's queries over the union of every process's references.

        mu_i = sum_j w_ij r_j,  w_ij = softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)),  j over all shards

    Collective: every process of `group` must call it (same trailing shape S and dtype; batch sizes
    and shard sizes may differ between processes, a shard may be empty, but the union must not be).
    Forward only: it is meant for the training target, computed under `torch.no_grad()`; it raises
    if called with grad mode on and an input that requires grad.

    Args:
        x: this process's queries, shape (B, *S), float16/bfloat16/float32/float64.
        sigma: their noise levels, > 0 and finite: shape (B,), (B, 1, ..., 1) or a float.
        ref_shard: this process's references, shape (n_local, *S), n_local >= 0, x's dtype and device.
        group: the torch.distributed process group (None: the default group).
        ref_sqnorm: optional cached ||r_j||^2 of the shard, shape (n_local,) (`cdm_kernels.ref_sqnorm`).
        chunk_size: references per streaming chunk; None picks one.
        backend, precision: of the local computation, as in `stf_target` ("auto" picks the fastest
            backend registered for x's device).
        return_lse: also return lse_i = log sum_j exp(-||x_i - r_j||^2 / (2 sigma_i^2)), shape (B,).

    Returns mu with x's shape and dtype (and lse in the compute dtype if asked), equal to
    `stf_target(x, sigma, torch.cat(all shards))` up to rounding. Arithmetic is float32 for
    float16/bfloat16/float32 inputs and float64 for float64 inputs.
    """
    _check_float(x, "x")
    _check_float(ref_shard, "ref_shard")
    if torch.is_grad_enabled() and (
        x.requires_grad or ref_shard.requires_grad or (isinstance(sigma, Tensor) and sigma.requires_grad)
    ):
        raise RuntimeError(
            "stf_target_sharded computes the training target only (no backward through the collectives); "
            "call it under torch.no_grad() or pass detached x, sigma and ref_shard"
        )
    if x.dim() < 1:
        raise ValueError("x must have shape (B, *S) with at least one dimension, got a 0-d tensor")
    if ref_shard.dim() < 1 or tuple(ref_shard.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"ref_shard must have shape (n_local, *S) with the trailing shape S = {tuple(x.shape[1:])} of x; "
            f"got {tuple(ref_shard.shape)}"
        )
    if ref_shard.device != x.device:
        raise ValueError(f"ref_shard is on {ref_shard.device} but x is on {x.device}; put them on one device")
    if ref_shard.dtype != x.dtype:
        raise TypeError(f"ref_shard has dtype {ref_shard.dtype} but x has dtype {x.dtype}; they must match")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = resolve_backend(x.device, backend, precision)
    B, n_local = x.shape[0], ref_shard.shape[0]
    dtype = _compute_dtype(x.dtype)
    sig = _check_sigma(sigma, B, x, dtype)
    x2 = x.detach().reshape(B, -1).to(dtype)
    D = x2.shape[1]
    r2 = ref_shard.detach().reshape(n_local, D).to(dtype)
    if ref_sqnorm is None:
        norms = (r2 * r2).sum(1)
    else:
        if not isinstance(ref_sqnorm, Tensor) or tuple(ref_sqnorm.shape) != (n_local,):
            got = tuple(ref_sqnorm.shape) if isinstance(ref_sqnorm, Tensor) else type(ref_sqnorm).__name__
            raise ValueError(f"ref_sqnorm must be a tensor of shape (n_local,) = ({n_local},), got {got}")
        if ref_sqnorm.device != x.device:
            raise ValueError(f"ref_sqnorm is on {ref_sqnorm.device} but x is on {x.device}")
        norms = ref_sqnorm.detach().to(dtype)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "stf_target_sharded needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); for one process use cdm_kernels.stf_target"
        )

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("stf_target_sharded: this process is not a member of `group`")
    # Batch size, shard size and D of every process: the only host synchronisation, needed for the
    # shapes (and so that a mismatch is a clear error on every process rather than a hang).
    sizes = torch.tensor([B, n_local, D], dtype=torch.int64, device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = torch.stack(all_sizes).tolist()
    dims = [d for _, _, d in all_sizes]
    if len(set(dims)) > 1:
        raise ValueError(
            f"every process must pass x and ref_shard with the same number of elements per sample; "
            f"got D = {dims} (by rank in the group)"
        )
    if sum(n for _, n, _ in all_sizes) == 0:
        raise ValueError("every process's ref_shard is empty: the stable target needs at least one reference")
    B_max = max(b for b, _, _ in all_sizes)

    xs = _all_gather_padded(x2, B, B_max, world, group)  # (world B_max, D)
    sigmas = _all_gather_padded(sig, B, B_max, world, group)  # (world B_max,)

    state = _shard_state(xs, sigmas, r2.contiguous(), norms.contiguous(), chunk_size, name, precision)

    # Exact merge across processes: bring every local state to the global row maximum (merging with
    # an empty state held at that maximum rescales l, l2, t and a and leaves an empty shard at 0),
    # then the rescaled sums add up.
    m = state.m.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    zeros = torch.zeros_like(m)
    state = stf_reference.merge_states(
        state, stf_reference.State(m, zeros, zeros.clone(), zeros.clone(), torch.zeros_like(state.a))
    )
    sums = torch.cat([state.l[:, None], state.l2[:, None], state.t[:, None], state.a], dim=1).contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    merged = stf_reference.State(m, sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3:])

    rows = slice(rank * B_max, rank * B_max + B)
    mine = stf_reference.State(merged.m[rows], merged.l[rows], merged.l2[rows], merged.t[rows], merged.a[rows])
    mu, lse, _ = stf_reference.finalize(mine, x2, sig)
    mu = mu.reshape(x.shape).to(x.dtype)
    return (mu, lse) if return_lse else mu

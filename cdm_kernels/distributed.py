"""The stable target over references sharded across processes: each process's partial state,
merged exactly through collectives (docs/math.md, "Streaming in distance space").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import registry, stf_reference
from .checks import compute_dtype
from .contract import AUX_DBAR, AUX_DMIN, AUX_LOGL, AUX_NEFF
from .stf import _deprecated_norms, check_chunk_and_precision, check_queries_and_refs, check_sigma

__all__ = ["stf_target_sharded"]


def _all_gather_padded(t: Tensor, rows: int, max_rows: int, world: int, group) -> Tensor:
    # all_gather needs one shape on every process; pad the batch to the largest and strip later.
    if rows < max_rows:
        pad = t.new_ones((max_rows - rows, *t.shape[1:]))  # ones: a harmless sigma for padded rows
        t = torch.cat([t, pad])
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out)


def _shard_state(xs: Tensor, sigmas: Tensor, shard: Tensor, chunk_size: int, backend: str, precision: str):
    """The partial state of every query over this process's shard, from the fused forward op.

    The op returns the shard's finished softmax. Each shard has its own centre, so the state is
    written in full squared distances, at the reference level lambda_i = -lse_i / k_i, at which
    exp(-(d - lambda) k) is the shard's own normalised weight w_ij (k = 1 / (2 sigma^2)):
        m = lambda,  l = 1,  l2 = sum_j w_ij^2 = 1 / n_eff,  t = sum_j w_ij (d_ij - lambda) = d_bar - lambda,
        a = mu (absolute coordinates),
    which merges exactly like the streaming state (docs/math.md, "Streaming in distance space").
    lambda = d_min - log(l) / k from aux (d_min exact), so that a sigma whose k overflowed stays finite.
    """
    B, D = xs.shape
    if shard.shape[0] == 0:
        return stf_reference.empty_state(B, D, xs)
    centre = stf_reference.centre_of(shard)
    mu, _, aux, _ = torch.ops.cdm_kernels.stf_forward(xs, sigmas, shard, centre, chunk_size, precision, False,
                                                      backend)
    k = stf_reference.half_inv_sq(sigmas).double()
    a = aux.double()
    level = a[:, AUX_DMIN] - a[:, AUX_LOGL] / k
    no_arg = torch.full(level.shape, -1, dtype=torch.int64, device=level.device)  # not needed after the op
    return stf_reference.State(level, torch.ones_like(level), 1.0 / a[:, AUX_NEFF], a[:, AUX_DBAR] - level, mu, no_arg)


def _merge_across(state: stf_reference.State, sigmas: Tensor, group) -> stf_reference.State:
    """The exact merge of every process's state: all_reduce(MIN) of the reference levels, each
    local state rebased to the global one (an empty shard stays at 0), all_reduce(SUM) of the sums."""
    m = state.m.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MIN, group=group)
    state = stf_reference.rebase(state, m, stf_reference.half_inv_sq(sigmas))
    sums = torch.stack([state.l, state.l2, state.t], dim=1)  # float64, like every row sum
    a = state.a.contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(a, op=dist.ReduceOp.SUM, group=group)
    return stf_reference.State(m, sums[:, 0], sums[:, 1], sums[:, 2], a, state.arg)


def _sizes_of_every_process(B: int, n_local: int, D: int, device, group) -> list[list[int]]:
    """(B, n_local, D) of every process, by rank: the only host synchronisation, needed for the shapes
    (and so that a mismatch is a clear error on every process rather than a hang)."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([B, n_local, D], dtype=torch.int64, device=device)
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
    return all_sizes


def _check_collective(x, sigma, ref_shard, group) -> tuple[int, int]:
    """The user-facing checks particular to the sharded call; returns (world size, rank)."""
    if torch.is_grad_enabled() and (
        x.requires_grad or ref_shard.requires_grad or (isinstance(sigma, Tensor) and sigma.requires_grad)
    ):
        raise RuntimeError(
            "stf_target_sharded computes the training target only (no backward through the collectives); "
            "call it under torch.no_grad() or pass detached x, sigma and ref_shard"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "stf_target_sharded needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group); for one process use cdm_kernels.stf_target"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("stf_target_sharded: this process is not a member of `group`")
    return dist.get_world_size(group), rank


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

    Steps: all_gather every process's queries and noise levels (padded to the largest batch); each
    process takes the partial state of ALL queries over its shard with the fused op of its device
    (`_shard_state`); the states merge exactly across processes (`_merge_across`); each process keeps
    its own rows. Traffic per call: the gathered queries (world B_max D) plus the reductions of
    world B_max (D + 3) numbers (the accumulators, and the row sums in float64). Works with any
    torch.distributed backend that has all_gather and all_reduce (gloo on the CPU, NCCL on GPUs):
    every tensor stays on x's device.

    Args:
        x: this process's queries, shape (B, *S), float16/bfloat16/float32/float64.
        sigma: their noise levels, > 0 and finite: shape (B,), (B, 1, ..., 1) or a float.
        ref_shard: this process's references, shape (n_local, *S), n_local >= 0, x's dtype and device.
        group: the torch.distributed process group (None: the default group).
        ref_sqnorm: deprecated and ignored, as in `stf_target`.
        chunk_size: references per streaming chunk; None picks one.
        backend, precision: of the local computation, as in `stf_target`.
        return_lse: also return lse_i = log sum_j exp(-||x_i - r_j||^2 / (2 sigma_i^2)), shape (B,).

    Returns mu with x's shape and dtype (and lse in the compute dtype if asked), equal to
    `stf_target(x, sigma, torch.cat(all shards))` up to rounding. Arithmetic is float32 for
    float16/bfloat16/float32 inputs and float64 for float64 inputs.
    """
    B, n_local, D = check_queries_and_refs(x, ref_shard, "ref_shard", "n_local")
    dtype = compute_dtype(x.dtype)
    sig = check_sigma(sigma, B, x, dtype)
    check_chunk_and_precision(chunk_size, precision, dtype, B, max(n_local, 1), D, x.device)
    name = registry.backend_for("stf_target", x.device, backend, precision, dtype)
    _deprecated_norms(ref_sqnorm, n_local)
    world, rank = _check_collective(x, sigma, ref_shard, group)
    all_sizes = _sizes_of_every_process(B, n_local, D, x.device, group)
    B_max = max(b for b, _, _ in all_sizes)
    chunk = check_chunk_and_precision(chunk_size, precision, dtype, world * B_max, max(n_local, 1), D)

    x2 = x.detach().reshape(B, D).to(dtype)
    xs = _all_gather_padded(x2, B, B_max, world, group)  # (world B_max, D)
    sigmas = _all_gather_padded(sig, B, B_max, world, group)  # (world B_max,)
    shard = ref_shard.detach().reshape(n_local, D).to(dtype).contiguous()
    merged = _merge_across(_shard_state(xs, sigmas, shard, chunk, name, precision), sigmas, group)

    rows = slice(rank * B_max, rank * B_max + B)
    mine = stf_reference.State(*(v[rows] for v in (merged.m, merged.l, merged.l2, merged.t, merged.a, merged.arg)))
    # In full distances and absolute coordinates: the level is m itself and the centre is 0.
    mu, lse, _ = stf_reference.finalize(mine, torch.zeros_like(xs[0]), sig, mine.m)
    mu = mu.reshape(x.shape).to(x.dtype)
    return (mu, lse) if return_lse else mu

"""The stable target (Xu et al., ICLR 2023; docs/math.md section 1) as one registered op family
with autograd: the public `stf_target` and `stf_score`, their input checks and the op pair
`cdm_kernels::stf_forward` / `stf_backward` (the layers: docs/contributing.md).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import registry, stf_reference
from ._ext import module as _ext_module
from .checks import check_float, compute_dtype
from .contract import AUX_COLS, AUX_DBAR, AUX_NEFF, AUX_WMAX
from .level_status import KERNEL_CHECKED, STF_TARGET, status_of
from .registry import PRECISIONS

_EXT = _ext_module()

__all__ = [
    "PRECISIONS",
    "STFStats",
    "default_chunk_size",
    "ref_sqnorm",
    "stf_score",
    "stf_target",
]


def default_chunk_size(batch: int, n: int, dim: int) -> int:
    """References per chunk: large enough for efficient matrix products, small enough that the
    (B, chunk) distance tile and the (chunk, D) slice stay a small fraction of the inputs' memory.
    Up to twice that when it makes the whole set one chunk: a chunk costs about eight launches on a
    GPU, about as much host time as its products take at a small batch (about 30 us at B = 64,
    c = 2048, D = 3072 in float32 on an H200)."""
    budget = 1 << 22  # elements of the (B, chunk) tile
    chunk = max(256, min(2048, budget // max(batch, 1)))
    if n <= 2 * chunk and batch * n <= budget:
        return max(1, n)
    return max(1, min(n, chunk))


def keeps_distances(batch: int, n: int, dim: int, chunk_size: int, keep_distances: bool | None = None) -> bool:
    """Whether a forward that records a gradient keeps its B x n distances for the backward:
    `keep_distances` when given, else where they take no more memory than the streaming itself,
    B n <= (B + chunk) D."""
    return batch * n <= (batch + chunk_size) * dim if keep_distances is None else keep_distances


# ----------------------------------------------------------------------------------------------
# The registered ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("cdm_kernels::stf_forward", mutates_args=())
def _stf_forward(
    x: Tensor, sigma: Tensor, ref: Tensor, centre: Tensor, chunk_size: int, precision: str, keep: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"cdm_kernels::stf_forward has no kernel for device type {x.device.type!r}")


@torch.library.custom_op("cdm_kernels::stf_backward", mutates_args=())
def _stf_backward(
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
    precision: str,
    ref_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"cdm_kernels::stf_backward has no kernel for device type {x.device.type!r}")


registry.register_device_kernels(_stf_forward, "stf_target", "stf_forward")
registry.register_device_kernels(_stf_backward, "stf_target", "stf_backward")


@_stf_forward.register_fake
def _(x, sigma, ref, centre, chunk_size, precision, keep, backend):
    B = x.shape[0]
    return torch.empty_like(x), x.new_empty(B), x.new_empty(B, AUX_COLS), x.new_empty(B * ref.shape[0] if keep else 0)


@_stf_backward.register_fake
def _(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, precision, ref_grad, backend):
    grad_ref = torch.empty_like(ref) if ref_grad else ref.new_empty(0)
    return torch.empty_like(x), torch.empty_like(sigma), grad_ref


def _setup_context(ctx, inputs, output):
    x, sigma, ref, centre, chunk_size, precision, keep, backend = inputs
    mu, _, aux, dist = output
    ctx.save_for_backward(x, sigma, ref, centre, mu, aux, dist)
    ctx.chunk_size, ctx.precision, ctx.backend = chunk_size, precision, backend
    ctx.mark_non_differentiable(aux, dist)


def _backward(ctx, grad_mu, grad_lse, _grad_aux, _grad_dist):
    x, sigma, ref, centre, mu, aux, dist = ctx.saved_tensors
    grad_mu = torch.zeros_like(mu) if grad_mu is None else grad_mu.contiguous()
    grad_lse = torch.zeros_like(sigma) if grad_lse is None else grad_lse.contiguous()
    ref_grad = ctx.needs_input_grad[2]
    gx, gs, gr = _stf_backward(
        grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, ctx.chunk_size, ctx.precision, ref_grad, ctx.backend
    )
    # The centre is a constant: the distances do not depend on it.
    return gx, gs, (gr if ref_grad else None), None, None, None, None, None


_stf_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


class STFStats(NamedTuple):
    """Weight diagnostics of each query row (docs/math.md section 1): all of shape (B,), in the compute dtype."""

    n_eff: Tensor  # effective number of references 1 / sum_j w_ij^2, in [1, n]
    w_max: Tensor  # the largest weight max_j w_ij, in [1/n, 1]
    d_bar: Tensor  # the weighted mean squared distance sum_j w_ij ||x_i - r_j||^2


def ref_sqnorm(ref: Tensor) -> Tensor:
    """||r_j||^2 of a reference set (n, *S) -> (n,), in the compute dtype of `stf_target`.

    Deprecated: `stf_target` no longer takes precomputed norms. Its kernels compute the norms of the
    centred references (r_j - c) while each chunk is in cache, which the exact distances need."""
    warnings.warn(
        "cdm_kernels.ref_sqnorm is deprecated: stf_target computes the norms of the centred references "
        "in its pass and no longer takes precomputed ones",
        DeprecationWarning,
        stacklevel=2,
    )
    check_float(ref, "ref")
    r = ref.detach().reshape(ref.shape[0], -1).to(compute_dtype(ref.dtype))
    return (r * r).sum(1)


def check_sigma(sigma, B: int, x: Tensor, dtype: torch.dtype, on_device: bool = False) -> Tensor:
    """sigma as a contiguous (B,) tensor of `dtype` on x's device, from a float, (B,) or (B, 1, ..., 1);
    raises a ValueError naming the first sample whose noise level is not positive and finite. With
    `on_device` (a GPU kernel will run), a tensor's values are checked on the device instead
    (cdm_kernels/level_status.py: NaN for a bad sample, the error at a later call, no sync)."""
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        return torch.full((B,), float(sigma), dtype=dtype, device=x.device)
    check_float(sigma, "sigma")
    if sigma.device != x.device:
        raise ValueError(f"sigma is on {sigma.device} but x is on {x.device}; put them on one device")
    if sigma.dim() == 0:
        sigma = sigma.expand(B)
    elif sigma.shape[0] != B or sigma.numel() != B:
        raise ValueError(
            f"sigma must have shape (B,) or (B, 1, ..., 1) with B = {B} (x.shape[0]), or be a float; "
            f"got shape {tuple(sigma.shape)}"
        )
    sigma = sigma.reshape(B).to(dtype).contiguous()
    if torch.compiler.is_compiling() or B == 0:
        return sigma
    if on_device:
        checked = status_of(x.device).check(STF_TARGET, sigma.detach())
        return sigma + (checked - sigma).detach() if sigma.requires_grad else checked  # + 0 or NaN
    # One host sync, on purpose: a non-positive or non-finite noise level gives silently wrong targets.
    # On the CPU the common case, every level valid, is one pass in C++ (1 us; the reductions below
    # took 20 us); the message is only worked out when something is wrong.
    if sigma.device.type == "cpu" and type(sigma) is Tensor and _EXT is not None:
        if _EXT.rollout_levels_valid(sigma.detach(), None, False):
            return sigma
    bad = ~(torch.isfinite(sigma) & (sigma > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"sigma must be positive and finite for every sample; sigma[{i}] = {sigma[i].item()}")
    return sigma


def check_queries_and_refs(x, ref, ref_name: str = "ref", rows: str = "n") -> tuple[int, int, int]:
    """User-facing checks of x (B, *S) against references (`rows`, *S); returns (B, n, D)."""
    check_float(x, "x")
    check_float(ref, ref_name)
    if x.dim() < 1:
        raise ValueError("x must have shape (B, *S) with at least one dimension, got a 0-d tensor")
    if ref.device != x.device:
        raise ValueError(f"{ref_name} is on {ref.device} but x is on {x.device}; put them on one device")
    if ref.dtype != x.dtype:
        raise TypeError(f"{ref_name} has dtype {ref.dtype} but x has dtype {x.dtype}; they must match")
    if ref.dim() < 1 or tuple(ref.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"{ref_name} must have shape ({rows}, *S) with the trailing shape S = {tuple(x.shape[1:])} of x; "
            f"got {ref_name}.shape = {tuple(ref.shape)}"
        )
    return x.shape[0], ref.shape[0], math.prod(x.shape[1:])


def check_chunk_and_precision(chunk_size, precision, dtype: torch.dtype, B: int, n: int, D: int,
                              device: torch.device | None = None) -> int:
    """The chunk size to use (None picks one) after the user-facing checks of both options (with
    `device`, also that a CUDA device has the bf16 tensor cores "bf16" multiplies on)."""
    if dtype == torch.float64 and precision != "ieee" and precision in PRECISIONS:
        raise ValueError(
            f"precision {precision!r} rounds float32 operands for the tensor cores; float64 inputs take only 'ieee'"
        )
    if precision == "bf16" and device is not None and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            raise ValueError(
                f"precision 'bf16' multiplies bfloat16 operands on bf16 tensor cores, which need compute capability "
                f"8.0 or higher; {device} has {cap[0]}.{cap[1]}: use 'ieee', 'tf32x3' or 'tf32'"
            )
    if chunk_size is None:
        return default_chunk_size(B, n, D)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _deprecated_norms(norms, n: int) -> None:
    if norms is None:
        return
    if not isinstance(norms, Tensor) or tuple(norms.shape) != (n,):
        got = tuple(norms.shape) if isinstance(norms, Tensor) else type(norms).__name__
        raise ValueError(f"ref_sqnorm must be a tensor of shape (n,) = ({n},), got {got}")
    warnings.warn(
        "stf_target's ref_sqnorm is deprecated and ignored: the kernels compute the norms of the centred "
        "references (r_j - c) in their pass, which the exact distances need",
        DeprecationWarning,
        stacklevel=3,
    )


def stf_target(
    x: Tensor,
    sigma: Tensor | float,
    ref: Tensor,
    *,
    return_lse: bool = False,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    precision: str = "ieee",
    keep_distances: bool | None = None,
    ref_sqnorm: Tensor | None = None,
):
    """The stable target mu_i = sum_j w_ij r_j, w_i = softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)).

    The distances are computed from operands shifted by a centre inside the references (docs/math.md,
    "Exact distances"), so the result keeps its digits wherever the data sit, and the softmax state
    is streamed in distance space, so a sigma whose 1/sigma^2 overflows gives the nearest-reference
    limit.

    Args:
        x: noisy samples, shape (B, *S), float16/bfloat16/float32/float64.
        sigma: noise level per sample, > 0 and finite: shape (B,), (B, 1, ..., 1) or a float.
        ref: references, shape (n, *S), n >= 1, same dtype and device as x.
        return_lse: also return lse_i = log sum_j exp(-||x_i - r_j||^2 / (2 sigma_i^2)), shape (B,),
            in the compute dtype (float32, or float64 for float64 inputs; it can exceed float16's range).
        return_stats: also return `STFStats` (n_eff, w_max, d_bar) from the same pass.
        chunk_size: references per streaming chunk (memory O((B + chunk) D)); None picks one.
        backend: "auto", "reference", "cpu", "triton" or "cuda";
            `cdm_kernels.resolve_backend("stf_target", device, backend, precision)` tells which "auto" picks.
        precision: "ieee" (exact float32/float64 products, the default), or on the GPU backends
            "tf32x3" (three TF32 products, float32-grade), "tf32" or "bf16" (tensor-core products,
            float32 accumulation; errors are tabulated in the README). float64 takes "ieee" only.
        keep_distances: when a gradient will be taken, whether the forward keeps its B x n reduced
            distances for the backward, which then does two of its three matrix products (forward +
            backward: four products instead of five, as eager autograd). None (the default) keeps
            them where they take no more memory than the streaming itself, B n <= (B + chunk) D, so
            memory stays O((B + chunk) D); True keeps them whatever n (B n more elements); False
            never. No effect without a gradient to record.
        ref_sqnorm: deprecated and ignored (the kernels compute the norms they need).

    Returns mu with x's shape and dtype, then lse and stats if asked for, as a tuple.
    Arithmetic is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs.
    Differentiable in x, sigma and ref (docs/math.md, "Gradients").
    """
    B, n, D = check_queries_and_refs(x, ref)
    if n == 0:
        raise ValueError("ref is empty: the stable target needs at least one reference (n >= 1)")
    if keep_distances is not None and not isinstance(keep_distances, bool):
        raise ValueError(f"keep_distances must be None, True or False, got {keep_distances!r}")
    dtype = compute_dtype(x.dtype)
    chunk_size = check_chunk_and_precision(chunk_size, precision, dtype, B, n, D, x.device)
    name = registry.backend_for("stf_target", x.device, backend, precision, dtype)
    sig = check_sigma(sigma, B, x, dtype, on_device=name in KERNEL_CHECKED)
    _deprecated_norms(ref_sqnorm, n)
    x2 = x.reshape(B, D).to(dtype).contiguous()
    r2 = ref.reshape(n, D).to(dtype).contiguous()
    if B == 0:
        mu = x2.new_zeros(x2.shape) + 0 * x2  # keeps x in the graph
        lse, aux = x2.new_zeros(0), x2.new_zeros(0, AUX_COLS)
    else:
        args = (x2, sig, r2, stf_reference.centre_of(r2.detach()), chunk_size, precision)
        if registry.plain_call(args):  # nothing for autograd to record: the launcher, without the op's dispatch
            mu, lse, aux, _ = registry.launchers("stf_target", name, x.device.type).stf_forward(*args, False)
        else:
            grad = torch.is_grad_enabled() and (x2.requires_grad or sig.requires_grad or r2.requires_grad)
            keep = grad and keeps_distances(B, n, D, chunk_size, keep_distances)
            mu, lse, aux, _ = _stf_forward(*args, keep, name)
    out = [mu.reshape(x.shape).to(x.dtype)]
    if return_lse:
        out.append(lse)
    if return_stats:
        out.append(STFStats(aux[:, AUX_NEFF], aux[:, AUX_WMAX], aux[:, AUX_DBAR]))
    return out[0] if len(out) == 1 else tuple(out)


def stf_score(x: Tensor, sigma: Tensor | float, ref: Tensor, **kwargs) -> Tensor:
    """The stable target in score form, (mu_i - x_i) / sigma_i^2, with x's shape and dtype.

    Takes the arguments of `stf_target` (return_lse and return_stats are not accepted here)."""
    for key in ("return_lse", "return_stats"):
        if kwargs.get(key):
            raise ValueError(f"stf_score does not take {key}; call stf_target for it")
    mu = stf_target(x, sigma, ref, **kwargs)
    B = x.shape[0]
    if isinstance(sigma, Tensor):
        s = sigma.reshape(B, *([1] * (x.dim() - 1))) if sigma.dim() else sigma
    else:
        s = sigma
    return ((mu - x) / (s * s)).to(x.dtype)

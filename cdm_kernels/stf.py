"""The stable target (Xu et al., ICLR 2023; math.md section 1) as one registered op with autograd.

Layers, the same for every op of the package:
  kernel    csrc/cpu/stf.cpp, csrc/cuda/stf.cu, cdm_kernels/triton/stf.py, stf_reference.py
  launcher  the per-backend forward/backward functions registered with `register_backend`
  op        `cdm_kernels::stf_forward` / `cdm_kernels::stf_backward` (torch.library: one schema each,
            a kernel per device type, a fake implementation, and the autograd formula)
  public    `stf_target`, `stf_score` below: input checks, shapes, dtypes, backend choice.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import stf_reference
from ._ext import has_cpu_kernels, has_cuda_kernels

__all__ = [
    "STFStats",
    "available_backends",
    "default_chunk_size",
    "ref_sqnorm",
    "register_backend",
    "resolve_backend",
    "stf_score",
    "stf_target",
]

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
# "auto" takes the first of these that is registered for the tensors' device type.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class _Backend(NamedTuple):
    forward: Callable
    backward: Callable
    precisions: tuple[str, ...]


# "ieee": exact float32 (or float64) products. "tf32" / "bf16": matrix products on TF32 / bfloat16
# tensor cores with float32 accumulation (GPU backends); the softmax arithmetic stays float32.
PRECISIONS = ("ieee", "tf32", "bf16")


_BACKENDS: dict[tuple[str, str], _Backend] = {}


def register_backend(
    name: str, device_type: str, forward: Callable, backward: Callable, precisions: tuple[str, ...] = ("ieee",)
) -> None:
    """Registers a launcher pair for (`name`, `device_type`).

    forward(x, sigma, ref, ref_sqnorm, chunk_size, precision) -> (mu, lse, aux), with x (B, D),
    sigma (B,), ref (n, D), ref_sqnorm (n,), all contiguous and of one float dtype (float32 or
    float64), and aux (B, 4) = [zlse, d_bar, n_eff, w_max] (stf_reference.AUX_*).
    backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad)
    -> (grad_x, grad_sigma, grad_ref), grad_ref of shape (0,) unless ref_grad.
    precision is one of PRECISIONS; a launcher that does not support the one asked for raises
    ValueError naming it. `supported_precisions` lists what each backend accepts.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"precisions must be among {PRECISIONS}, got {bad}")
    _BACKENDS[(name, device_type)] = _Backend(forward, backward, tuple(precisions))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device`, in the order "auto" prefers them."""
    device_type = torch.device(device).type
    order = _AUTO_ORDER.get(device_type, ("reference",))
    extra = [name for (name, dt) in _BACKENDS if dt == device_type and name not in order]
    return [name for name in (*order, *extra) if (name, device_type) in _BACKENDS]


def resolve_backend(device: torch.device | str = "cpu", backend: str = "auto", precision: str = "ieee") -> str:
    """The backend that `stf_target(..., backend=backend, precision=precision)` uses for tensors on
    `device`. "auto" takes the first backend of the device type's preference order that supports
    `precision`: on a GPU "cuda" (ieee only), then "triton" (ieee, tf32, bf16), then "reference"."""
    device_type = torch.device(device).type
    if backend == "auto":
        names = available_backends(device)
        if not names:
            raise RuntimeError(f"no stable-target backend is registered for device type {device_type!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        # Only the preference order: a backend registered beyond it (the Triton interpreter on the
        # CPU) is a test vehicle, never an automatic choice.
        order = _AUTO_ORDER.get(device_type)
        names = [name for name in names if order is None or name in order]
        fit = [name for name in names if precision in _BACKENDS[(name, device_type)].precisions]
        if not fit:
            have = ", ".join(f"{name}: {_BACKENDS[(name, device_type)].precisions}" for name in names)
            raise ValueError(
                f"precision {precision!r} is not supported by any backend that 'auto' picks for {device_type} "
                f"tensors ({have}); tf32/bf16 are modes of the 'triton' backend on a GPU"
            )
        return fit[0]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    if (backend, device_type) not in _BACKENDS:
        raise ValueError(
            f"backend {backend!r} is not available for {device_type} tensors "
            f"(available: {available_backends(device)})"
        )
    return backend


def default_chunk_size(batch: int, n: int, dim: int) -> int:
    """References per chunk: large enough for efficient matrix products, small enough that the
    (B, chunk) logit tile and the (chunk, D) slice stay a small fraction of the inputs' memory."""
    budget = 1 << 22  # elements of the (B, chunk) tile
    chunk = max(256, min(2048, budget // max(batch, 1)))
    return max(1, min(n, chunk))


# ----------------------------------------------------------------------------------------------
# The registered ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("cdm_kernels::stf_forward", mutates_args=())
def _stf_forward(
    x: Tensor, sigma: Tensor, ref: Tensor, ref_sqnorm: Tensor, chunk_size: int, backend: str, precision: str
) -> tuple[Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"cdm_kernels::stf_forward has no kernel for device type {x.device.type!r}")


@torch.library.custom_op("cdm_kernels::stf_backward", mutates_args=())
def _stf_backward(
    grad_mu: Tensor,
    grad_lse: Tensor,
    x: Tensor,
    sigma: Tensor,
    ref: Tensor,
    ref_sqnorm: Tensor,
    mu: Tensor,
    aux: Tensor,
    chunk_size: int,
    backend: str,
    precision: str,
    ref_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"cdm_kernels::stf_backward has no kernel for device type {x.device.type!r}")


def _register_device_kernels(device_type: str) -> None:
    def forward(x, sigma, ref, ref_sqnorm, chunk_size, backend, precision):
        return _BACKENDS[(backend, device_type)].forward(x, sigma, ref, ref_sqnorm, chunk_size, precision)

    def backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, backend, precision, ref_grad):
        return _BACKENDS[(backend, device_type)].backward(
            grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad
        )

    _stf_forward.register_kernel(device_type)(forward)
    _stf_backward.register_kernel(device_type)(backward)


for _device_type in ("cpu", "cuda"):
    _register_device_kernels(_device_type)


@_stf_forward.register_fake
def _(x, sigma, ref, ref_sqnorm, chunk_size, backend, precision):
    B = x.shape[0]
    return torch.empty_like(x), x.new_empty(B), x.new_empty(B, 4)


@_stf_backward.register_fake
def _(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, backend, precision, ref_grad):
    grad_ref = torch.empty_like(ref) if ref_grad else ref.new_empty(0)
    return torch.empty_like(x), torch.empty_like(sigma), grad_ref


def _setup_context(ctx, inputs, output):
    x, sigma, ref, ref_sqnorm, chunk_size, backend, precision = inputs
    mu, _, aux = output
    ctx.save_for_backward(x, sigma, ref, ref_sqnorm, mu, aux)
    ctx.chunk_size, ctx.backend, ctx.precision = chunk_size, backend, precision
    ctx.mark_non_differentiable(aux)


def _backward(ctx, grad_mu, grad_lse, _grad_aux):
    x, sigma, ref, ref_sqnorm, mu, aux = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise RuntimeError(
            "stf_target: ref_sqnorm is a cache of ||ref||^2 and takes no gradient; pass it detached "
            "(the gradient of ref already accounts for its norms)"
        )
    grad_mu = torch.zeros_like(mu) if grad_mu is None else grad_mu.contiguous()
    grad_lse = torch.zeros_like(sigma) if grad_lse is None else grad_lse.contiguous()
    ref_grad = ctx.needs_input_grad[2]
    gx, gs, gr = _stf_backward(
        grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, ctx.chunk_size, ctx.backend, ctx.precision, ref_grad
    )
    return gx, gs, (gr if ref_grad else None), None, None, None, None


_stf_forward.register_autograd(_backward, setup_context=_setup_context)

def _ieee_only(backend: str, precision: str) -> None:
    if precision != "ieee":
        raise ValueError(f"precision {precision!r} is not supported by the {backend!r} backend (only 'ieee')")


def _reference_forward(x, sigma, ref, ref_sqnorm, chunk_size, precision):
    _ieee_only("reference", precision)
    return stf_reference.stf_forward(x, sigma, ref, ref_sqnorm, chunk_size)


def _reference_backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad):
    _ieee_only("reference", precision)
    return stf_reference.stf_backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, ref_grad)


register_backend("reference", "cpu", _reference_forward, _reference_backward)
register_backend("reference", "cuda", _reference_forward, _reference_backward)

if has_cpu_kernels():

    def _cpu_forward(x, sigma, ref, ref_sqnorm, chunk_size, precision):
        _ieee_only("cpu", precision)
        return torch.ops.cdm_kernels_C.stf_forward_cpu(x, sigma, ref, ref_sqnorm, chunk_size)

    def _cpu_backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad):
        _ieee_only("cpu", precision)
        return torch.ops.cdm_kernels_C.stf_backward_cpu(
            grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, ref_grad
        )

    register_backend("cpu", "cpu", _cpu_forward, _cpu_backward)

if has_cuda_kernels():
    # csrc/cuda/stf.cu: exact float32/float64 products on CUDA cores (no tensor-core modes).

    def _cuda_forward(x, sigma, ref, ref_sqnorm, chunk_size, precision):
        _ieee_only("cuda", precision)
        return torch.ops.cdm_kernels_C.stf_forward_cuda(x, sigma, ref, ref_sqnorm, chunk_size)

    def _cuda_backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad):
        _ieee_only("cuda", precision)
        return torch.ops.cdm_kernels_C.stf_backward_cuda(
            grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, ref_grad
        )

    register_backend("cuda", "cuda", _cuda_forward, _cuda_backward, precisions=("ieee",))


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


class STFStats(NamedTuple):
    """Weight diagnostics of each query row (math.md): all of shape (B,), in the compute dtype."""

    n_eff: Tensor  # effective number of references 1 / sum_j w_ij^2, in [1, n]
    w_max: Tensor  # the largest weight max_j w_ij, in [1/n, 1]
    d_bar: Tensor  # the weighted mean squared distance sum_j w_ij ||x_i - r_j||^2


def ref_sqnorm(ref: Tensor) -> Tensor:
    """||r_j||^2 of a reference set (n, *S) -> (n,), in the compute dtype of `stf_target`.

    Compute it once for a fixed reference bank and pass it as `stf_target(..., ref_sqnorm=...)`."""
    _check_float(ref, "ref")
    r = ref.detach().reshape(ref.shape[0], -1).to(_compute_dtype(ref.dtype))
    return (r * r).sum(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def _check_sigma(sigma, B: int, x: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        return torch.full((B,), float(sigma), dtype=dtype, device=x.device)
    _check_float(sigma, "sigma")
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
    # One host sync, on purpose: a non-positive or non-finite noise level gives silently wrong targets.
    if not torch.compiler.is_compiling() and B > 0:
        bad = ~(torch.isfinite(sigma) & (sigma > 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sigma must be positive and finite for every sample; sigma[{i}] = {sigma[i].item()}"
            )
    return sigma


def _prepare(x, sigma, ref, chunk_size, backend, ref_norms, precision="ieee"):
    _check_float(x, "x")
    _check_float(ref, "ref")
    if x.dim() < 1:
        raise ValueError("x must have shape (B, *S) with at least one dimension, got a 0-d tensor")
    if ref.device != x.device:
        raise ValueError(f"ref is on {ref.device} but x is on {x.device}; put them on one device")
    if ref.dtype != x.dtype:
        raise TypeError(f"ref has dtype {ref.dtype} but x has dtype {x.dtype}; they must match")
    if tuple(ref.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"ref must have shape (n, *S) with the trailing shape S = {tuple(x.shape[1:])} of x; "
            f"got ref.shape = {tuple(ref.shape)}"
        )
    n = ref.shape[0] if ref.dim() > 0 else 0
    if n == 0:
        raise ValueError("ref is empty: the stable target needs at least one reference (n >= 1)")
    B = x.shape[0]
    dtype = _compute_dtype(x.dtype)
    D = math.prod(x.shape[1:])
    sigma = _check_sigma(sigma, B, x, dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(B, n, D)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    name = resolve_backend(x.device, backend, precision)
    x2 = x.reshape(B, D).to(dtype).contiguous()
    r2 = ref.reshape(n, D).to(dtype).contiguous()
    if ref_norms is None:
        ref_norms = (r2.detach() * r2.detach()).sum(1)
    else:
        if not isinstance(ref_norms, Tensor) or tuple(ref_norms.shape) != (n,):
            got = tuple(ref_norms.shape) if isinstance(ref_norms, Tensor) else type(ref_norms).__name__
            raise ValueError(f"ref_sqnorm must be a tensor of shape (n,) = ({n},), got {got}")
        if ref_norms.device != x.device:
            raise ValueError(f"ref_sqnorm is on {ref_norms.device} but x is on {x.device}")
        ref_norms = ref_norms.to(dtype).contiguous()
    return x2, sigma, r2, ref_norms, chunk_size, name


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
    ref_sqnorm: Tensor | None = None,
):
    """The stable target mu_i = sum_j w_ij r_j, w_i = softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)).

    Args:
        x: noisy samples, shape (B, *S), float16/bfloat16/float32/float64.
        sigma: noise level per sample, > 0 and finite: shape (B,), (B, 1, ..., 1) or a float.
        ref: references, shape (n, *S), n >= 1, same dtype and device as x.
        return_lse: also return lse_i = log sum_j exp(-||x_i - r_j||^2 / (2 sigma_i^2)), shape (B,),
            in the compute dtype (float32, or float64 for float64 inputs; it can exceed float16's range).
        return_stats: also return `STFStats` (n_eff, w_max, d_bar) from the same pass.
        chunk_size: references per streaming chunk (memory O((B + chunk) D)); None picks one.
        backend: "auto", "reference", "cpu", "triton" or "cuda"; `resolve_backend` tells which
            "auto" picks.
        precision: "ieee" (exact float32/float64 products, the default), or on GPU backends "tf32" /
            "bf16" (tensor-core products, float32 accumulation; errors are tabulated in the README).
        ref_sqnorm: optional precomputed ||r_j||^2, shape (n,) (see `ref_sqnorm`), for a fixed bank.

    Returns mu with x's shape and dtype, then lse and stats if asked for, as a tuple.
    Arithmetic is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs.
    Differentiable in x and sigma (math.md, Gradients), and in ref.
    """
    x2, sig, r2, rn, chunk_size, name = _prepare(x, sigma, ref, chunk_size, backend, ref_sqnorm, precision)
    if x2.shape[0] == 0:
        mu = x2.new_zeros(x2.shape) + 0 * x2  # keeps x in the graph
        lse, aux = x2.new_zeros(0), x2.new_zeros(0, 4)
    else:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision not in _BACKENDS[(name, x.device.type)].precisions:
            raise ValueError(
                f"precision {precision!r} is not supported by the {name!r} backend "
                f"(supported: {_BACKENDS[(name, x.device.type)].precisions})"
            )
        mu, lse, aux = _stf_forward(x2, sig, r2, rn.detach(), chunk_size, name, precision)
    out = [mu.reshape(x.shape).to(x.dtype)]
    if return_lse:
        out.append(lse)
    if return_stats:
        cols = stf_reference
        out.append(STFStats(aux[:, cols.AUX_NEFF], aux[:, cols.AUX_WMAX], aux[:, cols.AUX_DBAR]))
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

"""Consistency rollouts (Daras et al. 2023; docs/math.md section 3) and EDM's sampler steps as fused
ops: the public `rollout_step`, `consistency_rollout` and `martingale_loss`, their checks and the
registered ops `cdm_kernels::rollout_step` and `cdm_kernels::martingale_loss` (docs/contributing.md).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from . import registry
from . import rollout_reference as ref
from ._ext import module as _ext_module
from .contract import KINDS
from .level_status import CONSISTENCY_ROLLOUT, KERNEL_CHECKED, status_of
from .random import check_seed_offset, seed_from_generator
from .schedule import edm_schedule, schedule_endpoints, schedule_levels
from .checks import check_float, compute_dtype

__all__ = [
    "KINDS",
    "available_rollout_backends",
    "consistency_rollout",
    "martingale_loss",
    "resolve_rollout_backend",
    "rollout_step",
]

_EXT = _ext_module()


def available_rollout_backends(device: torch.device | str = "cpu") -> list[str]:
    """Alias of `cdm_kernels.available_backends("rollout_step", device)` (the rollout steps and the
    martingale loss have the same backends)."""
    return registry.available_backends("rollout_step", device)


def resolve_rollout_backend(device: torch.device | str = "cpu", backend: str = "auto") -> str:
    """Alias of `cdm_kernels.resolve_backend("rollout_step", device, backend)`."""
    return registry.resolve_backend("rollout_step", device, backend)


# ----------------------------------------------------------------------------------------------
# The registered ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("cdm_kernels::rollout_step", mutates_args=())
def _rollout_step_op(
    x: Tensor,
    denoised: Tensor,
    t_cur: Tensor,
    t_next: Tensor,
    x_euler: Tensor | None,
    denoised_euler: Tensor | None,
    noise: Tensor | None,
    seed: int,
    offset: int,
    kind: str,
    s_noise: float,
    backend: str,
) -> Tensor:
    raise NotImplementedError(f"cdm_kernels::rollout_step has no kernel for {x.device.type!r}")


@torch.library.custom_op("cdm_kernels::martingale_loss", mutates_args=())
def _loss_op(D0: Tensor, D1a: Tensor, D1b: Tensor, y: Tensor, weight: Tensor, lambda_m: float, backend: str) -> Tensor:
    raise NotImplementedError(f"cdm_kernels::martingale_loss has no kernel for {D0.device.type!r}")


@torch.library.custom_op("cdm_kernels::martingale_loss_backward", mutates_args=())
def _loss_backward_op(
    grad: Tensor, D0: Tensor, D1a: Tensor, D1b: Tensor, y: Tensor, weight: Tensor, lambda_m: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    raise NotImplementedError(f"cdm_kernels::martingale_loss_backward has no kernel for {D0.device.type!r}")


registry.register_device_kernels(_rollout_step_op, "rollout_step", "rollout_step")
registry.register_device_kernels(_loss_op, "martingale_loss", "martingale_loss_forward")
registry.register_device_kernels(_loss_backward_op, "martingale_loss", "martingale_loss_backward")


@_rollout_step_op.register_fake
def _(x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed, offset, kind, s_noise, backend):
    return torch.empty_like(x)


@_loss_op.register_fake
def _(D0, D1a, D1b, y, weight, lambda_m, backend):
    return torch.empty_like(D0)


@_loss_backward_op.register_fake
def _(grad, D0, D1a, D1b, y, weight, lambda_m, backend):
    return torch.empty_like(D0), torch.empty_like(D0), torch.empty_like(D0)


def step_coefficients(kind: str, t_cur: Tensor, t_next: Tensor, s_noise: float):
    """Per-sample (B,) partial derivatives of x' for the autograd formula (the step is linear):
    (dx'/dx, dx'/dD, dx'/dx_euler, dx'/dD_euler, dx'/dz); entries that do not apply are None."""
    h = t_next - t_cur
    if kind == "sde":
        g = 2 * h / t_cur
        return 1 + g, -g, None, None, torch.sqrt(2 * h.abs() * t_cur)
    if kind == "euler":
        g = h / t_cur
        return 1 + g, -g, None, None, None
    if kind == "heun":
        a, b = 0.5 * h / t_cur, 0.5 * h / t_next
        return 1 + a, -a, b, -b, None
    return torch.ones_like(t_cur), None, None, None, torch.sqrt(t_next * t_next - t_cur * t_cur) * s_noise


def _step_setup_context(ctx, inputs, output):
    x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed, offset, kind, s_noise, backend = inputs
    ctx.save_for_backward(t_cur, t_next)
    ctx.kind, ctx.s_noise = kind, s_noise


def _step_backward(ctx, grad):
    t_cur, t_next = ctx.saved_tensors
    coefs = step_coefficients(ctx.kind, t_cur, t_next, ctx.s_noise)
    # Inputs 0, 1, 4, 5, 6 are the tensors the step is linear in.
    grads = [None] * 12
    for slot, c in zip((0, 1, 4, 5, 6), coefs):
        if c is not None and ctx.needs_input_grad[slot]:
            grads[slot] = grad * c.unsqueeze(1)
    return tuple(grads)


_rollout_step_op.register_autograd(_step_backward, setup_context=_step_setup_context)


def _loss_setup_context(ctx, inputs, output):
    D0, D1a, D1b, y, weight, lambda_m, backend = inputs
    ctx.save_for_backward(D0, D1a, D1b, y, weight)
    ctx.lambda_m, ctx.backend = lambda_m, backend


def _loss_backward(ctx, grad):
    D0, D1a, D1b, y, weight = ctx.saved_tensors
    grad = grad.contiguous()
    g0, ga, gb = _loss_backward_op(grad, D0, D1a, D1b, y, weight, ctx.lambda_m, ctx.backend)
    w = weight.unsqueeze(1) if weight.dim() == 1 else weight
    gy = -2 * grad * w * (D0 - y) if ctx.needs_input_grad[3] else None
    gw = None
    if ctx.needs_input_grad[4]:
        gw = grad * (D0 - y) ** 2
        gw = gw.sum(1) if weight.dim() == 1 else gw
    return g0, ga, gb, gy, gw, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check_like(t, name: str, x: Tensor, xname: str = "x") -> None:
    check_float(t, name)
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of {xname}, {tuple(x.shape)}; got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {xname} is on {x.device}; put them on one device")


def _real(value, name: str, what: str, ok: Callable[[float], bool]) -> float:
    """A Python float from a real scalar argument (int, float, numpy or 0-d tensor), checked by `ok`."""
    try:
        v = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError, RuntimeError):
        v = None
    if v is None or not ok(v):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def _noise_level(t, name: str, B: int, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-sample level as (B,) in the compute dtype, from a float, a (B,) or a (B, 1, ..., 1)."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((B,), float(t), dtype=dtype, device=x.device)
    check_float(t, name)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")
    if t.dim() == 1 and t.shape[0] == B and t.dtype == dtype:  # the common case, as it is
        return t
    if t.dim() == 0:
        return t.to(dtype).expand(B)
    if t.shape[0] != B or t.numel() != B:
        raise ValueError(
            f"{name} must be a float or have shape (B,) or (B, 1, ..., 1) with B = {B} (x.shape[0]); "
            f"got shape {tuple(t.shape)}"
        )
    return t.reshape(B).to(dtype)


def _levels_to_check(t_cur, tc: Tensor, t_next, tn: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The levels to check: levels all given as numbers, on a device, as one-element CPU tensors
    (nothing to read back), else the (B,) tensors."""
    if isinstance(t_cur, Tensor) or isinstance(t_next, Tensor) or tc.device.type == "cpu":
        return tc, tn
    return (torch.tensor([float(t_cur)], dtype=tc.dtype),
            None if t_next is None else torch.tensor([float(t_next)], dtype=tc.dtype))


def _check_levels(kind: str, t_cur: Tensor, t_next: Tensor | None) -> None:
    # On the host: one sync for levels on a device (the GPU kernels check tensor levels themselves,
    # cdm_kernels/level_status.py): a reversed or non-positive level gives silently wrong samples.
    if torch.compiler.is_compiling() or t_cur.numel() == 0:
        return
    # The common case, every level valid, is one pass in C++ on the CPU (1 us; torch reductions
    # took 6 us, a tenth of a (256, 3, 32, 32) Euler step on 2 cores) and a few reductions and one
    # sync elsewhere; the messages are only worked out when something is wrong.
    if t_cur.device.type == "cpu" and type(t_cur) is Tensor and _EXT is not None:
        if _EXT.rollout_levels_valid(t_cur, t_next, kind == "heun"):
            return
    else:  # Reductions propagate NaN, and every comparison with NaN is false.
        if _levels_valid_by_reductions(kind, t_cur, t_next):
            return
    _raise_bad_levels(kind, t_cur, t_next)


def _levels_valid_by_reductions(kind: str, t_cur: Tensor, t_next: Tensor | None) -> bool:
    lo, hi = torch.aminmax(t_cur)
    if t_next is None:
        lo_v, hi_v = torch.stack((lo, hi)).tolist()
        return lo_v > 0 and hi_v < math.inf
    lo_v, hi_v, next_lo, gap = torch.stack((lo, hi, t_next.min(), (t_cur - t_next).min())).tolist()
    # t_next <= t_cur < inf bounds t_next above; next_lo >= 0 rules out -inf and NaN.
    return lo_v > 0 and hi_v < math.inf and (next_lo > 0 if kind == "heun" else next_lo >= 0) and gap >= 0


def _raise_bad_levels(kind: str, t_cur: Tensor, t_next: Tensor | None) -> None:
    bad = ~(torch.isfinite(t_cur) & (t_cur > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"t_cur must be positive and finite for every sample; t_cur[{i}] = {t_cur[i].item()}")
    if t_next is None:
        return
    ok = torch.isfinite(t_next) & ((t_next > 0) if kind == "heun" else (t_next >= 0))
    bad = ~ok
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        need = "positive (the Heun correction divides by t_next)" if kind == "heun" else "non-negative"
        raise ValueError(f"t_next must be finite and {need} for every sample; t_next[{i}] = {t_next[i].item()}")
    bad = t_next > t_cur
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"a reverse step needs t_next <= t_cur; sample {i} has t_cur = {t_cur[i].item()}, "
            f"t_next = {t_next[i].item()}"
        )


def rollout_step(
    x: Tensor,
    denoised: Tensor | None,
    t_cur,
    t_next=None,
    *,
    kind: str,
    seed: int | None = None,
    offset: int = 0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    x_euler: Tensor | None = None,
    denoised_euler: Tensor | None = None,
    num_steps: int | None = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    backend: str = "auto",
):
    """One reverse-process step of EDM's samplers or of the consistency rollout, fused.

    With h = t_next - t_cur per sample, d = (x - D) / t_cur:

      kind="sde":   x' = x + 2 h d + sqrt(2 |h| t_cur) z         (docs/math.md section 3 step 4)
      kind="euler": x' = x + h d                                  (EDM Euler step)
      kind="heun":  x' = x + h/2 (d + (x_euler - denoised_euler) / t_next)
                    (EDM's 2nd-order correction: `x` and `denoised` = D(x; t_cur) are the state and
                    prediction the Euler step started from, `x_euler` its result, `denoised_euler`
                    = D(x_euler; t_next); t_next > 0.)
      kind="churn": t_hat = t_cur (1 + gamma), gamma = min(S_churn / num_steps, sqrt 2 - 1) when
                    S_min <= t_cur <= S_max else 0; x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise z.
                    `denoised` and `t_next` must be None (a ValueError otherwise); S_min, S_max
                    must not be NaN (+-inf allowed); returns (x_hat, t_hat).

    Args:
        x: state, (B, *S), any float dtype. denoised: D(x; t_cur), same shape/dtype/device.
        t_cur, t_next: per-sample levels, floats or tensors (B,) or (B, 1, ..., 1);
            t_cur > 0 and finite, 0 <= t_next <= t_cur (t_next > 0 for "heun"). Not differentiated.
            Checked before the launch, except tensors on the GPU kernels ("cuda", "triton"): there
            the kernel checks them, without a synchronisation, and a bad sample's row is NaN with
            the ValueError at a later call (cdm_kernels/level_status.py).
        noise: z of x's shape, or None to draw it in the kernel from Philox with `seed` and counters
            offset .. offset + x.numel() - 1 (element (b, j) of the flattened (B, M) state uses
            offset + b M + j; `cdm_kernels.randn(x.shape, seed, offset)` reproduces it).
        seed: Philox key in [0, 2^63); None draws one from `generator` (torch's CPU generator).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns x' with x's shape and dtype (and t_hat (B,) for "churn"). Arithmetic is float32 for
    float16/bfloat16/float32 and float64 for float64. Differentiable in x, denoised, x_euler,
    denoised_euler and noise (the step is linear in them).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have shape (B, *S) with at least one dimension, got a 0-d tensor")
    B, dtype = x.shape[0], compute_dtype(x.dtype)
    name = registry.backend_for("rollout_step", x.device, backend, None, dtype)
    # Tensor levels on a GPU kernel are checked in the kernel (cdm_kernels/level_status.py), and
    # here only what an earlier call recorded is reported; levels given as numbers are checked here.
    on_host = name not in KERNEL_CHECKED or not (isinstance(t_cur, Tensor) or isinstance(t_next, Tensor))
    if not on_host and not torch.compiler.is_compiling():
        status_of(x.device).raise_pending()
    tc = _constant_level(t_cur, "t_cur", B, x, dtype)
    if kind == "churn":
        S_noise = _real(S_noise, "S_noise", "a finite number >= 0", lambda v: 0 <= v < math.inf)
        tn = _churn_t_hat(tc, denoised, t_next, num_steps, S_churn, S_min, S_max)
        if on_host:
            _check_levels(kind, *_levels_to_check(t_cur, tc, None, None))
        denoised = x
    else:
        _check_like(denoised, "denoised", x)
        if t_next is None:
            raise ValueError(f"kind={kind!r} needs t_next")
        tn = _constant_level(t_next, "t_next", B, x, dtype)
        if on_host:
            _check_levels(kind, *_levels_to_check(t_cur, tc, t_next, tn))
    _check_heun_inputs(kind, x, x_euler, denoised_euler)
    seed_v, offset_v = _noise_counters(kind, x, noise, seed, offset, generator)
    out = _launch_step(x, denoised, tc, tn, x_euler, denoised_euler, noise, seed_v, offset_v, kind, S_noise, name)
    return (out, tn.to(x.dtype) if x.dtype != dtype else tn) if kind == "churn" else out


def _constant_level(t, name: str, B: int, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-sample noise level as (B,), refused if it requires grad (levels are constants here)."""
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: rollout_step treats noise levels as constants")
    return _noise_level(t, name, B, x, dtype)


def _churn_t_hat(tc: Tensor, denoised, t_next, num_steps, S_churn, S_min, S_max) -> Tensor:
    """t_hat of EDM's churn after the checks of its arguments."""
    # churn computes its own t_hat and adds noise only: a denoised or t_next passed here would be
    # silently ignored, most likely by a caller who meant another kind.
    if denoised is not None:
        raise ValueError("kind='churn' does not use denoised (x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise z); pass None")
    if t_next is not None:
        raise ValueError("kind='churn' does not use t_next (it returns t_hat = t_cur (1 + gamma)); pass None")
    if num_steps is None or isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"kind='churn' needs num_steps, a positive int (gamma = S_churn / num_steps); got {num_steps!r}")
    # NaN would make every comparison below false and silently turn the churn off (S_min, S_max);
    # inf is meaningful for S_churn (gamma is capped at sqrt 2 - 1) and for S_min, S_max (EDM's
    # default S_max).
    S_churn = _real(S_churn, "S_churn", "a number >= 0 (not NaN)", lambda v: v >= 0)
    S_min = _real(S_min, "S_min", "a number (not NaN; +-inf allowed)", lambda v: not math.isnan(v))
    S_max = _real(S_max, "S_max", "a number (not NaN; +-inf allowed)", lambda v: not math.isnan(v))
    return ref.churn_t_hat(tc, num_steps, S_churn, S_min, S_max)


def _check_heun_inputs(kind: str, x: Tensor, x_euler, denoised_euler) -> None:
    if kind == "heun":
        if x_euler is None or denoised_euler is None:
            raise ValueError("kind='heun' needs x_euler (the Euler step's result) and denoised_euler = D(x_euler; t_next)")
        _check_like(x_euler, "x_euler", x)
        _check_like(denoised_euler, "denoised_euler", x)
    elif x_euler is not None or denoised_euler is not None:
        raise ValueError(f"x_euler and denoised_euler are only for kind='heun', got kind={kind!r}")


def _noise_counters(kind: str, x: Tensor, noise, seed, offset, generator) -> tuple[int, int]:
    """(seed, offset) of the in-kernel noise: (0, 0) for the deterministic steps and passed noise."""
    stochastic = kind in ("sde", "churn")
    if noise is not None:
        if not stochastic:
            raise ValueError(f"noise is only used by kind='sde' or 'churn', got kind={kind!r}")
        _check_like(noise, "noise", x)
        return 0, 0
    if not stochastic:
        return 0, 0
    seed_v = seed_from_generator(generator) if seed is None else seed
    check_seed_offset(seed_v, offset, x.numel(), "rollout_step")
    return seed_v, offset


def _launch_step(x, denoised, tc, tn, x_euler, denoised_euler, noise, seed, offset, kind, s_noise, name) -> Tensor:
    """The step on (B, M) views in the compute dtype, through the op or, in plain eager mode with no
    gradient to record, through its launcher (`registry.plain_call`); x' in x's shape and dtype."""
    B, N = x.shape[0], x.numel()
    M = N // B if B else 0
    dtype = tc.dtype

    def flat(t):
        if t is None:
            return None
        t = t.reshape(B, M)
        return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()

    if N == 0:
        out = x.to(dtype).reshape(B, M)
    else:
        args = (flat(x), flat(denoised), tc.contiguous(), tn.contiguous(), flat(x_euler), flat(denoised_euler),
                flat(noise), seed, offset, kind, float(s_noise))
        if registry.plain_call(args):
            out = registry.launchers("rollout_step", name, x.device.type).rollout_step(*args)
        else:
            out = _rollout_step_op(*args, name)
    out = out.reshape(x.shape)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def consistency_rollout(
    net: Callable,
    x_t: Tensor,
    sigma,
    sigma_min,
    num_steps: int = 6,
    num_trajectories: int = 2,
    labels: Tensor | None = None,
    *,
    rho: float = 7.0,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
):
    """K independent reverse-SDE trajectories from the same x_t (docs/math.md section 3 step 3 and step 4).

    Per sample, the EDM schedule t_0 = sigma .. t_{N-1} = sigma_min (`edm_schedule`, rho); the K
    trajectories run as one batch of K*B under torch.no_grad(), each step
        x <- x + 2 (t_{k+1} - t_k) (x - net(x, t_k, labels)) / t_k + sqrt(2 |t_k - t_{k+1}| t_k) z_k
    for k = 0 .. N-2, with fresh Philox noise (step k uses counters offset + k K x_t.numel() + i).

    Args:
        net: EDM denoiser, called as net(x, sigma, labels) with x (K*B, *S), sigma (K*B, 1, ..., 1)
            in x's dtype and labels repeated K times (None stays None: unconditional nets work).
        x_t: start states (B, *S). sigma, sigma_min: floats or (B,)/(B, 1, ..., 1) tensors,
            0 < sigma_min <= sigma.
        num_steps: schedule length N >= 2 (N - 1 network evaluations per trajectory).
        num_trajectories: K >= 1.
        labels: optional (B, ...) conditioning, repeated K times along the batch.
        seed / generator / offset: the Philox noise (see `rollout_step`).

    Returns (x_final, sigma_final): x_final (K, B, *S) in x_t's dtype, and sigma_final (B,), the
    schedule's last level (sigma_min), at which D(x_final; sigma_final) is to be evaluated.
    """
    check_float(x_t, "x_t")
    if x_t.dim() < 1:
        raise ValueError("x_t must have shape (B, *S), got a 0-d tensor")
    if isinstance(num_trajectories, bool) or not isinstance(num_trajectories, int) or num_trajectories < 1:
        raise ValueError(f"num_trajectories must be a positive int, got {num_trajectories!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (the schedule includes both endpoints), got {num_steps!r}")
    B, K = x_t.shape[0], num_trajectories
    name = registry.backend_for("rollout_step", x_t.device, backend, None, compute_dtype(x_t.dtype))
    t = _rollout_schedule(x_t, sigma, sigma_min, num_steps, rho, name)  # (B, N)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dim() < 1 or labels.shape[0] != B:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a tensor with first dimension B = {B}, got {got}")
        labels = labels.repeat(K, *([1] * (labels.dim() - 1)))
    if seed is None:
        seed = seed_from_generator(generator)
    check_seed_offset(seed, offset, (num_steps - 1) * K * x_t.numel(), "consistency_rollout")
    bshape = (K * B,) + (1,) * (x_t.dim() - 1)
    with torch.no_grad():
        x = x_t.detach().unsqueeze(0).expand(K, *x_t.shape).reshape(K * B, *x_t.shape[1:])
        for k in range(num_steps - 1):
            t_cur, t_next = t[:, k].repeat(K), t[:, k + 1].repeat(K)
            D = net(x, t_cur.to(x.dtype).reshape(bshape), labels)
            if not isinstance(D, Tensor) or D.shape != x.shape or D.device != x.device:
                got = f"{tuple(D.shape)} on {D.device}" if isinstance(D, Tensor) else type(D).__name__
                raise ValueError(f"net(x, sigma, labels) must return a tensor of x's shape {tuple(x.shape)} on "
                                 f"{x.device}, got {got}")
            # The levels were checked with the schedule: the step is launched without checks of its own.
            x = _launch_step(x, D.to(x.dtype), t_cur, t_next, None, None, None, seed,
                             offset + k * K * x_t.numel(), "sde", 1.0, name)
    return x.reshape(K, *x_t.shape), t[:, -1]


def _rollout_schedule(x_t: Tensor, sigma, sigma_min, num_steps: int, rho: float, name: str) -> Tensor:
    """The (B, N) schedules of `consistency_rollout` in x_t's compute dtype for backend `name`, the
    endpoints checked on the host (numbers; tensors on the CPU backends) or on the device (tensors on
    a GPU kernel: cdm_kernels/level_status.py, a bad sample's schedule NaN)."""
    B, dtype = x_t.shape[0], compute_dtype(x_t.dtype)
    numbers = not isinstance(sigma, Tensor) and not isinstance(sigma_min, Tensor)
    if numbers:  # checked here; made on the device (a copy from the host would synchronise)
        hi_v = _real(sigma, "sigma", "positive and finite", lambda v: 0 < v < math.inf)
        lo_v = _real(sigma_min, "sigma_min", "positive and finite", lambda v: 0 < v < math.inf)
        if lo_v > hi_v:
            raise ValueError(f"consistency_rollout needs sigma_min <= sigma, got sigma = {hi_v}, sigma_min = {lo_v}")
    hi = _noise_level(sigma, "sigma", B, x_t, torch.float64)
    lo = _noise_level(sigma_min, "sigma_min", B, x_t, torch.float64)
    if not numbers and name not in KERNEL_CHECKED:
        return edm_schedule(hi, lo, num_steps, rho).to(dtype)
    hi64, lo64, _ = schedule_endpoints(hi, lo, num_steps, rho)
    if not numbers and not torch.compiler.is_compiling():
        hi64 = status_of(x_t.device).check(CONSISTENCY_ROLLOUT, hi64, lo64)  # NaN where not valid: NaN schedules
    return schedule_levels(hi64, lo64, num_steps, rho).to(dtype)


def martingale_loss(
    D0: Tensor, D1a: Tensor, D1b: Tensor, y: Tensor, weight, lambda_m: float = 2.0, *, backend: str = "auto"
) -> Tensor:
    """The consistency objective per element (docs/math.md section 3 step 1 and step 6):

        loss = weight (D0 - y)^2 + lambda_m (D1a - D0)(D1b - D0)

    Args:
        D0: D(x_t; sigma), (B, *S). D1a, D1b: D(x_final; sigma_min) of the two trajectories.
        y: clean data. All four of one shape, device and float dtype.
        weight: lambda(sigma), a float or a tensor broadcastable to D0's shape, e.g. (B, 1, 1, 1).
        lambda_m: the martingale term's weight (default 2).

    Returns the unreduced loss with D0's shape and dtype (float32 arithmetic at least). Backward
    (fused): dD0 = 2 w (D0 - y) - lambda_m ((D1a - D0) + (D1b - D0)), dD1a = lambda_m (D1b - D0),
    dD1b = lambda_m (D1a - D0); y and weight get their gradients too.
    """
    check_float(D0, "D0")
    for t, n in ((D1a, "D1a"), (D1b, "D1b"), (y, "y")):
        _check_like(t, n, D0, "D0")
        if t.dtype != D0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but D0 has dtype {D0.dtype}; they must match")
    if isinstance(lambda_m, bool) or not isinstance(lambda_m, (int, float)) or not math.isfinite(lambda_m):
        raise ValueError(f"lambda_m must be a finite number, got {lambda_m!r}")
    if D0.dim() < 1:
        raise ValueError("D0 must have shape (B, *S), got a 0-d tensor")
    dtype = compute_dtype(D0.dtype)
    B = D0.shape[0]
    M = D0[0].numel() if B else 0
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        w = torch.full((B,), float(weight), dtype=dtype, device=D0.device)
    else:
        check_float(weight, "weight")
        if weight.device != D0.device:
            raise ValueError(f"weight is on {weight.device} but D0 is on {D0.device}")
        try:
            shape = torch.broadcast_shapes(weight.shape, D0.shape)
        except RuntimeError:
            shape = None
        if shape != D0.shape:
            raise ValueError(
                f"weight must broadcast to D0's shape {tuple(D0.shape)} (e.g. (B, 1, ..., 1)), got {tuple(weight.shape)}"
            )
        ws = (1,) * (D0.dim() - weight.dim()) + tuple(weight.shape)
        if all(s == 1 for s in ws[1:]):  # one weight per sample: the kernel reads B values
            w = weight.reshape(ws).expand(B, *ws[1:]).reshape(B).to(dtype)
        else:
            w = weight.expand(D0.shape).reshape(B, M).to(dtype)
        w = w.contiguous()
    name = registry.backend_for("martingale_loss", D0.device, backend, None, dtype)

    def flat(t):
        return t.reshape(B, M).to(dtype).contiguous()

    if D0.numel() == 0:
        return (D0 * 0).to(D0.dtype)
    loss = _loss_op(flat(D0), flat(D1a), flat(D1b), flat(y), w, float(lambda_m), name)
    return loss.reshape(D0.shape).to(D0.dtype)

"""Pure-PyTorch reference of the rollout steps and the martingale loss (docs/math.md sections 2 and 3):
the spec every fused backend is tested against, computed in the dtype it is given (float64 to
judge), and the `reference` backend's launchers of the rollout op families.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .random import philox_randn

__all__ = [
    "churn_step",
    "martingale_loss_backward",
    "martingale_loss_forward",
    "rollout_step",
    "churn_t_hat",
    "euler_step",
    "heun_step",
    "martingale_loss",
    "martingale_loss_grads",
    "sde_step",
]


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def sde_step(x: Tensor, denoised: Tensor, t_cur: Tensor, t_next: Tensor, noise: Tensor) -> Tensor:
    """x + 2 (t' - t) (x - D) / t + sqrt(2 |t - t'| t) z, docs/math.md section 3 step 4."""
    t, tn = _per_sample(t_cur, x), _per_sample(t_next, x)
    h = tn - t
    return x + 2 * h * (x - denoised) / t + torch.sqrt(2 * h.abs() * t) * noise


def euler_step(x: Tensor, denoised: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
    """x + (t' - t) d with d = (x - D(x; t)) / t, EDM's Euler step."""
    t, tn = _per_sample(t_cur, x), _per_sample(t_next, x)
    return x + (tn - t) * (x - denoised) / t


def heun_step(
    x: Tensor, denoised: Tensor, x_euler: Tensor, denoised_euler: Tensor, t_cur: Tensor, t_next: Tensor
) -> Tensor:
    """x + (t' - t) (d + d') / 2, d = (x - D(x; t)) / t, d' = (x_e - D(x_e; t')) / t' (t' > 0)."""
    t, tn = _per_sample(t_cur, x), _per_sample(t_next, x)
    d = (x - denoised) / t
    d_prime = (x_euler - denoised_euler) / tn
    return x + (tn - t) * (0.5 * d + 0.5 * d_prime)


def churn_t_hat(t_cur: Tensor, num_steps: int, S_churn: float, S_min: float, S_max: float) -> Tensor:
    """t_hat = t (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1) if S_min <= t <= S_max else 0."""
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
    inside = (t_cur >= S_min) & (t_cur <= S_max)
    return t_cur + torch.where(inside, gamma * t_cur, torch.zeros_like(t_cur))


def churn_step(x: Tensor, t_cur: Tensor, t_hat: Tensor, S_noise: float, noise: Tensor) -> Tensor:
    """x_hat = x + sqrt(t_hat^2 - t^2) S_noise z, EDM's stochastic sampler."""
    t, th = _per_sample(t_cur, x), _per_sample(t_hat, x)
    return x + torch.sqrt(th * th - t * t) * S_noise * noise


def martingale_loss(D0: Tensor, D1a: Tensor, D1b: Tensor, y: Tensor, weight, lambda_m: float = 2.0) -> Tensor:
    """weight (D0 - y)^2 + lambda_m (D1a - D0)(D1b - D0), per element (docs/math.md section 3 step 6)."""
    return weight * (D0 - y) ** 2 + lambda_m * (D1a - D0) * (D1b - D0)


def martingale_loss_grads(grad: Tensor, D0, D1a, D1b, y, weight, lambda_m: float = 2.0):
    """(dL/dD0, dL/dD1a, dL/dD1b) for an incoming gradient `grad`, docs/math.md section 3."""
    ea, eb = D1a - D0, D1b - D0
    g0 = grad * (2 * weight * (D0 - y) - lambda_m * (ea + eb))
    return g0, grad * lambda_m * eb, grad * lambda_m * ea


# ----------------------------------------------------------------------------------------------
# Launchers of the `reference` backend (arguments: cdm_kernels/contract.py)
# ----------------------------------------------------------------------------------------------


def rollout_step(x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed, offset, kind, s_noise):
    """One step of `kind` on (B, M) tensors; noise None draws Philox noise (seed, offset + flat index)."""
    if noise is None and kind in ("sde", "churn"):
        noise = philox_randn(x, list(x.shape), seed, offset).to(x.dtype)
    if kind == "sde":
        return sde_step(x, denoised, t_cur, t_next, noise)
    if kind == "euler":
        return euler_step(x, denoised, t_cur, t_next)
    if kind == "heun":
        return heun_step(x, denoised, x_euler, denoised_euler, t_cur, t_next)
    return churn_step(x, t_cur, t_next, s_noise, noise)


def _row_weight(weight: Tensor) -> Tensor:
    return weight.unsqueeze(1) if weight.dim() == 1 else weight


def martingale_loss_forward(D0, D1a, D1b, y, weight, lambda_m):
    """The loss on (B, M) tensors, weight (B,) per row or (B, M)."""
    return martingale_loss(D0, D1a, D1b, y, _row_weight(weight), lambda_m)


def martingale_loss_backward(grad, D0, D1a, D1b, y, weight, lambda_m):
    """(dL/dD0, dL/dD1a, dL/dD1b) on (B, M) tensors."""
    return martingale_loss_grads(grad, D0, D1a, D1b, y, _row_weight(weight), lambda_m)

"""EDM's rho noise schedule (Karras et al. 2022; docs/math.md section 2), one per sample, as the
consistency rollout needs (docs/math.md section 3 step 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["edm_schedule"]


def _endpoint(v, name: str) -> Tensor:
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape (B,), got {type(v).__name__}")
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {v.dtype}")
        if v.dim() > 1 and v.numel() != v.shape[0]:
            raise ValueError(f"{name} must have shape (B,) or (B, 1, ..., 1), got {tuple(v.shape)}")
        return v.reshape(-1) if v.dim() else v
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return torch.tensor(float(v), dtype=torch.float64)


def edm_schedule(sigma_max, sigma_min, num_steps: int, rho: float = 7.0) -> Tensor:
    """EDM's schedule of `num_steps` noise levels from sigma_max down to sigma_min.

        t_k = (sigma_max^(1/rho) + k/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  k = 0..N-1

    Args:
        sigma_max: first level, a float or a tensor of shape (B,) (or (B, 1, ..., 1)), > 0, finite.
        sigma_min: last level, same forms, 0 < sigma_min <= sigma_max for every sample.
        num_steps: N >= 2 (the number of levels, t_N = 0 is not included).
        rho: the schedule's exponent, > 0 (EDM uses 7).

    Returns:
        (B, N) when either endpoint is a tensor (B from broadcasting the two), else (N,). The dtype
        is float64 if an endpoint tensor is float64, float32 for other tensor endpoints, float64
        when both are floats. Computed in float64 and rounded once; t_0 and t_{N-1} are the
        endpoints exactly. The device is that of the tensor endpoint(s).
    """
    hi64, lo64, out_dtype = schedule_endpoints(sigma_max, sigma_min, num_steps, rho)
    # One host sync, on purpose: a reversed or non-positive schedule gives silently wrong rollouts.
    if not torch.compiler.is_compiling() and hi64.numel() > 0:
        bad = ~(torch.isfinite(hi64) & torch.isfinite(lo64) & (lo64 > 0) & (hi64 >= lo64))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0, 0])
            h, l = hi64.reshape(-1)[i].item(), lo64.reshape(-1)[i].item()
            raise ValueError(
                "edm_schedule needs finite 0 < sigma_min <= sigma_max for every sample; "
                f"sample {i} has sigma_max = {h}, sigma_min = {l}"
            )
    return schedule_levels(hi64, lo64, num_steps, rho).to(out_dtype)


def schedule_endpoints(sigma_max, sigma_min, num_steps: int, rho: float) -> tuple[Tensor, Tensor, torch.dtype]:
    """`edm_schedule`'s checks of everything but the endpoints' values; the endpoints broadcast to
    one shape in float64 on their device, and the schedule's dtype."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (the schedule includes both endpoints), got {num_steps!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")
    hi, lo = _endpoint(sigma_max, "sigma_max"), _endpoint(sigma_min, "sigma_min")
    tensors = [v for v in (sigma_max, sigma_min) if isinstance(v, Tensor)]
    if len(tensors) == 2 and sigma_max.device != sigma_min.device:
        raise ValueError(f"sigma_max is on {sigma_max.device} but sigma_min is on {sigma_min.device}")
    device = tensors[0].device if tensors else torch.device("cpu")
    out_dtype = torch.float64
    if tensors and all(t.dtype != torch.float64 for t in tensors):
        out_dtype = torch.float32
    hi64, lo64 = hi.to(device, torch.float64), lo.to(device, torch.float64)
    try:
        hi64, lo64 = torch.broadcast_tensors(hi64, lo64)
    except RuntimeError:
        raise ValueError(
            f"sigma_max and sigma_min must have one batch size B, got shapes {tuple(hi.shape)} and {tuple(lo.shape)}"
        ) from None
    return hi64, lo64, out_dtype


def schedule_levels(hi64: Tensor, lo64: Tensor, num_steps: int, rho: float) -> Tensor:
    """The float64 levels (hi64.shape + (N,)) between endpoints already checked (or NaN)."""
    k = torch.arange(num_steps, dtype=torch.float64, device=hi64.device) / (num_steps - 1)
    a, b = hi64.unsqueeze(-1) ** (1.0 / rho), lo64.unsqueeze(-1) ** (1.0 / rho)
    t = (a + k * (b - a)) ** rho
    # Pin the endpoints and keep every level inside them: pow(pow(s, 1/rho), rho) is s only to
    # within a few ulps, which could otherwise make t_1 > t_0 when sigma_min = sigma_max.
    lo_, hi_ = lo64.unsqueeze(-1), hi64.unsqueeze(-1)
    t = torch.minimum(torch.maximum(t, lo_), hi_)
    t[..., 0] = hi64
    t[..., -1] = lo64
    return t

"""The launcher contract of every op family: one check per launcher name of what a backend's launcher
may assume of its arguments, called by the registry's wrapper before every launch (the forms:
docs/contributing.md, "What every backend gets from the registry")."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "AUX_COLS",
    "KINDS",
    "martingale_loss_backward",
    "martingale_loss_forward",
    "philox_randn",
    "rollout_step",
    "stf_backward",
    "stf_forward",
]

# Columns of the stable target's per-row auxiliary output (csrc/common.h, AuxColumn): the streamed
# state's level m = min_j delta_ij (the smallest reduced distance, which the backward's weights are
# relative to), log l of the softmax normaliser relative to it, the weighted mean squared distance
# d_bar, the effective number of references n_eff, the largest weight w_max, and the smallest squared
# distance d_min = ||x_i - r_j*||^2 of the nearest reference j*, computed exactly (subtract first).
AUX_M, AUX_LOGL, AUX_DBAR, AUX_NEFF, AUX_WMAX, AUX_DMIN = 0, 1, 2, 3, 4, 5
AUX_COLS = 6
# Kinds of rollout step, in the order of csrc/common.h's StepKind.
KINDS = ("sde", "euler", "heun", "churn")
_FLOATS = (torch.float32, torch.float64)


class ContractError(ValueError):
    """A launcher was called with arguments outside its contract: a bug in the caller, not bad user
    input (the public functions raise those first, with their own messages)."""


def _tensors(where: str, anchor: Tensor, named: tuple[tuple[str, Tensor | None, tuple], ...]) -> torch.device:
    """Each named tensor (None allowed where the shape is None-able) has the anchor's dtype and device,
    is contiguous and has the given shape (-1: any size)."""
    if not isinstance(anchor, Tensor) or anchor.dtype not in _FLOATS:
        got = anchor.dtype if isinstance(anchor, Tensor) else type(anchor).__name__
        raise ContractError(f"{where}: expects float32 or float64 tensors, got {got}")
    dtype, device = anchor.dtype, anchor.device
    for name, t, shape in named:
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device or not t.is_contiguous():
            got = f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}" if isinstance(t, Tensor) else repr(t)
            raise ContractError(f"{where}: {name} must be a contiguous {dtype} tensor on {device}; got {got}")
        got = t.shape
        if len(got) != len(shape):
            raise ContractError(f"{where}: {name} must have shape {shape}, got {tuple(got)}")
        for want, size in zip(shape, got):  # a loop, not any(<generator>): this runs on every launch
            if want != -1 and want != size:
                raise ContractError(f"{where}: {name} must have shape {shape}, got {tuple(got)}")
    return device


def _positive_int(where: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"{where}: {name} must be a positive int, got {value!r}")


def stf_forward(x, sigma, ref, centre, chunk_size, precision, keep) -> torch.device:
    B, D = x.shape if isinstance(x, Tensor) and x.dim() == 2 else (-2, -2)
    n = ref.shape[0] if isinstance(ref, Tensor) and ref.dim() == 2 else -2
    device = _tensors("stf_forward", x, (("x", x, (B, D)), ("sigma", sigma, (B,)), ("ref", ref, (n, D)),
                                         ("centre", centre, (D,))))
    if n < 1:
        raise ContractError(f"stf_forward: ref must hold n >= 1 references, got shape {tuple(ref.shape)}")
    _positive_int("stf_forward", "chunk_size", chunk_size)
    if not isinstance(keep, bool):
        raise ContractError(f"stf_forward: keep must be a bool, got {keep!r}")
    return device


def stf_backward(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, precision,
                 ref_grad) -> torch.device:
    device = stf_forward(x, sigma, ref, centre, chunk_size, precision, False)
    B, D = x.shape
    if not isinstance(dist, Tensor):
        raise ContractError(f"stf_backward: dist must be a tensor ((0,) when nothing was kept), got {dist!r}")
    _tensors("stf_backward", x, (("grad_mu", grad_mu, (B, D)), ("grad_lse", grad_lse, (B,)), ("mu", mu, (B, D)),
                                 ("aux", aux, (B, AUX_COLS)), ("dist", dist, tuple(dist.shape))))
    kept = B * ref.shape[0]
    if dist.dim() != 1 or dist.shape[0] not in (0, kept):  # csrc/contract.h words this the same
        raise ContractError(f"stf_backward: dist must be the forward's kept distances (B n,) = ({kept},) or empty "
                            f"(0,), got {tuple(dist.shape)}")
    return device


def rollout_step(x, denoised, t_cur, t_next, x_euler, denoised_euler, noise, seed, offset, kind, s_noise):
    B, M = x.shape if isinstance(x, Tensor) and x.dim() == 2 else (-2, -2)
    if kind not in KINDS:
        raise ContractError(f"rollout_step: kind must be one of {KINDS}, got {kind!r}")
    if kind == "heun" and (x_euler is None or denoised_euler is None):
        raise ContractError("rollout_step: kind 'heun' needs x_euler and denoised_euler")
    return _tensors("rollout_step", x, (("x", x, (B, M)), ("denoised", denoised, (B, M)), ("t_cur", t_cur, (B,)),
                                        ("t_next", t_next, (B,)), ("x_euler", x_euler, (B, M)),
                                        ("denoised_euler", denoised_euler, (B, M)), ("noise", noise, (B, M))))


def martingale_loss_forward(D0, D1a, D1b, y, weight, lambda_m) -> torch.device:
    B, M = D0.shape if isinstance(D0, Tensor) and D0.dim() == 2 else (-2, -2)
    wshape = (B,) if isinstance(weight, Tensor) and weight.dim() == 1 else (B, M)
    return _tensors("martingale_loss", D0, (("D0", D0, (B, M)), ("D1a", D1a, (B, M)), ("D1b", D1b, (B, M)),
                                            ("y", y, (B, M)), ("weight", weight, wshape)))


def martingale_loss_backward(grad, D0, D1a, D1b, y, weight, lambda_m) -> torch.device:
    device = martingale_loss_forward(D0, D1a, D1b, y, weight, lambda_m)
    _tensors("martingale_loss_backward", D0, (("grad", grad, tuple(D0.shape)),))
    return device


def philox_randn(anchor, shape, seed, offset) -> torch.device:
    if not isinstance(anchor, Tensor):
        raise ContractError(f"philox_randn: anchor must be a tensor on the output's device, got {anchor!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ContractError(f"philox_randn: shape must be a list of non-negative ints, got {shape!r}")
    return anchor.device

"""User-facing argument checks shared by the public functions of every op family, raised before anything
is launched, with messages that name the argument, what it got and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_float", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of the package's ops for inputs of `dtype`: float64 stays float64, every
    other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(t, name: str) -> None:
    """`t` must be a tensor of a floating dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )

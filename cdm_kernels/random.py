"""Counter-based Gaussian noise, Philox 4x32-10 with Box-Muller as Triton's tl.randn (docs/math.md,
"The noise"): the public `randn` and the numpy reference every backend's noise is tested against.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import registry

__all__ = ["check_seed_offset", "philox_randn", "philox_randn_reference", "randn", "seed_from_generator"]

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_M32 = np.uint64(0xFFFFFFFF)
# Triton's uint -> [0, 1) scale: the largest float32 with (2^31 - 1) * scale < 1.
UNIFORM_SCALE = np.float32(4.6566127342e-10)
TWO_PI = np.float32(6.283185307179586)
MAX_COUNTER = (1 << 63) - 1


def check_seed_offset(seed, offset, numel: int, where: str) -> None:
    """Seeds are in [0, 2^63); the counters offset .. offset + numel - 1 must stay below 2^63."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= MAX_COUNTER):
        raise ValueError(f"{where}: seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{where}: offset must be a non-negative int, got {offset!r}")
    if offset + numel > MAX_COUNTER:
        raise ValueError(f"{where}: offset + numel = {offset + numel} exceeds the 2**63 - 1 counter range")


def seed_from_generator(generator: torch.Generator | None = None) -> int:
    """A fresh Philox seed from torch's CPU generator (default: the global one), no device sync."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox 4x32-10 on uint64 numpy arrays holding 32-bit words: the four output words."""
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    A, B = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    for _ in range(10):
        p0, p2 = A * c0, B * c2  # exact: 32 x 32 bits fits in 64
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + np.uint64(PHILOX_KEY_A)) & _M32, (k1 + np.uint64(PHILOX_KEY_B)) & _M32
    return c0, c1, c2, c3


def philox_randn_reference(numel: int, seed: int, offset: int = 0) -> np.ndarray:
    """float32 array of `numel` normals; a direct numpy transcription of Triton's tl.randn."""
    check_seed_offset(seed, offset, numel, "philox_randn_reference")
    idx = np.arange(numel, dtype=np.uint64) + np.uint64(offset)
    zero = np.zeros_like(idx)
    c0, c1, _, _ = philox4x32_10(idx & _M32, idx >> np.uint64(32), zero, zero, seed & 0xFFFFFFFF, seed >> 32)

    def uniform(r):
        s = r.astype(np.uint32).view(np.int32)
        s = np.where(s < 0, ~s, s)
        return s.astype(np.float32) * UNIFORM_SCALE

    u0, u1 = np.maximum(np.float32(1e-7), uniform(c0)), uniform(c1)
    r = np.sqrt(np.float32(-2.0) * np.log(u0))
    return (r * np.cos(TWO_PI * u1)).astype(np.float32)


def philox_randn(anchor: Tensor, shape: list[int], seed: int, offset: int) -> Tensor:
    """The `reference` backend's launcher of op family randn: float32 noise of `shape` on anchor's
    device, element i = (seed, offset + i) (`philox_randn_reference`)."""
    n = int(np.prod(shape)) if shape else 1
    return torch.from_numpy(philox_randn_reference(n, seed, offset)).reshape(shape).to(anchor.device)


# ----------------------------------------------------------------------------------------------
# The registered op: one schema, a kernel per device type, the backend as the last argument.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("cdm_kernels::philox_randn", mutates_args=())
def _philox_randn(anchor: Tensor, shape: list[int], seed: int, offset: int, backend: str) -> Tensor:
    raise NotImplementedError(f"cdm_kernels::philox_randn has no kernel for {anchor.device.type!r}")


@_philox_randn.register_fake
def _(anchor, shape, seed, offset, backend):
    return anchor.new_empty(shape, dtype=torch.float32)


registry.register_device_kernels(_philox_randn, "randn", "philox_randn")


def randn(
    shape,
    seed: int,
    offset: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor:
    """Standard normal noise of `shape` from Philox 4x32-10, element i keyed by (seed, offset + i).

    Identical (to float32 rounding of log/cos) to `tl.randn(seed, offset + arange(numel))` and to
    the noise a fused rollout step draws for x of this shape with the same seed and offset.

    Args:
        shape: output shape (int or sequence of ints).
        seed: int in [0, 2^63): the Philox key.
        offset: first counter, >= 0; consecutive calls that must be independent use disjoint
            counter ranges, e.g. offset += numel.
        device, dtype: of the result (values are float32, then cast).
        backend: "auto", "cpu", "cuda", "triton" or "reference".
    """
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise ValueError(f"randn: shape must be non-negative, got {shape}")
    if not dtype.is_floating_point:
        raise TypeError(f"randn: dtype must be a floating dtype, got {dtype}")
    numel = int(np.prod(shape)) if shape else 1
    check_seed_offset(seed, offset, numel, "randn")
    device = torch.device(device)
    name = registry.backend_for("randn", device, backend, None, torch.float32)
    if numel == 0:
        return torch.empty(shape, device=device, dtype=dtype)
    out = _philox_randn(torch.empty(0, device=device), shape, seed, offset, name)
    return out if dtype == torch.float32 else out.to(dtype)

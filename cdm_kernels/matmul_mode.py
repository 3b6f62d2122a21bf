"""The math mode of torch's float32 products on a GPU for one region of code: exact float32 or TF32,
whatever the user set by either of torch's APIs, and the user's setting restored as it read.

docs/gpu_design.md ("Torch's TF32 switch") says why a region and not a per-call choice.
"""

from __future__ import annotations

import contextlib
import threading

import torch

# One region at a time in this process: two threads' stable targets cannot interleave their set and
# restore (a user's own products on another thread during a region still see its mode).
_LOCK = threading.RLock()


def _matmul():
    return torch.backends.cuda.matmul


def _has_new_api() -> bool:
    return hasattr(torch.backends, "fp32_precision")


def _legacy():
    """torch's legacy flag, or None where reading it raises (the user set the new API's TF32)."""
    try:
        return _matmul().allow_tf32
    except RuntimeError:
        return None


@contextlib.contextmanager
def products(tf32: bool, device: torch.device):
    """torch's float32 products inside run in exact float32 (tf32=False) or on TF32 tensor cores
    (tf32=True) on CUDA devices; elsewhere nothing changes. The setting is written through the new
    API alone (never mixed with the legacy flag, which would make torch raise at the user's next read)
    and restored in `finally`; where the user's state read through the legacy flag, the legacy flag
    reads the same value afterwards too."""
    if device.type != "cuda":
        yield
        return
    m = _matmul()
    with _LOCK:
        if not _has_new_api():  # torch before 2.9: the legacy flag is the only one
            old = m.allow_tf32
            m.allow_tf32 = tf32
            try:
                yield
            finally:
                m.allow_tf32 = old
            return
        matmul, legacy = m.fp32_precision, _legacy()
        # A read gives the resolved value: "none" inherits from the levels above (cudnn's, the
        # generic one). What "none" would read now tells an inherited value from one set here.
        m.fp32_precision = "none"
        inherited = m.fp32_precision == matmul
        m.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = "none" if inherited else matmul
            if legacy is not None and _legacy() != legacy:
                m.allow_tf32 = legacy

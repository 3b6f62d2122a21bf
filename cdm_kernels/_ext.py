"""The compiled extension `cdm_kernels._C`, optional at import (without it the reference and Triton
backends work); `extension_status()` says what it provides and what the GPU backends' self-check found."""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

_C = None
_ERROR: str | None = None

try:  # The import registers the C++ ops under torch.ops.cdm_kernels_C.
    _C = importlib.import_module("cdm_kernels._C")
except ImportError as exc:  # not built, or built against another torch
    _ERROR = f"{type(exc).__name__}: {exc}"


def module():
    """The loaded `cdm_kernels._C` module (its pybind helpers), or None."""
    return _C


def has_cpu_kernels() -> bool:
    """True when the fused C++ CPU kernels are built and loaded."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels (nvcc and a CUDA build of torch)."""
    return _C is not None and bool(_C.built_with_cuda())


def extension_status() -> str:
    """What the extension provides, or why it is absent (the first line); then what the first-use
    self-check of the GPU backends checked, what fell back to the reference and what it could not
    run (cdm_kernels/selfcheck.py), one line each."""
    from . import selfcheck

    if _C is None:
        line = f"cdm_kernels._C not loaded ({_ERROR}); using the reference/triton backends"
    else:
        cuda = f"CUDA kernels for {_C.cuda_archs()}" if _C.built_with_cuda() else "no CUDA kernels"
        line = f"cdm_kernels._C loaded: CPU kernels, {cuda}"
    return "\n".join([line, *selfcheck.status_lines()])

"""cdm_kernels: fused kernels for the stable target (STF) and consistency (CDM) diffusion objectives.

Public API:
    stf_target, stf_score, ref_sqnorm, STFStats   the stable target (math.md section 1)
    resolve_backend, available_backends           which backend runs on a device
    extension_status                              whether the compiled kernels are loaded
"""

import importlib.util

from ._ext import extension_status, has_cpu_kernels, has_cuda_kernels
from .stf import STFStats, available_backends, ref_sqnorm, resolve_backend, stf_score, stf_target

# The Triton backend registers itself when triton is installed (CUDA tensors; CPU tensors too under
# TRITON_INTERPRET=1). Without triton the package runs on its C++ and reference backends.
if importlib.util.find_spec("triton") is not None:
    from . import triton as _triton_backend  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "STFStats",
    "available_backends",
    "extension_status",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "ref_sqnorm",
    "resolve_backend",
    "stf_score",
    "stf_target",
]

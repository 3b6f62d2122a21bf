"""Triton backend of cdm_kernels: registers itself as backend "triton" of the package's ops.

For CUDA tensors always; for CPU tensors too when TRITON_INTERPRET=1 was set before triton was first
imported (then the kernels run for real on the CPU under Triton's interpreter; that is how CI tests
them). Precision modes: "ieee" (exact, the default), "tf32", "bf16".
"""

import os

from .. import stf as _stf
from . import stf

__all__ = ["stf"]


def _forward(x, sigma, ref, ref_sqnorm, chunk_size, precision):
    return stf.stf_forward(x, sigma, ref, ref_sqnorm, chunk_size, precision)


def _backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad):
    return stf.stf_backward(grad_mu, grad_lse, x, sigma, ref, ref_sqnorm, mu, aux, chunk_size, precision, ref_grad)


_stf.register_backend("triton", "cuda", _forward, _backward, precisions=stf.PRECISIONS)
if os.environ.get("TRITON_INTERPRET") == "1":
    _stf.register_backend("triton", "cpu", _forward, _backward, precisions=stf.PRECISIONS)

"""The CUDA stable-target kernels executed on the host: backend "cuda" for CPU tensors, in the tests.

tests/cuda_emulator.cpp runs the launch sequences of csrc/cuda/stf_kernels.h with every thread of
every kernel on the CPU (over the shared arithmetic of csrc/stf_math.h) and plain-loop products in
place of cuBLAS. `launchers()` compiles it once with the system C++ compiler and returns the launcher
pair `stf_forward` / `stf_backward` of the registry's contract, which tests/conftest.py registers as
backend "cuda" for CPU tensors (a test vehicle, like the Triton interpreter: "auto" never picks it).
`reverse_threads(True)` runs every kernel's threads in descending order, to show that no kernel
depends on the order of its threads. `schedule(...)` picks the chunk pipeline's schedule: "one
stream" (the default), or the side stream's shifts overlapping the products with the queued work
run "main first" or "side first" (each stream as far ahead as its waits allow), or "random <seed>"
(a random choice between the streams at every queued item that both could run).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import types

import torch

from cdm_kernels.contract import AUX_COLS
from cdm_kernels.registry import PRECISIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
_ORDER = {"reverse": 0, "schedule": 0}
SCHEDULES = ("one stream", "main first", "side first")  # then "random <seed>", seed >= 1


def available() -> bool:
    return CXX is not None


@functools.lru_cache(maxsize=None)
def _library():
    out = os.path.join(tempfile.mkdtemp(prefix="cdm_cuda_emulator_"), "libcdm_cuda_emu.so")
    cmd = [CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-ffp-contract=off",
           "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "cuda_emulator.cpp"), "-o", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(out)
    for name in ("cdm_emu_forward_f32", "cdm_emu_forward_f64", "cdm_emu_backward_f32", "cdm_emu_backward_f64"):
        getattr(lib, name).restype = ctypes.c_int64
    return lib


def reverse_threads(on: bool) -> None:
    _ORDER["reverse"] = int(on)


def schedule(name: str) -> None:
    if name.startswith("random "):
        _ORDER["schedule"] = len(SCHEDULES) - 1 + int(name.split()[1])
    else:
        _ORDER["schedule"] = SCHEDULES.index(name)


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _suffix(x):
    return "f64" if x.dtype == torch.float64 else "f32"


def _ints(*v):
    return [ctypes.c_int64(int(a)) for a in v]


def stf_forward(x, sigma, ref, centre, chunk_size, precision, keep):
    B, D = x.shape
    n = ref.shape[0]
    mu, lse, aux = torch.empty_like(x), x.new_empty(B), x.new_empty(B, AUX_COLS)
    dist = x.new_full((B * n if keep else 0,), float("nan"))  # NaN, like the workspace: every element is written
    fn = getattr(_library(), "cdm_emu_forward_" + _suffix(x))
    fn(*_ints(B, D, n, chunk_size), ctypes.c_int(PRECISIONS.index(precision)),
       _p(x), _p(sigma), _p(ref), _p(centre), _p(mu), _p(lse), _p(aux), _p(dist if keep else None),
       ctypes.c_int(_ORDER["reverse"]), ctypes.c_int(_ORDER["schedule"]))
    return mu, lse, aux, dist


def stf_backward(grad_mu, grad_lse, x, sigma, ref, centre, mu, aux, dist, chunk_size, precision, ref_grad):
    B, D = x.shape
    grad_x, grad_sigma = torch.empty_like(x), torch.empty_like(sigma)
    grad_ref = torch.empty_like(ref) if ref_grad else ref.new_zeros(0)
    fn = getattr(_library(), "cdm_emu_backward_" + _suffix(x))
    fn(*_ints(B, D, ref.shape[0], chunk_size), ctypes.c_int(PRECISIONS.index(precision)),
       _p(grad_mu), _p(grad_lse), _p(x), _p(sigma), _p(ref), _p(centre), _p(mu), _p(aux),
       _p(dist if dist.numel() else None), _p(grad_x), _p(grad_sigma), _p(grad_ref if ref_grad else None),
       ctypes.c_int(_ORDER["reverse"]), ctypes.c_int(_ORDER["schedule"]))
    return grad_x, grad_sigma, grad_ref


def launchers():
    """The emulated backend's launcher pair (compiles the emulator on first use)."""
    _library()
    return types.SimpleNamespace(stf_forward=stf_forward, stf_backward=stf_backward)

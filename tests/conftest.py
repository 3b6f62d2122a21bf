"""Shared test set-up: the test vehicles of the backend matrix and a seed per test.

The suite is an op x backend matrix over cdm_kernels.registry (tests/matrix.py): every registered
(backend, device type) of an op family is a case; cases on CUDA tensors are marked `gpu` and are
skipped, and reported as skipped, on a machine without a GPU. Two test vehicles run GPU kernels on
CPU tensors, so that the same suite checks them on any machine:

  * the Triton interpreter: without a GPU, TRITON_INTERPRET=1 is set here, before triton is first
    imported, and cdm_kernels.backends then registers backend "triton" for CPU tensors too;
  * the host emulation of the CUDA stable-target kernels (tests/cuda_emulation.py), registered here
    as backend "cuda" for CPU tensors when a C++ compiler is present.

Neither is ever picked by "auto". On a GPU machine the interpreter is off (a process runs Triton
either compiled or interpreted), so the Triton cases run on the GPU instead.
"""

import os

import pytest

try:
    import torch

    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement
    _HAS_GPU = False

if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cuda_emulation  # noqa: E402  (tests/ is on sys.path: this file's folder)

from cdm_kernels import registry  # noqa: E402

if cuda_emulation.available():
    registry.register("cuda", ("cpu",), {"stf_target": "cuda_emulation"}, precisions={"stf_target": registry.PRECISIONS})


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # GPU tests are skipped (and reported as skipped, never as passed) on a machine without a GPU.
    if _HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

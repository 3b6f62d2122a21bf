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


def _interpreter_index_fix():
    """Triton before 3.7 interprets `range(0, n, BLOCK)` over a scalar argument n by int() of the
    one-element array that holds n, which NumPy 2.4 and later refuse ("only 0-dimensional arrays can
    be converted to Python scalars"): every interpreted kernel with such a loop fails. Triton 3.7
    squeezes the array first; this does the same for the older versions (the GPU machine's torch 2.11
    comes with triton 3.6), so that the suite runs on a CPU under either."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch = interpreter._patch_lang_tensor

    def patch_with_squeeze(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_squeeze


_interpreter_index_fix()

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.cdm_call_failed = report.failed


@pytest.fixture(autouse=True)
def _no_level_record_left(request):
    """A bad noise level that a GPU kernel recorded (cdm_kernels.level_status) is raised by the next
    call on its device, which in a test run is the next test's. A test that passes must leave none
    (it raised what it provoked); after one that fails, the record is cleared, so that its failure
    stays its own and does not fail the tests after it."""
    yield
    from cdm_kernels import level_status

    left = []
    for status in list(level_status._STATUS.values()):
        try:
            status.raise_pending(wait=True)
        except ValueError as e:
            left.append(str(e))
    if left and not getattr(request.node, "cdm_call_failed", True):
        pytest.fail("the test left a noise-level record pending: " + "; ".join(left))

"""CMakeLists.txt builds the same sources as setup.py into a module that imports and runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


CUDA_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize(
    "with_cuda",
    [
        False,
        # CI has nvcc and a CUDA build of torch: there the CMake CUDA path must build too (nvcc for
        # sm_80 and sm_90), not only setup.py's; elsewhere the skip says why.
        pytest.param(True, marks=pytest.mark.skipif(not CUDA_BUILD, reason="needs nvcc and a CUDA build of torch")),
    ],
    ids=["cpu", "cuda"],
)
def test_cmake_build_imports_and_matches_reference(tmp_path, with_cuda):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), f"-DCDM_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # A copy of the Python package with the CMake-built module in it, imported in a fresh process.
    pkg = tmp_path / "pkg" / "cdm_kernels"
    shutil.copytree(ROOT / "cdm_kernels", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(build / "_C.so", pkg / "_C.so")
    probe = (
        "import torch, cdm_kernels as c;"
        f"assert c.has_cpu_kernels() and c.has_cuda_kernels() == {with_cuda}, c.extension_status();"
        "x, r = torch.randn(3, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64);"
        "d = (c.stf_target(x, 0.7, r, backend='cpu') - c.stf_target(x, 0.7, r, backend='reference')).abs().max();"
        "assert d < 1e-12, d;"
        # The CUDA ops are registered for the CUDA dispatch key (callable only with a GPU).
        + ("assert torch._C._dispatch_has_kernel_for_dispatch_key('cdm_kernels_C::stf_forward', 'CUDA');"
           if with_cuda else "")
        + "print(c.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(pkg) in out.stdout

"""CMakeLists.txt builds the same sources as setup.py into a module that imports and runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_cpu_build_imports_and_matches_reference(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCDM_WITH_CUDA=OFF",
        f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    # A copy of the Python package with the CMake-built module in it, imported in a fresh process.
    pkg = tmp_path / "pkg" / "cdm_kernels"
    shutil.copytree(ROOT / "cdm_kernels", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(build / "_C.so", pkg / "_C.so")
    probe = (
        "import torch, cdm_kernels as c;"
        "assert c.has_cpu_kernels() and not c.has_cuda_kernels(), c.extension_status();"
        "x, r = torch.randn(3, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64);"
        "d = (c.stf_target(x, 0.7, r, backend='cpu') - c.stf_target(x, 0.7, r, backend='reference')).abs().max();"
        "assert d < 1e-12, d; print(c.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(pkg) in out.stdout

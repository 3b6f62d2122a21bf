#!/usr/bin/env bash
# Sets up .venv (torch 2.14.1, the CUDA 13.0 build, so the nvcc path really builds) and builds
# cdm_kernels from source into it (editable). Safe to re-run: it rebuilds the extension.
# The build log, with nvcc's -Xptxas -v register/spill/shared-memory lines, goes to build/build.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check \
  torch==2.14.1 numpy pytest pybind11 ninja scikit-learn matplotlib tqdm pillow "setuptools>=64" wheel
mkdir -p build
echo "building cdm_kernels (C++ CPU kernels; CUDA kernels when nvcc is present): log in build/build.log"
if ! .venv/bin/pip install --no-build-isolation --no-deps -v -e . > build/build.log 2>&1; then
  tail -n 60 build/build.log
  echo "build failed: see build/build.log" >&2
  exit 1
fi
.venv/bin/python -c "import cdm_kernels; print(cdm_kernels.extension_status())"

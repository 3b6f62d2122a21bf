#!/usr/bin/env bash
# Sets up .venv (torch 2.14.1, the CUDA 13.0 build, so the nvcc path really builds) and builds
# cdm_kernels from source into it (editable). The build log, with nvcc's -Xptxas -v
# register/spill/shared-memory lines, goes to build/build.log.
#
# Re-running it is cheap: after a successful set-up it writes build/setup.stamp, a hash of
# everything the build depends on (the sources under csrc/, setup.py, pyproject.toml, the package
# list below, the Python and torch versions, nvcc, the CDM_* and compiler switches, this checkout's
# path). When the stamp still matches and the installed extension imports from this checkout, the
# pip install and the build are skipped (a few seconds, mostly importing torch); any change
# redoes both, the build from scratch (about 75 s with nvcc). CDM_REBUILD=1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
PACKAGES=(torch==2.14.1 numpy pytest pybind11 ninja scikit-learn matplotlib tqdm pillow "setuptools>=64" wheel)
STAMP=build/setup.stamp

stamp() {
  {
    echo "packages: ${PACKAGES[*]}"
    echo "checkout: $ROOT"
    .venv/bin/python -c 'import sys; print("python:", sys.version)' || echo "python: none"
    .venv/bin/python -c 'import importlib.metadata as m; print("torch:", m.version("torch"))' 2>/dev/null || echo "torch: none"
    echo "nvcc: $(command -v nvcc || true) $( (nvcc --version 2>/dev/null || true) | tail -n 1)"
    env | grep -E '^(CDM_SKIP_BUILD|CDM_FORCE_CPU|CDM_CUDA_ARCHS|CUDA_HOME|CC|CXX|CFLAGS|CXXFLAGS|LDFLAGS)=' | sort || true
    find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d ' ' -f 1
}

installed() {
  # The package .venv imports from outside the checkout is this checkout's, with its extension
  # (unless CDM_SKIP_BUILD=1 asked for none); prints extension_status().
  (cd / && "$ROOT/.venv/bin/python" - "$ROOT/cdm_kernels" <<'EOF'
import os, sys
import cdm_kernels
here = os.path.dirname(os.path.abspath(cdm_kernels.__file__))
if here != sys.argv[1]:
    sys.exit(f"cdm_kernels is installed from {here}, not from {sys.argv[1]}")
if os.environ.get("CDM_SKIP_BUILD") != "1":
    import cdm_kernels._C  # noqa: F401
print(cdm_kernels.extension_status())
EOF
  )
}

if [ "${CDM_REBUILD:-0}" != 1 ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$(stamp)" ] && status=$(installed 2>/dev/null); then
  echo "cdm_kernels is up to date, set-up and build skipped (nothing they depend on changed since $STAMP): $status"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
mkdir -p build
rm -f "$STAMP"
.venv/bin/pip install -q --disable-pip-version-check "${PACKAGES[@]}"
echo "building cdm_kernels (C++ CPU kernels; CUDA kernels when nvcc is present): log in build/build.log"
if ! .venv/bin/pip install --no-build-isolation --no-deps -v -e . > build/build.log 2>&1; then
  tail -n 60 build/build.log
  echo "build failed: see build/build.log" >&2
  exit 1
fi
installed
stamp > "$STAMP"

#!/usr/bin/env bash
# The way to check cdm_kernels on a machine with an NVIDIA GPU, in one command (under 8 minutes on
# an H200 is the aim):
#
#   bash scripts/gpu_check.sh [--out DIR] [--skip-build] [--train-step]
#
#   1. build the extension in place for the GPU present (CDM_CUDA_ARCHS from its compute capability)
#   2. the GPU suite: python -m pytest -m gpu tests
#   3. compute-sanitizer memcheck, racecheck and synccheck of every GPU kernel, forward and backward,
#      at small odd shapes (scripts/gpu_sanitize_probe.py)
#   4. the GPU targets benchmark (python -m benchmarks.gpu_targets): CSV, markdown and plot
#   5. with --train-step, also the training-step benchmark on the GPU (several minutes more)
#
# Uses the Python in $PYTHON, else .venv/bin/python when the checkout has one, else python3, with
# the torch, triton, pytest and pybind11 it has (nothing is installed). Writes build.log, tests.log,
# sanitizer.log, gpu_targets.{csv,md,png}, verdicts.md (and train_step.{csv,md,png}) into the folder
# named by --out, else by $CDM_GPU_CHECK_OUT, else out/gpu_check/ in the checkout (ignored by git).
# Prints a verdict table last; the exit status is 1 when a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${CDM_GPU_CHECK_OUT:-out/gpu_check}
BUILD=1
TRAIN_STEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --skip-build) BUILD=0; shift ;;
    --train-step) TRAIN_STEP=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --out DIR, --skip-build, --train-step)" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
VERDICTS="$OUT_DIR/verdicts.md"
STATUS=0
START=$(date +%s)
printf '| stage | verdict | details |\n|---|---|---|\n' > "$VERDICTS"

verdict() {  # stage, PASS/FAIL/SKIP, details
  printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$VERDICTS"
  [ "$2" = FAIL ] && STATUS=1
  echo "== $1: $2 ($3)"
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check" >&2
  exit 2
fi
"$PY" - <<'EOF' | tee "$OUT_DIR/build.log"
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, Python {platform.python_version()}")
EOF

# 1. Build for the GPU present.
if [ "$BUILD" = 1 ]; then
  ARCH=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
  t0=$(date +%s)
  if CDM_CUDA_ARCHS=$ARCH MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1; then
    verdict build PASS "sm_$ARCH, $(( $(date +%s) - t0 )) s"
  else
    tail -n 40 "$OUT_DIR/build.log"
    verdict build FAIL "sm_$ARCH: see build.log"
  fi
else
  verdict build SKIP "--skip-build: the extension as it is"
fi
"$PY" -c 'import cdm_kernels; print("extension:", cdm_kernels.extension_status())' | tee -a "$OUT_DIR/build.log"

# 2. The GPU suite.
t0=$(date +%s)
"$PY" -m pytest -m gpu -q -ra -p no:cacheprovider tests > "$OUT_DIR/tests.log" 2>&1
rc=$?
summary=$(tail -n 1 "$OUT_DIR/tests.log" | tr -d '=' | sed 's/^ *//')
if [ $rc = 0 ] && [[ "$summary" == *" passed"* ]]; then verdict "GPU tests" PASS "$summary (skips listed in tests.log)"
else tail -n 30 "$OUT_DIR/tests.log"; verdict "GPU tests" FAIL "${summary:-no summary}"; fi
echo "   ($(( $(date +%s) - t0 )) s)"

# 3. compute-sanitizer on every GPU kernel. Without the caching allocator every tensor is its own
# allocation, so memcheck sees an access past a tensor's end instead of into its neighbour.
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
: > "$OUT_DIR/sanitizer.log"
for tool in memcheck racecheck synccheck; do
  if [ ! -x "$SAN" ]; then verdict "$tool" SKIP "compute-sanitizer not found"; continue; fi
  t0=$(date +%s)
  echo "### compute-sanitizer --tool $tool" >> "$OUT_DIR/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 "$SAN" --tool "$tool" --error-exitcode 1 \
    "$PY" scripts/gpu_sanitize_probe.py >> "$OUT_DIR/sanitizer.log" 2>&1
  rc=$?
  errors=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitizer.log" | tail -n 1 | sed 's/^=* *//')
  if [ $rc = 0 ]; then verdict "$tool" PASS "${errors:-no summary}, $(( $(date +%s) - t0 )) s"
  elif [ $rc = 124 ]; then verdict "$tool" FAIL "timed out after 300 s"
  else verdict "$tool" FAIL "exit $rc: ${errors:-see sanitizer.log}"; fi
done

# 4. The GPU targets.
t0=$(date +%s)
"$PY" -m benchmarks.gpu_targets --out "$OUT_DIR" > "$OUT_DIR/gpu_targets.log" 2>&1
rc=$?
if [ $rc = 0 ] && [ -f "$OUT_DIR/gpu_targets.md" ]; then
  pass=$(grep -c '| PASS |' "$OUT_DIR/gpu_targets.md")
  fail=$(grep -c '| FAIL' "$OUT_DIR/gpu_targets.md")
  verdict "GPU targets" "$([ "$fail" = 0 ] && echo PASS || echo FAIL)" \
    "$pass criteria met, $fail missed, $(( $(date +%s) - t0 )) s: gpu_targets.md"
  rm -f "$OUT_DIR/gpu_targets.log"
else
  tail -n 30 "$OUT_DIR/gpu_targets.log"
  verdict "GPU targets" FAIL "exit $rc: see gpu_targets.log"
fi

# 5. The training step, when asked.
if [ "$TRAIN_STEP" = 1 ]; then
  t0=$(date +%s)
  if "$PY" -m benchmarks.bench_train_step --device cuda --no-progress --out "$OUT_DIR" > "$OUT_DIR/train_step.log" 2>&1; then
    verdict "training step" PASS "$(( $(date +%s) - t0 )) s: train_step.md"
    rm -f "$OUT_DIR/train_step.log"
  else
    tail -n 30 "$OUT_DIR/train_step.log"
    verdict "training step" FAIL "see train_step.log"
  fi
fi

echo
if [ -f "$OUT_DIR/gpu_targets.md" ]; then
  sed -n '/^## Verdicts/,$p' "$OUT_DIR/gpu_targets.md"
  echo
fi
echo "## gpu_check.sh, $(( $(date +%s) - START )) s, outputs in $OUT_DIR"
echo
cat "$VERDICTS"
exit $STATUS

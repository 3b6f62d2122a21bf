#!/usr/bin/env bash
# The way to check cdm_kernels on a machine with an NVIDIA GPU, in one command (under 8 minutes on
# an H200 is the aim):
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget-s SECONDS] [--stages LIST] [--skip-build] [--train-step] [--plan]
#
# Stages, run in the order --stages lists them (default build,tests,sanitizer,targets):
#   build       the extension in place for the GPU present (CDM_CUDA_ARCHS from its compute capability)
#   tests       the GPU suite: python -m pytest -m gpu tests
#   sanitizer   compute-sanitizer memcheck, racecheck and synccheck of every GPU kernel, forward and
#               backward, at small odd shapes (scripts/gpu_sanitize_probe.py)
#   targets     the GPU targets benchmark (python -m benchmarks.gpu_targets): CSV, markdown and plot
#   train-step  the training-step benchmark on the GPU (several minutes)
# --skip-build drops build (the extension as it is); --train-step appends train-step.
#
# --budget-s bounds the whole run: each stage gets what is left of it (a sanitizer tool at most
# 300 s in any case) and is stopped by SIGTERM when that runs out; a stage that starts with under
# 20 s left is skipped. The GPU targets benchmark writes what it measured before a SIGTERM, the
# training-step benchmark gets a budget of its own a minute shorter, and the logs keep what ran, so
# a run on a machine lent for a fixed time still brings back every finished part.
# --plan prints the stages and their limits and exits, without a GPU.
#
# Uses the Python in $PYTHON, else .venv/bin/python when the checkout has one, else python3, with
# the torch, triton, pytest and pybind11 it has (nothing is installed). Writes build.log, tests.log,
# sanitizer.log, gpu_targets.{csv,md,png}, verdicts.md (and train_step.{csv,md,png}) into the folder
# named by --out, else by $CDM_GPU_CHECK_OUT, else out/gpu_check/ in the checkout (ignored by git).
# Prints a verdict table last; the exit status is 1 when a stage failed or was cut or skipped by the
# budget, 2 for bad arguments or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${CDM_GPU_CHECK_OUT:-out/gpu_check}
STAGES=build,tests,sanitizer,targets
SKIP_BUILD=0
TRAIN_STEP=0
BUDGET=
PLAN=0
usage() { echo "gpu_check.sh: $1 (expected --out DIR, --budget-s SECONDS, --stages LIST, --skip-build, --train-step, --plan)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] && [[ "$2" != --* ]] || usage "--out needs a folder"; OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --budget-s) [ $# -ge 2 ] && [[ "$2" != --* ]] || usage "--budget-s needs a number of seconds"; BUDGET=$2; shift 2 ;;
    --budget-s=*) BUDGET=${1#--budget-s=}; shift ;;
    --stages) [ $# -ge 2 ] && [[ "$2" != --* ]] || usage "--stages needs a list"; STAGES=$2; shift 2 ;;
    --stages=*) STAGES=${1#--stages=}; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --train-step) TRAIN_STEP=1; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
if [ -n "$BUDGET" ] && ! [[ "$BUDGET" =~ ^[1-9][0-9]*$ ]]; then
  usage "--budget-s must be a whole number of seconds above 0, got '$BUDGET'"
fi
IFS=, read -r -a PLANNED <<< "$STAGES"
RUN=()
for s in "${PLANNED[@]}"; do
  case "$s" in
    build) [ "$SKIP_BUILD" = 1 ] || RUN+=(build) ;;
    tests|sanitizer|targets|train-step) RUN+=("$s") ;;
    *) usage "unknown stage '$s' in --stages (stages: build, tests, sanitizer, targets, train-step)" ;;
  esac
done
if [ "$TRAIN_STEP" = 1 ] && [[ " ${RUN[*]} " != *" train-step "* ]]; then RUN+=(train-step); fi
[ ${#RUN[@]} -gt 0 ] || usage "no stage left to run"

START=$(date +%s)
MIN_STAGE_S=20
SAN_TOOL_S=300
left() {  # seconds left of the budget (a large number without one)
  if [ -z "$BUDGET" ]; then echo 1000000; else echo $(( BUDGET - ($(date +%s) - START) )); fi
}

if [ "$PLAN" = 1 ]; then
  echo "stages, in order: ${RUN[*]}"
  if [ -n "$BUDGET" ]; then echo "budget: $BUDGET s in all; each stage gets what is left (a sanitizer tool at most $SAN_TOOL_S s); under $MIN_STAGE_S s left: skipped"
  else echo "budget: none (a sanitizer tool at most $SAN_TOOL_S s)"; fi
  echo "outputs: $OUT_DIR"
  exit 0
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
VERDICTS="$OUT_DIR/verdicts.md"
STATUS=0
printf '| stage | verdict | details |\n|---|---|---|\n' > "$VERDICTS"

verdict() {  # stage, PASS/FAIL/SKIP, details
  printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$VERDICTS"
  [ "$2" = FAIL ] && STATUS=1
  echo "== $1: $2 ($3)"
}

bounded() {  # seconds, command...: the command, stopped by SIGTERM after that many seconds (KILL 15 s later)
  local s=$1; shift
  timeout -s TERM -k 15 "$s" "$@"
}

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
echo "stages: ${RUN[*]}; budget: ${BUDGET:-none}${BUDGET:+ s}" | tee -a "$OUT_DIR/build.log"

stage_build() {
  local arch t0 rc
  arch=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
  t0=$(date +%s)
  CDM_CUDA_ARCHS=$arch MAX_JOBS=$(nproc) bounded "$(left)" "$PY" setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then verdict build PASS "sm_$arch, $(( $(date +%s) - t0 )) s"
  else
    tail -n 40 "$OUT_DIR/build.log"
    if [ $rc = 124 ]; then verdict build FAIL "sm_$arch: cut by the time budget: see build.log"
    else verdict build FAIL "sm_$arch: see build.log"; fi
  fi
  "$PY" -c 'import cdm_kernels; print("extension:", cdm_kernels.extension_status())' | tee -a "$OUT_DIR/build.log"
}

stage_tests() {
  # -v: one line per test as it ends, so that a run cut by the budget still says what passed and failed.
  local t0 rc summary
  t0=$(date +%s)
  bounded "$(left)" "$PY" -m pytest -m gpu -v -ra -p no:cacheprovider tests > "$OUT_DIR/tests.log" 2>&1
  rc=$?
  summary=$(tail -n 1 "$OUT_DIR/tests.log" | tr -d '=' | sed 's/^ *//')
  if [ $rc = 0 ] && [[ "$summary" == *" passed"* ]]; then verdict "GPU tests" PASS "$summary (skips listed in tests.log)"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    verdict "GPU tests" FAIL "cut by the time budget after $(grep -c ' PASSED' "$OUT_DIR/tests.log") passed, $(grep -c ' FAILED' "$OUT_DIR/tests.log") failed: tests.log"
  else tail -n 30 "$OUT_DIR/tests.log"; verdict "GPU tests" FAIL "${summary:-no summary}"; fi
  echo "   ($(( $(date +%s) - t0 )) s)"
}

stage_sanitizer() {
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an access
  # past a tensor's end instead of into its neighbour.
  local san tool t0 rc errors limit
  san=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  : > "$OUT_DIR/sanitizer.log"
  for tool in memcheck racecheck synccheck; do
    if [ ! -x "$san" ]; then verdict "$tool" SKIP "compute-sanitizer not found"; continue; fi
    limit=$(left); [ "$limit" -gt $SAN_TOOL_S ] && limit=$SAN_TOOL_S
    if [ "$limit" -lt $MIN_STAGE_S ]; then verdict "$tool" FAIL "skipped: $limit s left of the time budget"; continue; fi
    t0=$(date +%s)
    echo "### compute-sanitizer --tool $tool" >> "$OUT_DIR/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 bounded "$limit" "$san" --tool "$tool" --error-exitcode 1 \
      "$PY" scripts/gpu_sanitize_probe.py >> "$OUT_DIR/sanitizer.log" 2>&1
    rc=$?
    errors=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitizer.log" | tail -n 1 | sed 's/^=* *//')
    if [ $rc = 0 ]; then verdict "$tool" PASS "${errors:-no summary}, $(( $(date +%s) - t0 )) s"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then verdict "$tool" FAIL "stopped after $limit s: sanitizer.log"
    else verdict "$tool" FAIL "exit $rc: ${errors:-see sanitizer.log}"; fi
  done
}

stage_targets() {
  local t0 rc pass fail
  t0=$(date +%s)
  bounded "$(left)" "$PY" -m benchmarks.gpu_targets --out "$OUT_DIR" > "$OUT_DIR/gpu_targets.log" 2>&1
  rc=$?
  if [ -f "$OUT_DIR/gpu_targets.md" ]; then
    pass=$(grep -c '| PASS |' "$OUT_DIR/gpu_targets.md")
    fail=$(grep -c '| FAIL' "$OUT_DIR/gpu_targets.md")
    if [ $rc = 0 ]; then
      verdict "GPU targets" "$([ "$fail" = 0 ] && echo PASS || echo FAIL)" \
        "$pass criteria met, $fail missed, $(( $(date +%s) - t0 )) s: gpu_targets.md"
      rm -f "$OUT_DIR/gpu_targets.log"
      return
    fi
    tail -n 5 "$OUT_DIR/gpu_targets.log"
    verdict "GPU targets" FAIL "exit $rc ($(grep -o 'during: [^.]*' "$OUT_DIR/gpu_targets.md" || echo 'see gpu_targets.log')); $pass met, $fail missed so far: gpu_targets.md"
  else
    tail -n 30 "$OUT_DIR/gpu_targets.log"
    verdict "GPU targets" FAIL "exit $rc: see gpu_targets.log"
  fi
}

stage_train_step() {
  # Under a budget the benchmark gets its own, a minute (or a third) short of what is left: rows it has not
  # started by then are recorded "skipped: time budget", and the rows it ran are written.
  local t0 rc own=()
  t0=$(date +%s)
  [ -n "$BUDGET" ] && own=(--budget $(( $(left) > 90 ? $(left) - 60 : $(left) * 2 / 3 )))
  bounded "$(left)" "$PY" -m benchmarks.bench_train_step --device cuda --no-progress ${own[@]+"${own[@]}"} --out "$OUT_DIR" \
    > "$OUT_DIR/train_step.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    verdict "training step" PASS "$(( $(date +%s) - t0 )) s: train_step.md"
    rm -f "$OUT_DIR/train_step.log"
  else
    tail -n 30 "$OUT_DIR/train_step.log"
    verdict "training step" FAIL "exit $rc$([ $rc = 124 ] && echo ', cut by the time budget'): see train_step.log"
  fi
}

for s in "${RUN[@]}"; do
  if [ "$(left)" -lt $MIN_STAGE_S ]; then verdict "$s" FAIL "skipped: $(left) s left of the time budget"; continue; fi
  "stage_${s//-/_}"
done

echo
if [ -f "$OUT_DIR/gpu_targets.md" ]; then
  sed -n '/^## Verdicts/,$p' "$OUT_DIR/gpu_targets.md"
  echo
fi
echo "## gpu_check.sh, $(( $(date +%s) - START )) s, outputs in $OUT_DIR"
echo
cat "$VERDICTS"
exit $STATUS

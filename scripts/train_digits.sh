#!/usr/bin/env bash
# The main job: sets up .venv and builds (scripts/setup.sh: skipped, in a few seconds, when nothing
# the build depends on changed since the last run), then trains a small EDM U-Net with the
# stable target and the consistency loss (stf+cdm) on the 8x8 digits that ship inside scikit-learn,
# on the CPU, and samples it. Outputs in runs/digits: log.jsonl, loss.png, samples-*.png,
# checkpoints. Extra arguments go to `python -m cdm_kernels.train` (see --help).
# Running it again starts the run over (--overwrite replaces runs/digits' checkpoints, log and
# samples); pass `--resume runs/digits` to continue the last run instead (for its own duration, or
# a new --steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fresh=(--overwrite)
for arg in "$@"; do
  if [ "$arg" = "--resume" ] || [[ "$arg" == --resume=* ]]; then fresh=(); fi
done
# One thread: the 0.8M-parameter network on 8x8 images runs 2-3x faster on one core than on two.
.venv/bin/python -m cdm_kernels.train --data digits --loss stf+cdm --outdir runs/digits --threads 1 "${fresh[@]}" "$@"

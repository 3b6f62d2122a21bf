#!/usr/bin/env bash
# The main job: sets up .venv and builds (scripts/setup.sh), then trains a small EDM U-Net with the
# stable target and the consistency loss (stf+cdm) on the 8x8 digits that ship inside scikit-learn,
# on the CPU, and samples it. Outputs in runs/digits: log.jsonl, loss.png, samples-*.png,
# checkpoints. Extra arguments go to `python -m cdm_kernels.train` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m cdm_kernels.train --data digits --loss stf+cdm --outdir runs/digits "$@"

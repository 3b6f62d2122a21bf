#!/usr/bin/env bash
# Sets up .venv and builds the extension (scripts/setup.sh: skipped, in a few seconds, when nothing
# the build depends on changed since the last run), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -ra "$@"

#!/usr/bin/env bash
# The test command (README, .ci/run): install what is missing, then run the whole suite.
#   bash tests/run.sh [pytest args]      e.g. bash tests/run.sh -k segment -x   (PYTEST_WORKERS=1: serial)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash install.sh
PY="$(bash install.sh --print-python)"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning}"
# Two workers: the end-to-end tests run single-threaded fairseq processes, so both cores are used.
exec "$PY" -m pytest tests -n "${PYTEST_WORKERS:-2}" "$@"

#!/usr/bin/env bash
# The test command (README, .ci/run): install what is missing, then run the whole suite.
#   bash tests/run.sh [pytest args]      e.g. bash tests/run.sh -k segment -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash install.sh
PY="$(bash install.sh --print-python)"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning}"
exec "$PY" -m pytest tests "$@"

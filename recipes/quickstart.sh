#!/usr/bin/env bash
# Quick start: install if needed, build the embedded corpus, train + evaluate two small LMs (with and
# without memory), print a results table and save a loss-curve plot. Arguments go to recipes/quickstart.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash install.sh
PY="$(bash install.sh --print-python)"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$PY" -m recipes.quickstart "$@"

#!/usr/bin/env bash
# The context-length study (issue 11): see recipes/context_length/run.py for the models and options.
#
#   bash recipes/context_length/run.sh                      # PTB words + chars, every model (~1 h on 2 cores)
#   bash recipes/context_length/run.sh --datasets ptb_chars --size tiny --train-length 64 --max-update 400
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
exec "${PYTHON:-python}" -m recipes.context_length.run "$@"

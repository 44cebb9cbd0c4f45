#!/usr/bin/env bash
# Public implementations the benchmark suite compares with, installed into a separate folder (default
# runs/peers, or $1) with --no-deps, so the project's environment and its torch stay untouched. Their pure-
# Python dependencies are listed explicitly (pip would otherwise pull another torch).
#   bash recipes/benchmarks/install_peers.sh [TARGET]     then: python -m recipes.benchmarks.run --peers-path TARGET
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET="${1:-$ROOT/runs/peers}"
PY="$(bash "$ROOT/install.sh" --print-python)"
"$PY" -m pip install --quiet --target "$TARGET" --no-deps \
  reformer-pytorch linear-attention-transformer local-attention axial-positional-embedding \
  product-key-memory colt5-attention hyper-connections einops einx frozendict
echo "peers installed in $TARGET"

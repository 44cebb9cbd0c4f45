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
  product-key-memory colt5-attention hyper-connections linformer einops einx frozendict
# pytorch-fast-transformers (the linear-attention paper's own code) compiles C++ (and CUDA) extensions
# against the installed torch, hence --no-build-isolation. Its setup.py takes any `nvcc` on PATH for a CUDA
# toolkit: without a working one, or with a CPU-only torch (which cannot build or load CUDA kernels: its
# setup then stops on CUDA_HOME), those PATH entries are hidden so that only the CPU kernels are built
# (about 7 CPU-minutes).
BUILD_PATH="$PATH"
if ! nvcc --version >/dev/null 2>&1 || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  BUILD_PATH="$(tr ':' '\n' <<<"$PATH" | while read -r dir; do [ -e "$dir/nvcc" ] || echo "$dir"; done | paste -sd:)"
fi
PATH="$BUILD_PATH" "$PY" -m pip install --quiet --target "$TARGET" --no-deps --no-build-isolation pytorch-fast-transformers
echo "peers installed in $TARGET"

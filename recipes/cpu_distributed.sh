#!/usr/bin/env bash
# Data-parallel fairseq-train on CPU: N processes on this machine, gloo backend.
#
#   bash recipes/cpu_distributed.sh N DATA_DIR [fairseq-train arguments...]
#
# Why a launcher: fairseq's own multi-process start counts CUDA devices, so on a CPU machine
# `--cpu --distributed-world-size 2` fails (world size 2 but 0 devices), torchrun divides by the CUDA
# device count, and pytorch_ddp rejects CPU device ids. What works (measured, see README): one process
# per rank started by hand with --distributed-no-spawn, a TCP rendezvous on localhost, gloo, legacy_ddp.
# On GPUs use fairseq's normal launch (it spawns one process per GPU) or slurm/.
set -euo pipefail
N="$1"; shift
PORT="${MASTER_PORT:-$((20000 + RANDOM % 20000))}"
TRAIN="${FAIRSEQ_TRAIN:-fairseq-train}"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
for ((rank = 0; rank < N; rank++)); do
  "$TRAIN" "$@" --cpu --distributed-world-size "$N" --distributed-rank "$rank" --distributed-no-spawn \
    --distributed-backend gloo --distributed-init-method "tcp://127.0.0.1:$PORT" --ddp-backend legacy_ddp &
  pids+=($!)
done
# If any rank fails, stop the others (they would wait forever at the next all-reduce).
for ((i = 0; i < N; i++)); do
  if ! wait -n; then
    echo "error: a training process failed; stopping the others" >&2
    exit 1
  fi
done
trap - EXIT

#!/usr/bin/env bash
# Idempotent installer used by `bash recipes/quickstart.sh` and `bash tests/run.sh`.
#
# - Uses the active virtualenv/conda env if there is one, else creates `.venv` at the repo root.
# - Never reinstalls an importable torch (a user's CUDA build must survive).
# - Installs fairseq from `fairseq-fixed==0.12.3.1` with --no-deps: its metadata requires torchaudio,
#   which pins one exact torch and would replace the user's. Its real runtime deps are listed below.
# - Builds fairseq against the installed torch (--no-build-isolation) so its C++/Cython extensions match.
# - The second run is a no-op in seconds (a stamp of this file + setup.py in the environment).
#
# `bash install.sh --print-python` prints the interpreter to use (no install).
#
# Environment: PYTHON (interpreter for a new .venv, default python3), TORCH_SPEC (what to install when
# no torch is importable, default torch==2.13.0), EFFICIENT_LM_EXTRAS (pip extras, default "test").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

FAIRSEQ_SPEC="fairseq-fixed==0.12.3.1"
FAIRSEQ_DEPS=(hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu regex cffi cython tqdm scikit-learn packaging numpy setuptools wheel)
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EFFICIENT_LM_EXTRAS:-test}"

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
  PY="$CONDA_PREFIX/bin/python"
else
  if [[ ! -x .venv/bin/python ]]; then
    "${PYTHON:-python3}" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' || {
      echo "install.sh: Python 3.10-3.12 is required (found $("${PYTHON:-python3}" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
      exit 1
    }
    echo "install.sh: creating .venv with $("${PYTHON:-python3}" --version 2>&1)"
    "${PYTHON:-python3}" -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi

if [[ "${1:-}" == "--print-python" ]]; then
  echo "$PY"  # the interpreter the README commands use (after installing)
  exit 0
fi

ENV_PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')"
STAMP="$ENV_PREFIX/.efficient_lm_install_stamp"
WANT="$(cat install.sh setup.py | sha256sum | cut -d' ' -f1) $EXTRAS"
FOUND='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "fairseq", "plugins")))'
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$PY" -c "$FOUND" 2>/dev/null; then
  exit 0  # already installed: nothing to do
fi

PIP=("$PY" -m pip --disable-pip-version-check --quiet)
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "install.sh: no importable torch, installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
else
  echo "install.sh: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
# Pin the installed torch so no later step can replace it.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$CONSTRAINTS"

"${PIP[@]}" install -c "$CONSTRAINTS" "${FAIRSEQ_DEPS[@]}"
if ! "$PY" -c 'import fairseq' 2>/dev/null; then
  echo "install.sh: building $FAIRSEQ_SPEC against the installed torch (about 3 minutes the first time)"
  "${PIP[@]}" install --no-deps --no-build-isolation "$FAIRSEQ_SPEC"
fi
"${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation -e ".[$EXTRAS]"

"$PY" -c 'import torch, fairseq, plugins' 
echo "$WANT" >"$STAMP"
echo "install.sh: ready ($PY)"

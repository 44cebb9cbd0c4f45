#!/usr/bin/env bash
# Does memory help? xl_tiny vs full_tiny on real PTB (word level), same segment length (32), batch,
# schedule and (almost) the same parameter count; prints both final validation perplexities.
#   bash recipes/transformer_xl/compare_ptb.sh [DATA=data-bin/ptb] [UPDATES=400]
# Binarize PTB first: python -m preprocess.ptb --raw ../shared/data/ptb --out data-bin/ptb
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data-bin/ptb}"
UPDATES="${UPDATES:-400}"
OUT="${OUT:-$ROOT/runs/compare_ptb}"
mkdir -p "$OUT"
for arch in full_tiny xl_tiny; do
  "${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA" --user-dir "$ROOT/plugins" --task segment_lm \
    --criterion aux_cross_entropy --arch "$arch" --tokens-per-sample 32 --batch-size 16 \
    --optimizer adam --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 50 --max-update "$UPDATES" \
    --dropout 0.1 --seed 1 --cpu --num-workers 0 --log-format simple --log-interval 100 --no-save \
    > "$OUT/$arch.log" 2>&1
  params=$(grep -o "num. shared model params: [0-9,]*" "$OUT/$arch.log" | grep -o "[0-9,]*$")
  ppl=$(grep "valid on 'valid' subset" "$OUT/$arch.log" | tail -1 | grep -o "ppl [0-9.]*")
  echo "$arch: params $params, valid $ppl after $UPDATES updates"
done

#!/usr/bin/env bash
# Does the compressed memory help at equal keys / equal span? Three 2-layer x 64 models on real PTB
# characters, same segment (32), batch, schedule and seed; prints the final validation bpc of each:
#   xl mem 48          Transformer-XL, 48 memory keys (span 48)
#   compressive        compressive_tiny: mem 32 + cmem 16 at c = 4 (48 memory keys, span 96)
#   xl mem 96          Transformer-XL, 96 memory keys (span 96)
#
#   bash recipes/compressive/compare_ptb_chars.sh        [DATA=data-bin/ptb-chars] [UPDATES=600]
# DATA is built from ../shared/data/ptb (preprocess.text --level char) when it does not exist.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$ROOT/data-bin/ptb-chars}"
UPDATES="${UPDATES:-600}"
OUT="${OUT:-$ROOT/runs/compare_ptb_chars}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
if [[ ! -f "$DATA/dict.txt" ]]; then
  raw="$(mktemp -d)"
  for split in train valid test; do xz -dc "$ROOT/../shared/data/ptb/ptb.$split.txt.xz" > "$raw/$split.txt"; done
  (cd "$ROOT" && "$PYTHON" -m preprocess.text --train "$raw/train.txt" --valid "$raw/valid.txt" \
    --test "$raw/test.txt" --level char --name ptb-chars --out "$DATA")
  rm -r "$raw"
fi
run() {  # name, extra options
  local name="$1"; shift
  OMP_NUM_THREADS=1 "${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA" --user-dir "$ROOT/plugins" --task segment_lm \
    --criterion aux_cross_entropy --tokens-per-sample 32 --batch-size 16 \
    --optimizer adam --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 50 --max-update "$UPDATES" \
    --seed 1 --cpu --num-workers 0 --log-format simple --log-interval 100 --no-save "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $(grep "valid on 'valid' subset" "$OUT/$name.log" | tail -1 | grep -o "bpc [0-9.]*") after $UPDATES updates"
}
run xl-mem48 --arch xl_tiny --mem-len 48 &
run compressive-mem32-cmem16-c4 --arch compressive_tiny &
wait
run xl-mem96 --arch xl_tiny --mem-len 96

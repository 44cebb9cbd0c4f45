#!/usr/bin/env bash
# Compressive Transformer (Rae et al. 2020, arXiv 1911.05507) through the standard fairseq tools.
#
#   bash recipes/compressive/run.sh EXPERIMENT train|eval [extra fairseq arguments]
#
# EXPERIMENT     preset                     data (preprocess/)      paper result to compare with
# enwik8         compressive_enwik8         data-bin/enwik8         none: the base model of the studies (issue 4)
# enwik8_large   compressive_enwik8_large   data-bin/enwik8         0.97 bpb, 277M (Table 3)
# wt103          compressive_wt103          data-bin/wikitext-103   17.1 test ppl (Table 4)
# ptb_chars_cpu  compressive_small          data-bin/ptb-chars      a CPU-sized run (no paper number); twin of
#                                                                   recipes/transformer_xl/run.sh ptb_chars_cpu
#
# Segment lengths: 512 for enwik8 and WikiText-103 (the paper), 768 for the 24-layer enwik8 model (the
# Transformer-XL large setting it extends). Optimizer: Adam; the base model uses lr 1e-4 (issue 4); the
# paper models use Transformer-XL's recipe (lr 2.5e-4, cosine to 0, clip 0.25): the paper trained on TPU
# and its full schedule is not reproduced here, check it before quoting a comparison. Compression: conv
# with the attention-reconstruction loss (the paper's best, Table 5), weight 1; change with
# --compression-fn / --compression-loss / --compression-loss-weight. Evaluation keeps the training memory
# sizes (eval-lm scores every token once, with the memory of the same stream).
# Environment: DATA (data dir), SAVE (checkpoint dir), FAIRSEQ_TRAIN / FAIRSEQ_EVAL_LM (commands).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EXP="${1:?experiment name, see the header of this file}"
MODE="${2:?train or eval}"
shift 2

schedule=(--optimizer adam --adam-betas "(0.9, 0.999)" --lr 0.00025 --lr-scheduler cosine --clip-norm 0.25)
case "$EXP" in
  enwik8)        data=enwik8; arch=compressive_enwik8; tps=512; bsz=22; steps=400000; warmup=4000
                 schedule=(--optimizer adam --adam-betas "(0.9, 0.999)" --lr 0.0001 --lr-scheduler cosine --clip-norm 0.25) ;;
  enwik8_large)  data=enwik8; arch=compressive_enwik8_large; tps=768; bsz=64; steps=400000; warmup=4000 ;;
  wt103)         data=wikitext-103; arch=compressive_wt103; tps=512; bsz=64; steps=400000; warmup=16000 ;;
  ptb_chars_cpu) data=ptb-chars; arch=compressive_small; tps=128; bsz=16; steps=3000; warmup=200
                 schedule=(--optimizer adam --lr 0.001 --lr-scheduler cosine --clip-norm 0.25 --cpu) ;;
  *) echo "error: unknown experiment '$EXP' (see the header of $0)" >&2; exit 2 ;;
esac
source "$ROOT/recipes/segment_lm_recipe.sh"
run_segment_lm compressive "$MODE" "$@"

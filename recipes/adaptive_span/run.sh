#!/usr/bin/env bash
# Adaptive attention span (Sukhbaatar et al. 2019, arXiv 1905.07799) and all-attention networks with
# persistent memory (arXiv 1907.01470), with the official experiments/*.sh settings, through fairseq.
#
#   bash recipes/adaptive_span/run.sh EXPERIMENT train|eval [extra fairseq arguments]
#
# EXPERIMENT                  preset                       official script            published (paper)
# enwik8_small                adaptive_span_enwik8_small   experiments/enwik8.sh       1.02 bpb, 38M
# enwik8_large                adaptive_span_enwik8_large   experiments/enwik8_large.sh 0.98 bpb, 209M
# text8_small                 adaptive_span_text8_small    experiments/text8.sh        1.11 bpc, 38M
# text8_large                 adaptive_span_text8_large    experiments/text8_large.sh  1.07 bpc, 209M
# all_attention_enwik8_small  all_attention_enwik8_small   enwik8_pers_small.sh        1.01 bpb, 39M
# all_attention_enwik8_large  all_attention_enwik8_large   enwik8_pers.sh              0.98 bpb, 114M
# all_attention_wt103         all_attention_wt103          wiki103_pers.sh             20.6 ppl, 133M
# ptb_chars_cpu               adaptive_span_tiny           -  CPU run in minutes on data-bin/ptb-chars (no paper number)
# ptb_chars_all_attention     all_attention_tiny           -  the same with all-attention layers
#
# Data: data-bin/enwik8, data-bin/text8, data-bin/wikitext-103 (preprocess/), data-bin/ptb-chars
# (python -m preprocess.text --level char on the PTB files).
# Schedule of the official scripts: Adagrad, lr 0.07, linear warmup (32k updates; 8k for WikiText-103,
# which uses Adam lr 2.5e-4 and clip 1), then constant (here: polynomial_decay with --end-learning-rate =
# --lr), 64 streams of 512 tokens (256 for WikiText-103). The official Adagrad clips every parameter
# tensor's gradient norm to 0.03 by scaling its step: --optimizer adagrad_clip (plugins/optim/) does the
# same (fairseq's --clip-norm clips one global norm). The official large runs end with a fine-tuning phase
# at lr/10 (e.g. enwik8_large: 20k more updates): run `train` again with
# `--lr 0.007 --end-learning-rate 0.007 --max-update <steps + 20000> --total-num-update <same>`.
# Batches are streams over all GPUs: on fewer GPUs keep batch x GPUs x --update-freq.
# Evaluation: 8 streams (the official --full-eval-mode --batch-sz 8), the memory the model was trained with.
# Environment: DATA (data dir), SAVE (checkpoint dir), FAIRSEQ_TRAIN / FAIRSEQ_EVAL_LM (commands).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EXP="${1:?experiment name, see the header of this file}"
MODE="${2:?train or eval}"
shift 2

lr=0.07
schedule=(--optimizer adagrad_clip --adagrad-clip 0.03)
case "$EXP" in
  enwik8_small)  data=enwik8; arch=adaptive_span_enwik8_small; tps=512; bsz=64; steps=600000; warmup=32000 ;;
  enwik8_large)  data=enwik8; arch=adaptive_span_enwik8_large; tps=512; bsz=64; steps=150000; warmup=32000 ;;
  text8_small)   data=text8; arch=adaptive_span_text8_small; tps=512; bsz=64; steps=900000; warmup=32000 ;;
  text8_large)   data=text8; arch=adaptive_span_text8_large; tps=512; bsz=64; steps=250000; warmup=32000 ;;
  all_attention_enwik8_small) data=enwik8; arch=all_attention_enwik8_small; tps=512; bsz=64; steps=450000; warmup=32000 ;;
  all_attention_enwik8_large) data=enwik8; arch=all_attention_enwik8_large; tps=512; bsz=64; steps=200000; warmup=32000 ;;
  all_attention_wt103) data=wikitext-103; arch=all_attention_wt103; tps=256; bsz=64; steps=800000; warmup=8000
                 lr=0.00025; schedule=(--optimizer adam --adam-betas "(0.9, 0.999)" --clip-norm 1) ;;
  ptb_chars_cpu) data=ptb-chars; arch=adaptive_span_tiny; tps=128; bsz=16; steps=3000; warmup=200
                 schedule=(--optimizer adagrad_clip --adagrad-clip 0.03 --cpu) ;;
  ptb_chars_all_attention) data=ptb-chars; arch=all_attention_tiny; tps=128; bsz=16; steps=3000; warmup=200
                 schedule=(--optimizer adagrad_clip --adagrad-clip 0.03 --cpu) ;;
  *) echo "error: unknown experiment '$EXP' (see the header of $0)" >&2; exit 2 ;;
esac
# linear warmup, then constant: polynomial decay to the same lr
schedule+=(--lr "$lr" --lr-scheduler polynomial_decay --end-learning-rate "$lr" --total-num-update "$steps")
eval_args=(--tokens-per-sample "$tps" --batch-size 8)
source "$ROOT/recipes/segment_lm_recipe.sh"
run_segment_lm adaptive_span "$MODE" "$@"

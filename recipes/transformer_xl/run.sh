#!/usr/bin/env bash
# Transformer-XL (Dai et al. 2019) with the papers' settings, through the standard fairseq tools.
#
#   bash recipes/transformer_xl/run.sh EXPERIMENT train|eval [extra fairseq arguments]
#
# EXPERIMENT     data (preprocess/)       paper result to compare with
# enwik8_base    data-bin/enwik8          1.06 bpb, 41M  (Table 2; official pytorch/run_enwik8_base.sh)
# enwik8_large   data-bin/enwik8          0.99 bpb, 277M (Table 2)
# text8_large    data-bin/text8           1.08 bpc, 277M (Table 3)
# wt103_base     data-bin/wikitext-103    24.0 ppl, 151M (Table 1; official pytorch/run_wt103_base.sh)
# wt103_large    data-bin/wikitext-103    18.3 ppl, 257M (Table 1)
# ptb_cpu        data-bin/ptb             a CPU-sized run that finishes in minutes (no paper number)
# ptb_chars_cpu  data-bin/ptb-chars       the same on PTB characters (preprocess.text --level char)
#
# Optimizer and schedule of the official base scripts: Adam, lr 2.5e-4, cosine decay to 0 over the run,
# gradient clipping 0.25, batch 22 (enwik8) / 60 (WikiText-103) segments. The large models were trained
# on TPU pods; their batch sizes, steps and warmups here follow the paper's TPU setup as closely as we
# could determine and should be checked against the official tf/scripts before quoting. Batches are given
# as streams: on fewer GPUs keep the product batch x GPUs x --update-freq (fairseq's --update-freq
# accumulates gradients over consecutive segments of the same streams, which keeps memory correct).
# Evaluation uses the paper's longer memory with --same-length and --clamp-len.
# Environment: DATA (data dir), SAVE (checkpoint dir), FAIRSEQ_TRAIN / FAIRSEQ_EVAL_LM (commands).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EXP="${1:?experiment name, see the header of this file}"
MODE="${2:?train or eval}"
shift 2

schedule=(--optimizer adam --adam-betas "(0.9, 0.999)" --lr 0.00025 --lr-scheduler cosine --clip-norm 0.25)
case "$EXP" in
  enwik8_base)  data=enwik8; arch=xl_enwik8_base; tps=512; bsz=22; steps=400000; warmup=0
                eval_tps=80; eval_mem="{'mem_len': 2100, 'clamp_len': 820, 'same_length': True}" ;;
  enwik8_large) data=enwik8; arch=xl_enwik8_large; tps=768; bsz=64; steps=400000; warmup=4000
                eval_tps=128; eval_mem="{'mem_len': 3800, 'clamp_len': 1000, 'same_length': True}" ;;
  text8_large)  data=text8; arch=xl_text8_large; tps=768; bsz=64; steps=400000; warmup=4000
                eval_tps=128; eval_mem="{'mem_len': 3800, 'clamp_len': 1000, 'same_length': True}" ;;
  wt103_base)   data=wikitext-103; arch=xl_wt103_base; tps=150; bsz=60; steps=200000; warmup=0
                eval_tps=64; eval_mem="{'mem_len': 640, 'clamp_len': 400, 'same_length': True}" ;;
  wt103_large)  data=wikitext-103; arch=xl_wt103_large; tps=384; bsz=128; steps=4000000; warmup=16000
                eval_tps=128; eval_mem="{'mem_len': 1600, 'clamp_len': 1000, 'same_length': True}" ;;
  ptb_cpu)      data=ptb; arch=xl_ptb; tps=70; bsz=16; steps=3000; warmup=200
                eval_tps=70; eval_mem="{'mem_len': 140}"
                schedule=(--optimizer adam --lr 0.001 --lr-scheduler cosine --clip-norm 0.25 --cpu) ;;
  ptb_chars_cpu) data=ptb-chars; arch=xl_small; tps=128; bsz=16; steps=3000; warmup=200
                eval_tps=128; eval_mem="{'mem_len': 512}"
                schedule=(--optimizer adam --lr 0.001 --lr-scheduler cosine --clip-norm 0.25 --cpu) ;;
  *) echo "error: unknown experiment '$EXP' (see the header of $0)" >&2; exit 2 ;;
esac
eval_args=(--tokens-per-sample "$eval_tps" --batch-size 1 --model-overrides "$eval_mem")
source "$ROOT/recipes/segment_lm_recipe.sh"
run_segment_lm xl "$MODE" "$@"

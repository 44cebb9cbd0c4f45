# The shared tail of the mechanism recipes (recipes/<mechanism>/run.sh), sourced after the recipe set
#   ROOT EXP  data arch tps bsz steps warmup  schedule=(optimizer and lr options)
#   and optionally eval_args=(...) (default: --tokens-per-sample $tps --batch-size 1).
# `run_segment_lm PREFIX MODE "$@"` then trains (fairseq-train) or evaluates (fairseq-eval-lm) with
# --task segment_lm; checkpoints go to $SAVE (default checkpoints/PREFIX_EXP), data comes from $DATA
# (default data-bin/$data). FAIRSEQ_TRAIN / FAIRSEQ_EVAL_LM override the commands.
run_segment_lm() {
  local prefix="$1" mode="$2"
  shift 2
  DATA="${DATA:-$ROOT/data-bin/$data}"
  SAVE="${SAVE:-$ROOT/checkpoints/${prefix}_$EXP}"
  [[ -f "$DATA/dict.txt" ]] || { echo "error: $DATA has no dict.txt: binarize it first (python -m preprocess.${data%%-*} --help)" >&2; exit 2; }
  [[ -v eval_args ]] || eval_args=(--tokens-per-sample "$tps" --batch-size 1)
  case "$mode" in
    train)
      exec "${FAIRSEQ_TRAIN:-fairseq-train}" "$DATA" --user-dir "$ROOT/plugins" --task segment_lm \
        --criterion aux_cross_entropy --arch "$arch" --tokens-per-sample "$tps" --batch-size "$bsz" \
        "${schedule[@]}" --warmup-updates "$warmup" --max-update "$steps" \
        --save-dir "$SAVE" --keep-last-epochs 2 --save-interval-updates 2000 --keep-interval-updates 2 \
        --log-format simple --log-interval 100 --tensorboard-logdir "$SAVE/tb" "$@" ;;
    eval)
      exec "${FAIRSEQ_EVAL_LM:-fairseq-eval-lm}" "$DATA" --user-dir "$ROOT/plugins" --task segment_lm \
        --path "$SAVE/checkpoint_best.pt" --gen-subset test "${eval_args[@]}" "$@" ;;
    *) echo "error: mode must be train or eval, got '$mode'" >&2; exit 2 ;;
  esac
}

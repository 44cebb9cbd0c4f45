"""Evaluate a language model checkpoint at other context lengths than it was trained with.

    python -m recipes.context_eval --path CKPT --data DATA_BIN --length-factors 0.25,0.5,1,2,4,8 \\
        [--mode window|stream|both] [--subset test] [--out DIR]

Any fairseq LM checkpoint loads (fairseq's own ``transformer_lm`` and ``lstm_lm`` as well as this project's
``efficient_lm`` and ``lstm_stateful``; ``--user-dir`` defaults to this repository's ``plugins``). The
subset is read as one token stream x_1..x_N preceded by ``</s>``, every token scored exactly once, at each
evaluation length L:

- ``window``: non-overlapping windows of L tokens, each scored from an empty context (position i of a
  window sees i earlier tokens). At the training length this is exactly ``fairseq-eval-lm
  --batch-size 1 --tokens-per-sample L`` (segment_lm, or language_modeling's block layout): the same
  windows, so the same number.
- ``stream``: for models that carry state across segments (``efficient_lm`` with ``--mem-len``,
  ``lstm_stateful``): ``--streams`` contiguous streams fed as consecutive segments of L tokens with their
  ``stream_offset``, the memory / (h, c) carried from segment to segment, as ``segment_lm`` does.
  Models without state are reported as skipped in this mode.

Reported per length: the mean loss in bits (base 2) per token, labelled by the data's unit (bpb for
bytes, bpc for characters, ppl = 2^loss for words and subwords), and the mean loss at every position of
the window/segment (the curve that shows where a model stops using context; with memory it should be
flat). Lengths a model cannot represent (learned positions beyond their table) are reported as skipped,
with the reason. Outputs in ``--out``: ``context_eval.json``, ``context_eval.md`` (table) and
``position_loss.png`` (loss vs position, one line per length).
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(os.path.abspath(__file__)).parents[1]
UNIT_METRIC = {"byte": "bpb", "char": "bpc", "word": "ppl", "subword": "ppl"}  # as aux_cross_entropy logs
logger = logging.getLogger("context_eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint (.pt) written by fairseq-train")
    p.add_argument(
        "--data", required=True, help="data-bin directory (fairseq-preprocess output) the model was trained on"
    )
    p.add_argument(
        "--user-dir", default=str(ROOT / "plugins"), help="fairseq --user-dir (default: this repo's plugins)"
    )
    lengths = p.add_mutually_exclusive_group(required=True)
    lengths.add_argument("--lengths", help="comma-separated evaluation lengths in tokens, e.g. 32,64,128")
    lengths.add_argument("--length-factors", help="comma-separated multiples of the training length, e.g. 0.25,1,4")
    p.add_argument("--mode", choices=("window", "stream", "both"), default="both", help="see the module docstring")
    p.add_argument("--subset", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", help="output directory for the JSON, the markdown table and the PNG")
    p.add_argument("--streams", type=int, default=1, help="stream mode: number of contiguous streams (default 1)")
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="window mode: windows per batch x length")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the subset (quick runs)")
    p.add_argument(
        "--model-overrides",
        default="{}",
        help="dict of model options, as fairseq-eval-lm takes it (a Python literal; JSON works too), "
        "e.g. \"{'mem_len': 256}\"; unknown names are refused",
    )
    p.add_argument("--name", help="label of this model in the outputs (default: the checkpoint's directory name)")
    p.add_argument("--cpu", action="store_true", help="evaluate on CPU even if a GPU is available")
    return p.parse_args(argv)


# ---- loading ---------------------------------------------------------------------------------------------
def load(path: str, data: str, user_dir: Optional[str], overrides: Optional[dict] = None):
    """(model in eval mode, task, checkpoint cfg) through fairseq's own loader, any registered model."""
    from fairseq import checkpoint_utils, utils

    if user_dir:
        utils.import_user_module(argparse.Namespace(user_dir=os.path.abspath(user_dir)))
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint '{path}' not found")
    if not os.path.exists(os.path.join(data, "dict.txt")):
        raise SystemExit(f"error: '{data}' has no dict.txt: give the data-bin the model was trained on")
    # fairseq's legacy models (e.g. lstm_lm) pickle their argparse.Namespace; allow that one plain class
    # (torch >= 2.6 loads with weights_only=True), nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [path], arg_overrides={"data": data, **(overrides or {})}
        )
    return models[0].eval(), task, cfg


def token_unit(task, data: str) -> str:
    unit = getattr(task, "token_unit", None)
    if unit is None:
        from plugins.tasks.segment_lm import guess_token_unit

        unit = guess_token_unit(data, task.target_dictionary)
    return unit


def position_limit(model) -> Optional[int]:
    """The longest window the model can represent, or None when positions are unbounded (sinusoids,
    relative / rotary / ALiBi / no positions, recurrence): only a learned position table runs out."""
    from fairseq.modules import LearnedPositionalEmbedding

    decoder = model.decoder
    table = getattr(decoder, "embed_positions", None)  # fairseq's transformer_lm
    if isinstance(table, LearnedPositionalEmbedding):
        return int(table.max_positions)
    if table is not None or not hasattr(decoder, "positions"):  # fairseq sinusoids, LSTMs
        return None
    own = getattr(decoder.positions, "max_positions", None)  # efficient_lm: only a learned table has one
    return None if own is None else int(own)


def read_stream(task, data: str, subset: str, max_tokens: Optional[int]) -> np.ndarray:
    """The subset as one flat token array (fairseq's binarized stream, ``</s>`` at line ends)."""
    from fairseq.data import data_utils

    from plugins.tasks.stream_dataset import flat_tokens

    split_path = os.path.join(data, subset)
    dataset = data_utils.load_indexed_dataset(split_path, task.target_dictionary)
    if dataset is None:
        raise SystemExit(f"error: split '{subset}' not found in {data} (expected {subset}.bin / {subset}.idx)")
    tokens = flat_tokens(dataset, split_path + ".bin")
    return tokens[:max_tokens] if max_tokens else tokens


# ---- scoring -----------------------------------------------------------------------------------------------
class PositionLoss:
    """Sum and count of the loss (bits) at every position of a window / segment."""

    def __init__(self, length: int, device):
        self.sum = torch.zeros(length, dtype=torch.float64, device=device)
        self.count = torch.zeros(length, dtype=torch.float64, device=device)

    def add(self, bits: torch.Tensor, mask: torch.Tensor) -> None:  # B x T each
        T = bits.size(1)
        self.sum[:T] += (bits * mask).sum(0).double()
        self.count[:T] += mask.sum(0).double()

    def result(self) -> dict:
        total, n = float(self.sum.sum()), int(self.count.sum())
        curve = (self.sum / self.count.clamp(min=1)).tolist()
        return {"loss": total / max(n, 1), "tokens": n, "position_loss": curve, "position_count": self.count.tolist()}


def token_bits(model, src: torch.Tensor, tgt: torch.Tensor, pad: int, **net_input):
    """B x T loss of every target in bits, and the mask of real (non-pad) targets."""
    net_output = model(src, **net_input)
    # fairseq's own normalization (adaptive softmax included), in float32 as fairseq-eval-lm's scorer
    lprobs = model.get_normalized_probs(net_output, log_probs=True, sample={"target": tgt}).float()  # B x T x V
    mask = tgt.ne(pad)
    bits = -lprobs.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) / math.log(2)  # B x T
    return bits.masked_fill(~mask, 0.0), mask.to(bits.dtype)


def _pad_to(t: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.size(1)), value=pad)


@torch.no_grad()
def evaluate_windows(model, tokens: np.ndarray, length: int, eos: int, pad: int, device, tokens_per_batch: int):
    """Non-overlapping windows of ``length`` over the eos-prefixed stream, each from an empty context."""
    from plugins.tasks.stream_dataset import SegmentStreamDataset

    layout = SegmentStreamDataset(tokens, eos=eos, pad=pad, segment_len=length, streams_per_rank=1)
    acc = PositionLoss(length, device)
    per_batch = max(1, tokens_per_batch // length)
    for first in progress(range(0, len(layout), per_batch), f"window L={length}", "batch"):
        items = [layout[i] for i in range(first, min(first + per_batch, len(layout)))]
        width = max(item["target"].size(1) for item in items)  # only the last window may be shorter
        src = torch.cat([_pad_to(item["net_input"]["src_tokens"], width, pad) for item in items]).to(device)  # W x L
        tgt = torch.cat([_pad_to(item["target"], width, pad) for item in items]).to(device)
        acc.add(*token_bits(model, src, tgt, pad))
    return acc.result()


@torch.no_grad()
def evaluate_streams(model, tokens: np.ndarray, length: int, eos: int, pad: int, device, streams: int):
    """Contiguous streams of consecutive segments, the model's state carried across them (segment_lm)."""
    from plugins.tasks.stream_dataset import SegmentStreamDataset

    layout = SegmentStreamDataset(tokens, eos=eos, pad=pad, segment_len=length, streams_per_rank=streams)
    acc = PositionLoss(length, device)
    model.reset_memory("eval")  # a new pass starts afresh (as segment_lm's validation does)
    for i in progress(range(len(layout)), f"stream L={length}", "segment"):
        batch = layout[i]
        src, tgt = batch["net_input"]["src_tokens"].to(device), batch["target"].to(device)
        acc.add(*token_bits(model, src, tgt, pad, stream_offset=batch["net_input"]["stream_offset"]))
    model.reset_memory("eval")
    return acc.result()


def progress(items, desc: str, unit: str):
    """``items`` with a tqdm bar on stderr once a pass has taken a few seconds (a long sweep is not silent)."""
    from tqdm import tqdm

    return tqdm(items, desc=f"  {desc}", unit=unit, delay=3, leave=False, file=sys.stderr, mininterval=1.0)


def metric_value(metric: str, loss_bits: float) -> float:
    return 2.0**loss_bits if metric == "ppl" else loss_bits


def run(args, argv_command: Optional[list] = None) -> dict:
    """Evaluate ``args`` (from ``parse_args``); ``argv_command`` is recorded in the report (default: sys.argv)."""
    from plugins.errors import UserError

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    from plugins.cli import check_override_keys, parse_overrides
    from plugins.tasks.segment_lm import describe_memory, known_option_names

    overrides = parse_overrides(args.model_overrides)
    model, task, cfg = load(args.path, args.data, args.user_dir, overrides)
    check_override_keys(overrides, known_option_names(cfg.model, cfg.task))
    print(describe_memory(cfg.model, overrides), flush=True)
    model.to(device)
    train_length = int(cfg.task.tokens_per_sample)
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [max(1, round(float(f) * train_length)) for f in args.length_factors.split(",")]
    unit = token_unit(task, args.data)
    metric = UNIT_METRIC[unit]
    dictionary = task.target_dictionary
    tokens = read_stream(task, args.data, args.subset, args.max_tokens)
    limit = position_limit(model)
    stateful = bool(getattr(model.decoder, "carries_state", False)) and hasattr(model, "reset_memory")
    modes = ["window", "stream"] if args.mode == "both" else [args.mode]
    name = args.name or Path(args.path).resolve().parent.name
    arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", "?")
    print(f"{name}: {arch}, trained at {train_length} tokens; {args.subset}: {len(tokens)} {unit} tokens, "
          f"metric {metric}; position limit {limit or 'none'}; carries state: {stateful}")  # fmt: skip

    results = []
    for mode in modes:
        for length in lengths:
            row = {"mode": mode, "length": length, "factor": length / train_length}
            if mode == "stream" and not stateful:
                row["skipped"] = "the model carries no state across segments (stream = window)"
            elif limit is not None and length > limit:
                row["skipped"] = f"{length} tokens exceed the model's {limit} learned positions"
            else:
                start = time.perf_counter()
                try:
                    if mode == "window":
                        r = evaluate_windows(model, tokens, length, dictionary.eos(), dictionary.pad(), device,
                                             args.tokens_per_batch)  # fmt: skip
                    else:
                        r = evaluate_streams(model, tokens, length, dictionary.eos(), dictionary.pad(), device,
                                             args.streams)  # fmt: skip
                except UserError as e:
                    row["skipped"] = str(e)
                else:
                    row.update(r, **{metric: metric_value(metric, r["loss"]), "seconds": time.perf_counter() - start})
            if "skipped" in row:
                print(f"  {mode:6s} L={length:6d}: skipped: {row['skipped']}")
            else:
                print(f"  {mode:6s} L={length:6d}: {metric} {row[metric]:.4f} (loss {row['loss']:.4f} bits, "
                      f"{row['tokens']} tokens, {row['seconds']:.1f} s)")  # fmt: skip
            results.append(row)
    report = {
        "name": name, "checkpoint": os.path.abspath(args.path), "arch": arch, "data": os.path.abspath(args.data),
        "subset": args.subset, "unit": unit, "metric": metric, "train_length": train_length,
        "params": sum(p.numel() for p in model.parameters()), "targets": int(len(tokens)), "streams": args.streams, "position_limit": limit, "carries_state": stateful,
        "results": results, "command": sys.argv[1:] if argv_command is None else argv_command,
    }  # fmt: skip
    if args.out:
        write_outputs(report, Path(args.out))
    return report


# ---- outputs -----------------------------------------------------------------------------------------------
def markdown_table(report: dict) -> str:
    metric, unit = report["metric"], report["unit"]
    modes = [m for m in ("window", "stream") if any(r["mode"] == m for r in report["results"])]
    by = {(r["mode"], r["length"]): r for r in report["results"]}
    lengths = sorted({r["length"] for r in report["results"]})
    head = f"| length ({unit}s) | x train |" + "".join(f" {metric} {m} |" for m in modes)
    lines = [head, "|---:|---:|" + "---:|" * len(modes)]
    for length in lengths:
        cells = []
        for m in modes:
            r = by.get((m, length))
            cells.append("skipped" if r is None or "skipped" in r else f"{r[metric]:.4f}")
        lines.append(f"| {length} | {length / report['train_length']:g} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "context_eval.json").write_text(json.dumps(report, indent=1))
    skipped = [f"- {r['mode']} L={r['length']}: {r['skipped']}" for r in report["results"] if "skipped" in r]
    (out / "context_eval.md").write_text(
        f"{report['name']} ({report['arch']}, trained at {report['train_length']} tokens), "
        f"{report['subset']} of {report['data']}: {report['metric']} per evaluation length\n\n"
        + markdown_table(report)
        + ("\n" + "\n".join(skipped) + "\n" if skipped else "")
    )
    plot_position_loss(report, out / "position_loss.png")


def binned_curve(loss: list, count: list, bins: int = 24):
    """(positions, mean loss) over log-spaced bins of positions 1..L, count-weighted (the raw curve of a
    short test set is noise at large positions, where every position has few samples)."""
    loss, count = np.asarray(loss), np.asarray(count)
    edges = np.unique(np.round(np.geomspace(1, len(loss) + 1, bins + 1)).astype(int))
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = count[lo - 1 : hi - 1].sum()
        if n > 0:
            xs.append(float(np.sqrt(lo * (hi - 1))) if hi - 1 > lo else float(lo))
            ys.append(float((loss[lo - 1 : hi - 1] * count[lo - 1 : hi - 1]).sum() / n))
    return xs, ys


def plot_position_loss(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("window", "stream") if any(r["mode"] == m and "loss" in r for r in report["results"])]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for r in report["results"]:
            if r["mode"] == mode and "loss" in r:
                ax.plot(*binned_curve(r["position_loss"], r["position_count"]), label=f"L={r['length']}", lw=1)
        ax.set_xscale("log")
        ax.axvline(report["train_length"], color="gray", ls=":", lw=1)
        where = "window (tokens seen + 1)" if mode == "window" else "segment"
        ax.set_xlabel(f"position in the {where}, log-spaced bins")
        ax.set_ylabel(f"mean loss (bits per {report['unit']})")
        ax.set_title(f"{report['name']}: {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # every result line as it comes, also into a pipe or a file
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    report = run(args)
    print(markdown_table(report), end="")


if __name__ == "__main__":
    main()

"""Plot the learned attention span of every head of every layer from a checkpoint (the span-per-head figure
of Sukhbaatar et al. 2019, arXiv 1905.07799).

    python -m recipes.adaptive_span.plot_spans checkpoints/adaptive_span_enwik8_small/checkpoint_best.pt \
        --out spans.png

The spans are read from the ``...attn.span_fraction`` parameters (s_h in [0, 1]) times ``--max-span`` from
the checkpoint's model config. The checkpoint is loaded with ``torch.load(weights_only=True)`` (plus
``argparse.Namespace``, which fairseq may store): no code from the file is run. A table of spans (positions) per layer is printed as well.
"""

import argparse
import re
import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

import torch

SPAN_KEY = re.compile(r"decoder\.layers\.(\d+)\.attn\.span_fraction$")


def load_checkpoint(path) -> dict:
    """``torch.load(weights_only=True)``; fairseq may store its options as an ``argparse.Namespace`` (a plain
    attribute container), the one class allowed besides tensors and builtins."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_spans(path) -> Tuple[List[List[float]], int]:
    """Per layer, the spans of its heads in positions; and the model's max span S."""
    state = load_checkpoint(path)
    model_cfg = state["cfg"]["model"]
    max_span = int(model_cfg["max_span"])
    found = {int(m.group(1)): v for k, v in state["model"].items() if (m := SPAN_KEY.search(k))}
    if not found:
        raise SystemExit(
            f"error: {path} holds no adaptive span parameters (was it trained with --attention adaptive_span?)"
        )
    layers = [(found[i].float().clamp(0, 1) * max_span).tolist() for i in sorted(found)]
    return layers, max_span


def plot(layers: List[List[float]], max_span: int, out: Path, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(len(h) for h in layers)
    width = 0.8 / heads
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers) + 2), 3.5))
    for h in range(heads):
        xs = [i + (h - (heads - 1) / 2) * width for i in range(len(layers))]
        heights = [max(spans[h], 1.0) for spans in layers]  # log axis: spans under one position drawn at 1
        ax.bar(xs, heights, width=width, color=plt.cm.viridis(h / max(heads - 1, 1)))
    ax.set_xticks(range(len(layers)), [str(i + 1) for i in range(len(layers))])
    ax.set_xlabel("layer")
    ax.set_ylabel("attention span (positions)")
    ax.set_yscale("log")
    ax.set_ylim(0.5, max_span * 1.2)  # from 0.5: a span under one position shows as a stub at 1
    ax.axhline(max_span, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(textwrap.fill(title or f"learned span per head (max span {max_span})", 60), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=Path("spans.png"), help="PNG file to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    layers, max_span = load_spans(args.checkpoint)
    for i, spans in enumerate(layers):
        print(f"layer {i + 1:2d}: " + " ".join(f"{s:7.1f}" for s in spans) + f"   mean {sum(spans) / len(spans):7.1f}")
    plot(layers, max_span, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

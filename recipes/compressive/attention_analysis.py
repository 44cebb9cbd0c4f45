"""Where does a trained Compressive Transformer look? (Rae et al. 2020, the analysis of attention over the
memories: average attention weight over the compressed memory, the memory and the current segment).

    python -m recipes.compressive.attention_analysis --path CKPT --data DATA-BIN [--split valid]
        [--segments 32] [--bins 8] [--out attention.png]

Runs the checkpoint over the first ``--segments`` segments of the split's streams (``segment_lm``: every
segment continues the memory of the previous one), and at every layer records the attention weights
(``CompressiveAttention.attention_weights``) over the three key spans: compressed memory, memory, segment.
Only segments whose compressed memory is full are counted (steady state). Two panels:

- left: the average attention weight one key receives (over the queries that may see it: every query for
  memory keys, the later ones for segment keys), per span cut into ``--bins`` bins, oldest first, one line
  per layer and their mean (the paper's figure);
- right: the share of the attention mass of each span, per layer.

Also writes ``<out>.json`` with the numbers.
"""

import argparse
import json
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
SPANS = ("compressed", "memory", "segment")


def load(path: str, data: str, split: str):
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(Namespace(user_dir=str(ROOT / "plugins")))
    from plugins.attention.compressive import CompressiveAttention
    from plugins.errors import UserError

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    layers = model.decoder.layers
    if not all(isinstance(layer.attn, CompressiveAttention) for layer in layers):
        raise UserError(f"{path} is not a --attention compressive model")
    if model.decoder.mem_len == 0 or layers[0].attn.cfg.cmem_len == 0:
        raise UserError(f"{path} has no compressed memory (--mem-len and --cmem-len must be > 0)")
    task.load_dataset(split)
    return model, task.dataset(split)


def collect(model, dataset, segments: int, bins: int) -> Dict:
    """Per layer: summed average weight per bin of each span, and the attention mass per span."""
    num_layers = model.decoder.num_layers
    cmem_len = model.decoder.layers[0].attn.cfg.cmem_len
    per_key = torch.zeros(num_layers, len(SPANS), bins, dtype=torch.float64)
    mass = torch.zeros(num_layers, len(SPANS), dtype=torch.float64)
    counted = [0]
    depth = [0]

    def hook(attn, args, kwargs, output):
        x, mem = args[0], args[1]
        layer = depth[0] % num_layers
        depth[0] += 1
        weights, (N, M, T) = attn.attention_weights(x, mem, kwargs.get("norm"))  # B x H x T x S (pre-norm: LN)
        if N < cmem_len:
            return  # not yet at steady state
        w = weights.double().mean(dim=(0, 1))  # T x S, averaged over streams and heads
        received = w.sum(dim=0)  # S: total weight each key received
        viewers = torch.cat([torch.full((N + M,), float(T)), torch.arange(T, 0, -1).double()])  # queries per key
        average = received / viewers
        for i, (lo, hi) in enumerate(((0, N), (N, N + M), (N + M, N + M + T))):
            mass[layer, i] += w[:, lo:hi].sum() / T
            per_key[layer, i] += torch.stack([b.mean() for b in average[lo:hi].tensor_split(bins)])
        if layer == 0:
            counted[0] += 1

    handles = [layer.attn.register_forward_hook(hook, with_kwargs=True) for layer in model.decoder.layers]
    try:
        with torch.no_grad():
            for i in range(min(segments, len(dataset))):
                net_input = dataset[i]["net_input"]
                model(net_input["src_tokens"], stream_offset=net_input["stream_offset"])
    finally:
        for h in handles:
            h.remove()
    n = max(counted[0], 1)
    return {"segments_counted": counted[0], "per_key": (per_key / n).tolist(), "mass": (mass / n).tolist()}


def plot(result: Dict, out: Path, bins: int) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's loading leaves the root logger at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_key = torch.tensor(result["per_key"])  # layers x spans x bins
    mass = torch.tensor(result["mass"])  # layers x spans
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    x = torch.arange(len(SPANS) * bins)
    for layer in range(per_key.size(0)):
        left.plot(x, per_key[layer].flatten(), color="0.75", linewidth=1)
    left.plot(x, per_key.mean(0).flatten(), color="C0", linewidth=2, label="mean over layers")
    for i in range(1, len(SPANS)):
        left.axvline(i * bins - 0.5, color="k", linestyle=":")
    left.set_xticks([i * bins + (bins - 1) / 2 for i in range(len(SPANS))], ["compressed memory", "memory", "segment"])
    left.set_ylabel("average attention weight per key")
    left.set_yscale("log")
    left.legend()
    bottom = torch.zeros(mass.size(0))
    for i, name in enumerate(SPANS):
        right.bar(torch.arange(mass.size(0)), mass[:, i], bottom=bottom, label=name)
        bottom += mass[:, i]
    right.set_xlabel("layer")
    right.set_ylabel("share of attention mass")
    right.legend()
    fig.suptitle(f"attention over [compressed memory; memory; segment], {result['segments_counted']} segments")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint of a --attention compressive model")
    p.add_argument("--data", required=True, help="the data-bin it was trained on")
    p.add_argument("--split", default="valid", help="split to read (segment_lm streams)")
    p.add_argument("--segments", type=int, default=32, help="segments to run (the first ones fill the memories)")
    p.add_argument("--bins", type=int, default=8, help="bins per span in the left panel")
    p.add_argument("--out", default="attention.png", help="output PNG (and .json next to it)")
    a = p.parse_args(argv)
    model, dataset = load(a.path, a.data, a.split)
    result = collect(model, dataset, a.segments, a.bins)
    if result["segments_counted"] == 0:
        p.error(f"the compressed memory never filled in {a.segments} segments: raise --segments")
    out = Path(a.out)
    plot(result, out, a.bins)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    mean = torch.tensor(result["mass"]).mean(0).tolist()
    print("share of attention mass (mean over layers): " + ", ".join(f"{s} {m:.3f}" for s, m in zip(SPANS, mean)))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

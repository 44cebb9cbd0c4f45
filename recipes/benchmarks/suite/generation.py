"""Generation: time per token vs position with fairseq's ``SequenceGenerator`` (sampling, beam 1).

A randomly initialised ``efficient_lm`` (speed does not depend on the weights) generates exactly
``tokens`` tokens after ``</s>`` (``min_len = max_len``, so no early stop); a wrapper around the decoder's forward
stamps every step, so the time of a step is everything the generator does for that token (decoder call
with ``incremental_state``, log-softmax, sampling, bookkeeping). Each mechanism decodes with its own
state: the K/V cache for full, sparse and LSH attention (grows with the position), a bounded memory for
Transformer-XL (``--mem-len``), memory + compressed memory for the Compressive Transformer, a memory as
long as the largest span for adaptive span, (S, Z) for linear attention (constant). ``late / early``:
mean step time over the last 64 positions divided by that over positions 64-127 (the promise of RNN-mode
decoding is ~1.0).
"""

import time
from types import SimpleNamespace
from typing import Dict, List

import torch

WINDOW = 64

# (attention, label, option overrides) of the generation cases; ``pos_emb`` is the attention's own encoding
# if it has one, else none (as in the layer section). Options not valid for an attention are rejected by
# the model's own validation and reported as an error row.
CASES: List[Dict] = [
    {"attention": "full", "label": "KV cache", "options": {}},
    {"attention": "relative", "label": "mem 512", "options": {"mem_len": 512}},
    {"attention": "compressive", "label": "mem 256 + cmem 64 (c=4)",
     "options": {"mem_len": 256, "cmem_len": 64, "compression_rate": 4}},
    {"attention": "adaptive_span", "label": "span <= 512, mem 512", "options": {"max_span": 512, "mem_len": 512}},
    {"attention": "sparse", "label": "fixed, KV cache", "options": {}},
    {"attention": "lsh", "label": "1 hash, KV cache", "options": {"lsh_n_hashes": 1}},
    {"attention": "linear", "label": "RNN state", "options": {}},
]  # fmt: skip


def build_model(spec: Dict):
    from fairseq.data import Dictionary

    from plugins.attention import ATTENTION_REGISTRY
    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig

    from .layer import default_pos_emb

    dictionary = Dictionary()
    for b in range(256):
        dictionary.add_symbol(str(b))
    cfg = EfficientLMConfig()
    values = dict(attention=spec["attention"], decoder_layers=spec["L"], decoder_embed_dim=spec["D"],
                  decoder_ffn_embed_dim=4 * spec["D"], decoder_attention_heads=spec["H"], dropout=0.0,
                  tokens_per_sample=spec["tokens"], max_target_positions=spec["tokens"] + 1)  # fmt: skip
    # tokens_per_sample = tokens (multiples of 64: LSH's chunks must divide it); positions up to tokens + 1
    values["pos_emb"] = default_pos_emb(ATTENTION_REGISTRY[spec["attention"]].cls)
    for name, value in {**values, **spec["options"]}.items():
        setattr(cfg, name, value)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, token_unit="byte")
    return EfficientLM.build_model(cfg, task).to(spec["device"]).eval(), dictionary


def measure(spec: Dict) -> Dict:
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    model, dictionary = build_model(spec)
    n = spec["tokens"]
    generator = SequenceGenerator(
        [model], dictionary, beam_size=1, max_len_a=0, max_len_b=n, min_len=n, max_len=n + 1,
        search_strategy=search.Sampling(dictionary, sampling_topk=10),
    )  # fmt: skip
    stamps: List[float] = []
    decoder_forward = model.decoder.forward  # the generator calls decoder.forward directly (no hooks)

    def stamped_forward(*args, **kwargs):
        out = decoder_forward(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    model.decoder.forward = stamped_forward
    src = torch.full((1, 1), dictionary.eos(), dtype=torch.long, device=spec["device"])
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([1])}}
    start = time.perf_counter()
    with torch.no_grad():
        hypo = generator.generate([model], sample)[0][0]
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]  # one decoder call per generated token
    early = steps[WINDOW : 2 * WINDOW]
    late = steps[-WINDOW:]
    return {
        "generated": int(hypo["tokens"].numel()),
        "tokens_per_s": len(steps) / total,
        "early_ms": 1000 * sum(early) / len(early),
        "late_ms": 1000 * sum(late) / len(late),
        "late_over_early": sum(late) / sum(early),
        "profile_ms": [
            round(1000 * sum(steps[i : i + WINDOW]) / len(steps[i : i + WINDOW]), 3)
            for i in range(0, len(steps), WINDOW)
        ],  # fmt: skip
    }

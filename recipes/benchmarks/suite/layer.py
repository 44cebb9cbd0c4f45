"""Layer scaling: one attention layer, forward + backward, time and peak memory vs sequence length N.

Every registered attention runs with its default options and with the variants listed in ``VARIANTS``
(the options that change its cost: sparse patterns, LSH hashes, feature maps, spans, ...). Public
implementations of the same mechanisms run in the same suite when installed (``peers``). Shapes: one
sequence (B = 1) of N positions, model dim D, H heads, float32 on CPU (bf16 autocast available on CUDA).

The memory variants (label ``MEMORY_LABEL``, issue 18's "T = M = N/2 with memory"): the layer's forward gets
the first N/2 positions as its memory (``HiddenMemory``, detached as in Transformer-XL) and the last N/2 as the
segment: N/2 queries over N keys. Their SDPA reference is ``full`` with the same memory (SDPA over the same N
keys, N/2 queries, causal with the memory as a visible prefix), not ``full`` at N (twice the queries).
"""

import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from ..memory import peak_memory
from .peers import PEERS

# name -> [(label, option overrides)]; a registered attention missing here runs once with its defaults.
VARIANTS: Dict[str, List[Tuple[str, Dict]]] = {
    "naive": [],  # the einsum test reference: O(N^2) memory by construction, not a mechanism to rank
    # bucket 64, as the peer's; 1, 2 and 4 rounds as issue 18 compares them
    "lsh": [("H=1", {"lsh_n_hashes": 1}), ("H=2", {"lsh_n_hashes": 2}), ("H=4", {"lsh_n_hashes": 4})],
    "sparse": [
        ("fixed, L=sqrt N", {"sparse_pattern": "fixed", "sparse_stride": "sqrt N"}),
        ("strided, L=sqrt N", {"sparse_pattern": "strided", "sparse_stride": "sqrt N"}),
        # the paper's recomputation of the scores in the backward pass (Child et al. 2019, Sec. 5.4)
        (
            "fixed, L=sqrt N, checkpoint",
            {"sparse_pattern": "fixed", "sparse_stride": "sqrt N", "sparse_checkpoint": True},
        ),
        # distinct summary sub-blocks per head (Child et al. 2019, Sec. 4.3; openai's num_verts): the same keys
        # per query as "fixed" (c = 8, the default) wherever 2 blocks of 8 fit in L (N > 128)
        (
            "fixed, 2 summary blocks, L=sqrt N",
            {
                "sparse_pattern": "fixed",
                "sparse_stride": "sqrt N",
                "sparse_summary_blocks": 2,
                "sparse_summary": "8, <= sqrt N / 2",
            },
        ),
    ],  # the paper's L
    "linear": [("elu", {"feature_map": "elu"}), ("favor", {"feature_map": "favor"})],
    # --relative-route auto (the explicit route: distance_bias.py, in query chunks) and fused (the sinusoid
    # identity, one SDPA call), paired in the same run
    # and the memory case (T = M = N/2)
    "relative": [("", {}), ("fused", {"relative_route": "fused"}), ("memory T=M=N/2", {"memory_length": "N/2"})],
    # the default (--span-init 0: a short learned window) and the full span (every head sees all N keys)
    "adaptive_span": [
        ("", {}),
        ("full span", {"span_init": 1.0, "max_span": "N"}),
        ("full span, memory T=M=N/2", {"span_init": 1.0, "max_span": "N", "memory_length": "N/2"}),
    ],
    "compressive": [("", {}), ("memory T=M=N/2", {"memory_length": "N/2"})],
    "full": [("", {}), ("memory T=M=N/2", {"memory_length": "N/2"})],  # the memory variants' SDPA reference
}
MEMORY_LABEL = "memory T=M=N/2"  # in the label of every memory variant
MEMORY_OPTION = "memory_length"  # not a model option: the memory the forward is called with (``build_ours``)


def sqrt_stride(n: int) -> int:
    """The power of two at or above sqrt(n): Child et al. 2019's stride L ~ sqrt(N) (O(N sqrt N) work)."""
    return 2 ** math.ceil(math.log2(n) / 2)


LENGTH_DEPENDENT = {  # option values that depend on the length N
    "sqrt N": sqrt_stride,
    "8, <= sqrt N / 2": lambda n: min(8, sqrt_stride(n) // 2),  # two summary blocks of c fit in the stride
    "N": lambda n: n,
    "N/2": lambda n: n // 2,
}


def resolve(options: Dict, n: int) -> Dict:
    """``options`` at length ``n``: the values named in ``LENGTH_DEPENDENT`` are computed for ``n``."""
    return {k: LENGTH_DEPENDENT[v](n) if isinstance(v, str) and v in LENGTH_DEPENDENT else v
            for k, v in options.items()}  # fmt: skip


def default_pos_emb(attention_cls) -> str:
    return attention_cls.encodes_positions[0] if attention_cls.requires_own_positions else "none"


def cases(lengths: List[int], dim: int, heads: int, device: str) -> List[Dict]:
    """Every (attention, variant, N) to measure, in a stable order."""
    from plugins.attention import ATTENTION_REGISTRY

    out = []
    for name, entry in sorted(ATTENTION_REGISTRY.items()):
        base = {"pos_emb": default_pos_emb(entry.cls)}
        for label, options in VARIANTS.get(name, [("", {})]):
            for n in lengths:
                out.append(dict(attention=name, label=label, N=n, D=dim, H=heads, device=device,
                                options=resolve({**base, **options}, n)))  # fmt: skip
    return out


def build_attention_module(spec: Dict):
    """Our attention module for ``spec`` (attention, options, N, D, H, device), validated like a model."""
    from plugins.attention import build_attention
    from plugins.models.efficient_lm import EfficientLMConfig, validate_config

    cfg = EfficientLMConfig()
    cfg.attention, cfg.decoder_embed_dim, cfg.decoder_attention_heads = spec["attention"], spec["D"], spec["H"]
    cfg.tokens_per_sample = cfg.max_target_positions = spec["N"]
    for name, value in spec["options"].items():
        if name != MEMORY_OPTION:
            setattr(cfg, name, value)
    validate_config(cfg)  # an invalid variant fails here, with its message in the row
    return build_attention(cfg.attention, spec["D"], spec["H"], 0.0, cfg).to(spec["device"])


def build_ours(spec: Dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's forward on x (B x N x D); with ``MEMORY_OPTION`` M, the first M positions of x are the
    memory (detached) and the last N - M the segment: B x (N - M) x D."""
    from plugins.memory import HiddenMemory

    attn = build_attention_module(spec)
    M = spec["options"].get(MEMORY_OPTION, 0)
    if not M:
        return lambda x: attn(x, None, 0)[0]
    if spec["attention"] == "compressive":
        from plugins.attention.compressive import CompressiveMemory

        return lambda x: attn(x[:, M:], CompressiveMemory(x[:, :M].detach()), M)[0]
    return lambda x: attn(x[:, M:], HiddenMemory(x[:, :M].detach()), M)[0]


def measure(spec: Dict, forward: Callable[[torch.Tensor], torch.Tensor], repeats: int) -> Dict:
    """One warm-up forward + backward, then the median time of ``repeats`` more; the first of them also
    gives the peak memory (``recipes.benchmarks.memory.peak_memory``: what the step adds above what was
    held before it, first-call allocations excluded by the warm-up)."""
    device = torch.device(spec["device"])
    x = torch.randn(1, spec["N"], spec["D"], device=device, requires_grad=True)  # B x N x D
    times = []

    def step():
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("bf16", False)):
            out = forward(x)
        out.float().square().mean().backward()
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    step()  # warm-up: thread pools, kernel choice, parameter gradients, lazily built buffers
    times.clear()
    peak, exact = peak_memory(step, device)
    for _ in range(repeats - 1):
        step()
    return {"time_ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20, "peak_exact": exact}


def add_ratios(rows: List[Dict]) -> None:
    """ratio_sdpa: time and memory over ``full`` (PyTorch SDPA) at the same N (the memory variants: over ``full``
    with the same memory, N/2 queries over N keys); ratio_peer: time over the
    fastest installed public implementation of the same function at the same N (``Peer.same_function``)."""
    ok = [r for r in rows if r["status"] == "ok"]
    sdpa = {(r["N"], r.get("label", "")): r for r in ok if r.get("attention") == "full"}
    for r in ok:
        ref = sdpa.get((r["N"], MEMORY_LABEL if MEMORY_LABEL in r.get("label", "") else ""))  # memory: full's memory
        if ref:
            r["time_vs_sdpa"] = r["time_ms"] / ref["time_ms"]
            r["mem_vs_sdpa"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
        peers = [p for p in ok if p.get("peer") and p.get("mechanism") == r.get("attention") and p["N"] == r["N"]
                 and p.get("label") == r.get("label") and PEERS[p["peer"]].same_function]  # fmt: skip
        if peers and not r.get("peer"):
            r["time_vs_best_peer"] = r["time_ms"] / min(p["time_ms"] for p in peers)

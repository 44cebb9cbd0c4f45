"""Public implementations measured next to ours (only those importable here; the rest are reported as
``not installed``). Each adapter builds a causal self-attention layer of model dim D and H heads and
returns ``forward(x: B x N x D) -> B x N x D``; ``mechanism`` is our attention it is compared with.

Install them (optional, benchmarks only) with ``bash recipes/benchmarks/install_peers.sh``: into
``runs/peers`` with ``--no-deps`` (the installed torch is never touched); the suite puts that folder on
the workers' ``PYTHONPATH`` (``--peers-path``).
"""

from typing import Callable, Dict, NamedTuple, Tuple

import torch


class Peer(NamedTuple):
    mechanism: str
    build: Callable[[Dict], Callable[[torch.Tensor], torch.Tensor]]
    variants: Tuple[str, ...] = ()  # the labels of ``layer.VARIANTS[mechanism]`` it implements (empty: all)
    # False: a related but different function (shown in the tables, left out of the "best peer" ratio)
    same_function: bool = True


def _reformer_lsh(spec: Dict):
    from reformer_pytorch import LSHSelfAttention

    o = spec.get("options", {})
    attn = LSHSelfAttention(dim=spec["D"], heads=spec["H"], bucket_size=o.get("lsh_bucket_size", 64),
                            n_hashes=o.get("lsh_n_hashes", 1), causal=True)  # fmt: skip
    # (its default chunking: attend within the bucket-sized chunk and the previous one, as ours)
    attn = attn.to(spec["device"])
    return lambda x: attn(x)


def _between_our_linear_projections(spec: Dict, kernel: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our linear layer's q/k/v and output projections around a peer's causal ``kernel(q, k, v)`` (all
    B x H x N x Dh): the attention kernels are compared, not the projections around them."""
    from .layer import build_attention_module

    attn = build_attention_module({**spec, "attention": "linear", "options": {"pos_emb": "none"}})

    def forward(x):
        q = attn.split_heads(attn.q_proj(x))  # B x H x N x Dh
        k, v = (attn.split_heads(t) for t in attn.kv_proj(x).chunk(2, dim=-1))
        return attn.out_proj(attn.merge_heads(kernel(q, k, v)))

    return forward


def _linear_attention_transformer(spec: Dict):
    """lucidrains' ``causal_linear_attn`` (chunks of 64) between our linear layer's own projections. Not the
    same function: it applies its
    own feature maps (softmax over q's features, exp of k) and a query sees only the chunks before its own
    (its own chunk's keys are left out, so the first chunk attends to nothing), which skips the C x C
    products an exact causal kernel needs."""
    from linear_attention_transformer.linear_attention_transformer import causal_linear_attn

    return _between_our_linear_projections(spec, lambda q, k, v: causal_linear_attn(q, k, v, bucket_size=64))


def _fast_transformers(spec: Dict):
    """idiap's fast-transformers (the linear-attention paper's own code): ``CausalLinearAttention`` (elu + 1
    features, its C++ ``causal_dot_product`` kernel) between our linear layer's projections, as above."""
    from fast_transformers.attention.causal_linear_attention import CausalLinearAttention
    from fast_transformers.masking import LengthMask, TriangularCausalMask

    inner = CausalLinearAttention(query_dimensions=spec["D"] // spec["H"])

    def kernel(q, k, v):  # B x H x N x Dh; fast-transformers' layout is B x N x H x Dh
        batch, _, n, _ = q.shape
        lengths = LengthMask(torch.full((batch,), n, dtype=torch.long, device=q.device), max_len=n)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return inner(q, k, v, TriangularCausalMask(n, device=q.device), lengths, lengths).transpose(1, 2)

    return _between_our_linear_projections(spec, kernel)


PEERS: Dict[str, Peer] = {
    "reformer-pytorch": Peer("lsh", _reformer_lsh),
    "linear-attention-transformer": Peer("linear", _linear_attention_transformer, ("elu",), same_function=False),
    "fast-transformers": Peer("linear", _fast_transformers, ("elu",)),
}

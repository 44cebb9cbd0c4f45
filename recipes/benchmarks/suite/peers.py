"""Public implementations measured next to ours (only those importable here; the rest are reported as
``not installed``). Each adapter builds a causal self-attention layer of model dim D and H heads and
returns ``forward(x: B x N x D) -> B x N x D``; ``mechanism`` is our attention it is compared with.

Install them (optional, benchmarks only) with ``bash recipes/benchmarks/install_peers.sh``: into
``runs/peers`` with ``--no-deps`` (the installed torch is never touched); the suite puts that folder on
the workers' ``PYTHONPATH`` (``--peers-path``).
"""

from typing import Callable, Dict, NamedTuple

import torch


class Peer(NamedTuple):
    mechanism: str
    build: Callable[[Dict], Callable[[torch.Tensor], torch.Tensor]]


def _reformer_lsh(spec: Dict):
    from reformer_pytorch import LSHSelfAttention

    o = spec.get("options", {})
    attn = LSHSelfAttention(dim=spec["D"], heads=spec["H"], bucket_size=o.get("lsh_bucket_size", 64),
                            n_hashes=o.get("lsh_n_hashes", 1), causal=True)  # fmt: skip
    attn = attn.to(spec["device"])
    return lambda x: attn(x)


def _linear_attention_transformer(spec: Dict):
    from linear_attention_transformer.linear_attention_transformer import SelfAttention

    attn = SelfAttention(spec["D"], spec["H"], causal=True).to(spec["device"])
    return lambda x: attn(x)


PEERS: Dict[str, Peer] = {
    "reformer-pytorch": Peer("lsh", _reformer_lsh),
    "linear-attention-transformer": Peer("linear", _linear_attention_transformer),
}

"""Persistent memory: learned key/value slots in every attention (Sukhbaatar et al. 2019, "Augmenting
Self-attention with Persistent Memory", arXiv 1907.01470).

Every head of every layer gets N learned keys k_1..k_N and values v_1..v_N that are attended by every
query next to the context keys, in one joint softmax::

    a_ti = softmax_i([ q_t^T K_ctx / sqrt(Dh) + bias ;  q_t^T K_pers / sqrt(Dh) ])
    out_t = sum_i a_ti [V_ctx ; V_pers]_i

The persistent slots carry no position (no position term, no causal or span mask): they are the same
for every query. With ``--decoder-ffn-embed-dim 0`` they replace the feed-forward sublayer ("all-attention"
layer); the paper shows a feed-forward layer is itself an attention over fixed key/value slots.

Initialization and scaling follow the official code (facebookresearch/adaptive-span persistent_memory.py):
the parameters are stored divided by sqrt(Dh) (keys) and sqrt(N) (values) and multiplied back in the
forward, so the keys and values used have unit-variance entries while the optimizer (Adagrad in the paper)
sees smaller parameters.

The slots are placed *before* the context keys: a causal mask aligned on the last T keys (``causal_mask``)
and every mechanism's key-position bookkeeping stay unchanged; only an additive bias needs N zero columns.

Shapes: B = batch, H = heads, T = queries, S = context keys, N = persistent slots, Dh = head dim.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PersistentMemoryConfig:
    """Mixed into the config of every mechanism that supports persistent memory: declaring the option is
    declaring the support (``validate_config`` rejects it for the others). Not an ``AttentionConfig``
    subclass only because ``base.py`` imports this file."""

    persistent_mem_size: int = field(
        default=0,
        metadata={"help": "learned persistent key/value slots per head in every attention layer (0: none); "
                  "all-attention (Sukhbaatar et al. 2019, arXiv 1907.01470): 1024-2048 with --decoder-ffn-embed-dim 0"},
    )  # fmt: skip


class PersistentMemory(nn.Module):
    def __init__(self, size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.size, self.head_dim = size, head_dim
        # stored scaled down, multiplied back in ``keys_values`` (official persistent_memory.py)
        self.key = nn.Parameter(torch.randn(num_heads, size, head_dim) / math.sqrt(head_dim))  # H x N x Dh
        self.value = nn.Parameter(torch.randn(num_heads, size, head_dim) / math.sqrt(size))  # H x N x Dh

    def keys_values(self, dtype) -> Tuple[Tensor, Tensor]:
        """The H x N x Dh keys and values as attended (unit-variance entries at initialization)."""
        return (self.key * math.sqrt(self.head_dim)).to(dtype), (self.value * math.sqrt(self.size)).to(dtype)

    def prepend(self, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``[K_pers; k]``, ``[V_pers; v]`` (B x H x (N + S) x Dh) and the additive ``bias`` (... x T x S, or
        None) with N leading zero columns: the slots are never masked and carry no position."""
        B = k.size(0)
        k_pers, v_pers = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in self.keys_values(k.dtype))  # B x H x N x Dh
        k, v = torch.cat([k_pers, k], dim=2), torch.cat([v_pers, v], dim=2)  # B x H x (N+S) x Dh
        if bias is not None:
            bias = F.pad(bias, (self.size, 0))  # ... x T x (N+S), zeros for the slots
        return k, v, bias


def build_persistent_memory(cfg, num_heads: int, head_dim: int) -> Optional[PersistentMemory]:
    """A ``PersistentMemory`` when the mechanism's config declares ``persistent_mem_size`` and it is > 0."""
    size = getattr(cfg, "persistent_mem_size", 0)
    return PersistentMemory(size, num_heads, head_dim) if size > 0 else None

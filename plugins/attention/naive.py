"""Naive einsum softmax attention: the readable reference the tests compare every mechanism with.

    A = softmax(Q K^T / sqrt(Dh), masked causally),   out = A V

Materializes the T x S score matrix; never use it for speed.
"""

from typing import Optional

import torch
from torch import Tensor

from .base import SoftmaxAttention, causal_mask, register_attention
from .persistent import PersistentMemoryConfig


@register_attention("naive", PersistentMemoryConfig)
class NaiveAttention(SoftmaxAttention):
    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * self.scale  # B x H x T x S
        if bias is not None:
            scores = scores + bias
        mask = causal_mask(q.size(-2), k.size(-2), q.device)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        weights = torch.nn.functional.dropout(weights, self.dropout, self.training)
        return torch.einsum("bhts,bhsd->bhtd", weights, v)  # B x H x T x Dh

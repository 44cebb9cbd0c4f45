"""Full causal softmax attention (Vaswani et al. 2017, Eq. 1), the baseline.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(Dh) + causal mask) V

Computed by ``torch.nn.functional.scaled_dot_product_attention``, so GPUs get the flash /
memory-efficient kernels (used when there is no memory: the mask is then ``is_causal``).
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .base import SoftmaxAttention, causal_mask, register_attention
from .persistent import PersistentMemoryConfig


@register_attention("full", PersistentMemoryConfig)
class FullAttention(SoftmaxAttention):
    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        T, S = q.size(-2), k.size(-2)
        p = self.dropout if self.training else 0.0
        if bias is not None:  # e.g. ALiBi: a float mask (no flash kernel, the memory-efficient one on GPU)
            mask = bias.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        if T == S:  # no memory: the fused kernels' own causal mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if T == 1:  # one new token sees all the past
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), dropout_p=p)

"""The only decoder layer: attention and feed-forward sublayers with residuals, pre- or post-norm.

    pre-norm:   x = x + Drop(Attn(LN(x)));  x = x + Drop(FFN(LN(x)))
    post-norm:  x = LN(x + Drop(Attn(x)));  x = LN(x + Drop(FFN(x)))

The layer never looks at which attention it holds: memory goes in and comes out unchanged in kind.
"""

from typing import Optional, Tuple

from torch import Tensor, nn

from ..attention.base import Attention
from ..memory import TensorState


class DecoderLayer(nn.Module):
    def __init__(
        self,
        attention: Attention,
        feedforward: Optional[nn.Module],
        embed_dim: int,
        dropout: float,
        normalize_before: bool,
    ):
        super().__init__()
        self.attn = attention
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = feedforward  # None: no feed-forward sublayer (all-attention: --decoder-ffn-embed-dim 0)
        self.ffn_norm = nn.LayerNorm(embed_dim) if feedforward is not None else None
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _sublayer(self, x: Tensor, norm: nn.Module, fn):
        h = norm(x) if self.normalize_before else x
        h, extra = fn(h)
        x = x + self.dropout(h)
        return (x if self.normalize_before else norm(x)), extra

    def forward(
        self, x: Tensor, mem: Optional[TensorState], keep: Optional[int]
    ) -> Tuple[Tensor, Optional[TensorState]]:  # x: B x T x D
        x, new_mem = self._sublayer(x, self.attn_norm, lambda h: self.attn(h, mem, keep))
        if self.ffn is not None:
            x, _ = self._sublayer(x, self.ffn_norm, lambda h: (self.ffn(h), None))
        return x, new_mem

"""The only decoder layer: attention and feed-forward sublayers with residuals, pre- or post-norm.

    pre-norm:   x = x + Drop(Attn(LN(x)));  x = x + Drop(FFN(LN(x)))
    post-norm:  x = LN(x + Drop(Attn(x)));  x = LN(x + Drop(FFN(x)))

With memory, pre-norm is the official Transformer-XL's ``pre_lnorm``: the attention sublayer is
``Attn(LN([mem; x]))[-T:]`` where ``mem`` holds the RAW inputs of past positions, normalized together with
the segment with the current LayerNorm weights. The layer passes its norm to the attention (``norm=``),
which applies it to everything it attends (``base.py``), so the memory keeps raw inputs for every
mechanism alike.

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

    def forward(
        self, x: Tensor, mem: Optional[TensorState], keep: Optional[int]
    ) -> Tuple[Tensor, Optional[TensorState]]:  # x: B x T x D
        if self.normalize_before:  # x + Drop(Attn(LN(x))), LN applied by the attention (memory included)
            out, new_mem = self.attn(x, mem, keep, norm=self.attn_norm)
            x = x + self.dropout(out)
        else:
            out, new_mem = self.attn(x, mem, keep)
            x = self.attn_norm(x + self.dropout(out))
        if self.ffn is not None:
            if self.normalize_before:
                x = x + self.dropout(self.ffn(self.ffn_norm(x)))
            else:
                x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, new_mem

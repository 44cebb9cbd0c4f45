"""Position-wise feed-forward sublayer: FFN(x) = W2 act(W1 x + b1) + b2 (Vaswani et al. 2017, Eq. 2).

``chunks`` (``--ffn-chunks K``, Reformer Sec. 3 "Chunking"): the FFN acts on every position
independently, so the sequence can be processed in K pieces along T: the same output, and the
B x T x ffn_dim hidden activation exists for one piece at a time when nothing is stored for backward
(evaluation, generation, and the forward pass of ``--reversible`` training).
"""

import torch
from fairseq import utils
from torch import Tensor, nn


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str, activation_dropout: float, chunks: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation = utils.get_activation_fn(activation_fn)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.chunks = chunks

    def position_wise(self, x: Tensor) -> Tensor:  # B x t x D -> B x t x D
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))

    def forward(self, x: Tensor) -> Tensor:  # B x T x D -> B x T x D
        if self.chunks <= 1 or x.size(1) <= 1:
            return self.position_wise(x)
        return torch.cat([self.position_wise(part) for part in x.chunk(self.chunks, dim=1)], dim=1)

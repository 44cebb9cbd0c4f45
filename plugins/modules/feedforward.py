"""Position-wise feed-forward sublayer: FFN(x) = W2 act(W1 x + b1) + b2 (Vaswani et al. 2017, Eq. 2)."""

from fairseq import utils
from torch import Tensor, nn


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation = utils.get_activation_fn(activation_fn)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:  # B x T x D -> B x T x D
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))

"""Absolute positional encodings added to the token embeddings (``--pos-emb``).

- ``sinusoidal``: Vaswani et al. 2017, Sec. 3.5: PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...),
  here laid out as [sin | cos] halves (equivalent up to a fixed permutation of dimensions).
- ``learned``: one learned vector per position (GPT-style), up to ``--max-target-positions``.
- ``none``: no positional signal; causal attention still orders tokens implicitly.

- ``relative``: Transformer-XL's relative encodings, computed inside ``--attention relative``; nothing
  is added at the input.
"""

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..errors import UserError

POSITIONAL_REGISTRY: Dict[str, Callable[[int, int], Optional[nn.Module]]] = {}


def register_positions(name: str):
    def wrap(factory):
        POSITIONAL_REGISTRY[name] = factory
        return factory

    return wrap


class SinusoidalPositions(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, positions: Tensor) -> Tensor:  # positions: T -> T x D (float32 whatever the model dtype)
        half = self.embed_dim // 2
        inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / max(half, 1))
        angles = positions.float()[:, None] * inv_freq[None, :]  # T x D/2
        pe = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if pe.size(-1) < self.embed_dim:  # odd D
            pe = torch.nn.functional.pad(pe, (0, 1))
        return pe


class LearnedPositions(nn.Module):
    def __init__(self, embed_dim: int, max_positions: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, embed_dim))
        nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, positions: Tensor) -> Tensor:  # T -> T x D
        if int(positions[-1]) >= self.max_positions:
            raise UserError(
                f"position {int(positions[-1])} is beyond --max-target-positions {self.max_positions} "
                "of the learned positional embedding; use a shorter context or --pos-emb sinusoidal"
            )
        return self.weight[positions]


register_positions("sinusoidal")(lambda dim, max_positions: SinusoidalPositions(dim))
register_positions("learned")(LearnedPositions)
register_positions("none")(lambda dim, max_positions: None)
# Encoded inside attention (the attention declares it in ``encodes_positions``): nothing at the input.
register_positions("relative")(lambda dim, max_positions: None)


def build_positions(name: str, embed_dim: int, max_positions: int) -> Optional[nn.Module]:
    if name not in POSITIONAL_REGISTRY:
        raise UserError(f"unknown --pos-emb '{name}': choose one of {', '.join(sorted(POSITIONAL_REGISTRY))}")
    return POSITIONAL_REGISTRY[name](embed_dim, max_positions)

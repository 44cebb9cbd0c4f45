"""Absolute positional encodings added to the token embeddings (``--pos-emb``).

- ``sinusoidal``: Vaswani et al. 2017, Sec. 3.5: PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...),
  here laid out as [sin | cos] halves (equivalent up to a fixed permutation of dimensions).
- ``learned``: one learned vector per position (GPT-style), up to ``--max-target-positions``.
- ``none``: no positional signal; causal attention still orders tokens implicitly.

- ``relative``, ``rotary``, ``alibi``: encoded inside attention (Transformer-XL's relative attention;
  rotary and ALiBi in the softmax attentions, see the end of this file); nothing is added at the input.
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


def sinusoid_frequencies(num_freqs: int, device=None, dtype=torch.float32) -> Tensor:
    """w_f = 10000^(-f / F) for f = 0 .. F-1 (Vaswani et al. 2017, Sec. 3.5): F."""
    return torch.exp(-math.log(10000.0) * torch.arange(num_freqs, device=device, dtype=dtype) / max(num_freqs, 1))


class SinusoidalPositions(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:  # T -> T x D
        """The encodings in ``dtype``, computed in float32 (float64 for a float64 ``dtype``, so that float64
        models are exact to float64 precision)."""
        half = self.embed_dim // 2
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = sinusoid_frequencies(half, positions.device, compute)
        angles = positions.to(compute)[:, None] * inv_freq[None, :]  # T x D/2
        pe = torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)
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
for _name in ("relative", "rotary", "alibi"):
    register_positions(_name)(lambda dim, max_positions: None)


def build_positions(name: str, embed_dim: int, max_positions: int) -> Optional[nn.Module]:
    if name not in POSITIONAL_REGISTRY:
        raise UserError(f"unknown --pos-emb '{name}': choose one of {', '.join(sorted(POSITIONAL_REGISTRY))}")
    return POSITIONAL_REGISTRY[name](embed_dim, max_positions)


# ---- positions encoded inside softmax attention (--pos-emb rotary | alibi) -------------------------
# Both depend only on the distance between query and key, so they stay valid across segments and work
# with memory: keys of the memory are re-encoded at their place in the current [memory; segment] window.


def rotate(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer, Eq. 34), "rotate-half" layout: dimension pairs
    (i, i + Dh/2) are rotated by angle p * 10000^(-2i/Dh). x: B x H x L x Dh, positions: L."""
    half = x.size(-1) // 2
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # L x Dh/2
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half :]], dim=-1)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022, Sec. 3): the geometric sequence 2^(-8/n), 2^(-16/n), ... for
    n = num_heads a power of two; otherwise the nearest lower power of two's slopes plus every other
    slope of the next one, as in the paper's reference code."""

    def powers_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers_of_two(closest)
    if closest < num_heads:
        slopes += powers_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes)


def alibi_bias(num_heads: int, num_queries: int, num_keys: int, device=None) -> Tensor:
    """H x T x S additive bias -slope_h * (distance query -> key); queries are the last T of the S keys."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    distance = (query_pos - torch.arange(num_keys, device=device)[None, :]).clamp(min=0)  # T x S
    return -alibi_slopes(num_heads).to(device)[:, None, None] * distance

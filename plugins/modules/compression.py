"""Compression functions of the Compressive Transformer (Rae et al. 2020, arXiv 1911.05507, Sec. 3.1):
``f_c`` maps the E states evicted from the memory to E / c compressed states, keeping time order.

Shapes: B = batch (streams), E = evicted states (a multiple of the rate c), D = model dim.

Every function sees each block of c consecutive states on its own (kernel = stride = c), except
``most_used``, which ranks the whole evicted block; so compressing evictions block by block equals
compressing them all at once (what lets generation, one token at a time, match a segment-wise pass).

- ``max_pool`` / ``mean_pool``: max / mean over each block of c states (no parameters);
- ``conv``: a learned 1D convolution with kernel = stride = c (the paper's best, Table 5);
- ``dilated_conv``: a learned stack of kernel-2 dilated convolutions (dilations 1, 2, 4, ...; ReLU between
  them) over each block, whose last output sees the whole block (WaveNet-style; the paper names the
  function without details, this is our reading);
- ``most_used``: keep the E / c states that received the highest average attention while they were in the
  memory (their "usage"), in their original order (no parameters; needs attention weights).
"""

import math
from typing import Callable, ClassVar, Dict, Optional

import torch.nn.functional as F
from torch import Tensor, nn

COMPRESSION_REGISTRY: Dict[str, Callable[[int, int], "Compression"]] = {}


def register_compression(name: str):
    def wrap(cls):
        COMPRESSION_REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def build_compression(name: str, embed_dim: int, rate: int) -> "Compression":
    return COMPRESSION_REGISTRY[name](embed_dim, rate)


class Compression(nn.Module):
    """``forward(evicted, usage) -> compressed``: B x E x D (E a multiple of ``rate``) -> B x E/rate x D."""

    registry_name: ClassVar[str] = "?"
    needs_usage: ClassVar[bool] = False  # True: needs the average attention each state received

    def __init__(self, embed_dim: int, rate: int):
        super().__init__()
        self.embed_dim, self.rate = embed_dim, rate

    def blocks(self, x: Tensor) -> Tensor:
        B, E, D = x.shape
        if E % self.rate:
            raise ValueError(f"{E} evicted states are not a multiple of the compression rate {self.rate}")
        return x.view(B, E // self.rate, self.rate, D)  # B x E/c x c x D

    def forward(self, evicted: Tensor, usage: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError


@register_compression("max_pool")
class MaxPool(Compression):
    def forward(self, evicted, usage=None):
        return self.blocks(evicted).amax(dim=2)  # B x E/c x D


@register_compression("mean_pool")
class MeanPool(Compression):
    def forward(self, evicted, usage=None):
        return self.blocks(evicted).mean(dim=2)  # B x E/c x D


@register_compression("conv")
class Conv(Compression):
    def __init__(self, embed_dim, rate):
        super().__init__(embed_dim, rate)
        self.conv = nn.Conv1d(embed_dim, embed_dim, kernel_size=rate, stride=rate)

    def forward(self, evicted, usage=None):
        self.blocks(evicted)  # checks the length
        return self.conv(evicted.transpose(1, 2)).transpose(1, 2)  # B x D x E -> B x D x E/c -> B x E/c x D


@register_compression("dilated_conv")
class DilatedConv(Compression):
    def __init__(self, embed_dim, rate):
        super().__init__(embed_dim, rate)
        depth = max(1, math.ceil(math.log2(rate)))  # receptive field 2^depth >= c
        self.dilations = [2**i for i in range(depth)]
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, embed_dim, kernel_size=2, dilation=d) for d in self.dilations)

    def forward(self, evicted, usage=None):
        B, E, D = evicted.shape
        h = self.blocks(evicted).reshape(-1, self.rate, D).transpose(1, 2)  # (B*E/c) x D x c
        for i, (conv, d) in enumerate(zip(self.convs, self.dilations)):
            h = conv(F.pad(h, (d, 0)))  # causal within the block: output t sees t, t-d (zeros before the block)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return h[:, :, -1].view(B, E // self.rate, D)  # the last output has seen the whole block


@register_compression("most_used")
class MostUsed(Compression):
    needs_usage = True

    def forward(self, evicted, usage=None):
        B, E, D = evicted.shape
        if usage is None:
            raise ValueError("most_used compression needs the attention usage of the evicted states")
        self.blocks(evicted)
        keep = usage.topk(E // self.rate, dim=1).indices.sort(dim=1).values  # B x E/c, in time order
        return evicted.gather(1, keep[:, :, None].expand(B, E // self.rate, D))  # B x E/c x D


class Decompression(nn.Module):
    """The autoencoding loss's decoder (Sec. 3.2): a transposed convolution, kernel = stride = c,
    that maps E/c compressed states back to E."""

    def __init__(self, embed_dim: int, rate: int):
        super().__init__()
        self.deconv = nn.ConvTranspose1d(embed_dim, embed_dim, kernel_size=rate, stride=rate)

    def forward(self, compressed: Tensor) -> Tensor:
        return self.deconv(compressed.transpose(1, 2)).transpose(1, 2)  # B x E/c x D -> B x E x D

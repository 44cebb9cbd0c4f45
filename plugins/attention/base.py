"""Attention base classes and the registry.

Shape legend (used in every attention file):
    B = batch (streams), T = query positions (current segment), M = memory positions,
    S = key positions (M + T), D = model dim, H = heads, Dh = head dim (D / H).

An attention maps the current segment and its memory to an output and the next memory::

    out, new_mem = attention(x, mem, keep, norm=None)     # x: B x T x D, out: B x T x D

``mem`` is a ``TensorState`` of the attention's own type (or ``None``) and ``keep`` says how many past
positions the next memory holds (``0``: none, ``None``: all, as when decoding a full-context model
token by token). Attention is causal: position t sees every memory position and positions <= t.

``norm`` (pre-norm layers: the layer's attention LayerNorm) is applied by the attention to everything it
attends from or to, with the current weights: the segment *and* the stored hidden states, which are the
RAW layer inputs. This is the official Transformer-XL's ``pre_lnorm`` (``mem_transformer.py``: the
LayerNorm of ``cat([mems, w])`` inside the attention), so the LayerNorm also learns from the memory
positions; storing LayerNorm outputs instead would freeze them with the weights of the segment that made
them. ``None`` (post-norm layers) attends ``x`` and the memory as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..memory import HiddenMemory, TensorState
from ..modules.positional import alibi_bias, rotate
from .persistent import build_persistent_memory


class AuxLoss(NamedTuple):
    """An auxiliary loss term: ``value`` is a per-token mean, added to the LM loss as ``weight * value``."""

    value: Tensor
    weight: float


@dataclass
class AttentionConfig:
    """Options of one mechanism. Its fields become ``efficient_lm`` command-line options; give every
    field ``metadata={"help": ...}`` and a default that names its source."""


@dataclass(frozen=True)
class RegistryEntry:
    cls: Type[Attention]
    config: Type[AttentionConfig]


ATTENTION_REGISTRY: Dict[str, RegistryEntry] = {}


def register_attention(name: str, config: Type[AttentionConfig] = AttentionConfig) -> Callable:
    def wrap(cls):
        if name in ATTENTION_REGISTRY:
            raise ValueError(f"attention '{name}' is registered twice")
        ATTENTION_REGISTRY[name] = RegistryEntry(cls, config)
        cls.registry_name = name
        return cls

    return wrap


def build_attention(name: str, embed_dim: int, num_heads: int, dropout: float, options) -> Attention:
    """Build ``--attention name``; mechanism options are read from ``options`` by field name."""
    if name not in ATTENTION_REGISTRY:
        raise UserError(f"unknown --attention '{name}': choose one of {', '.join(sorted(ATTENTION_REGISTRY))}")
    entry = ATTENTION_REGISTRY[name]
    cfg = entry.config(
        **{f.name: getattr(options, f.name) for f in dataclasses.fields(entry.config) if hasattr(options, f.name)}
    )
    return entry.cls(embed_dim, num_heads, dropout, cfg, pos_emb=getattr(options, "pos_emb", "none"))


def causal_mask(num_queries: int, num_keys: int, device=None) -> Tensor:
    """T x S boolean mask, True where query t (at key position S - T + t) may attend key s."""
    past = num_keys - num_queries
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=past)


class Attention(nn.Module):
    """Base of every mechanism: the projections are written once here.

    Capability flags are read by the decoder when it is built, so an unsupported combination fails
    with a message before training starts instead of deep inside a forward pass.
    """

    registry_name: ClassVar[str] = "?"
    supports_memory: ClassVar[bool] = True  # can attend over a memory of past segments (--mem-len)
    supports_incremental: ClassVar[bool] = True  # can decode one token at a time (generation)
    encodes_positions: ClassVar[Tuple[str, ...]] = ()  # --pos-emb values this attention implements itself
    requires_own_positions: ClassVar[bool] = False  # True: only its encodes_positions are valid (e.g. XL)
    windowed_memory: ClassVar[bool] = True  # memory = exactly the last `keep` positions (False: a summary of
    # all the past, e.g. linear attention's (S, Z): a positive `keep` only switches it on)
    exact_softmax: ClassVar[bool] = True  # equals softmax attention (naive) when the parameters match
    attends_to_self: ClassVar[bool] = True  # False: a query sees itself only when no other key is allowed
    deterministic_recompute: ClassVar[bool] = True  # same input + torch RNG state -> same output (--reversible)

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, cfg: AttentionConfig, pos_emb: str = "none"):
        super().__init__()
        self.pos_emb = pos_emb  # acted on only if in encodes_positions (checked by the model's validation)
        if embed_dim % num_heads != 0:
            raise UserError(f"--decoder-attention-heads {num_heads} must divide --decoder-embed-dim {embed_dim}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.cfg = cfg
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # learned key/value slots (--persistent-mem-size), only for mechanisms whose config declares it
        self.persistent = build_persistent_memory(cfg, num_heads, self.head_dim)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x L x Dh

    def merge_heads(self, x: Tensor) -> Tensor:
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, self.embed_dim)  # B x L x D

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ``UserError`` for option values this mechanism cannot run with (``cfg``: the whole model
        config, after the generic checks of ``validate_config``). Called before anything is built."""

    def forward(
        self, x: Tensor, mem: Optional[TensorState], keep: Optional[int], norm: Optional[nn.Module] = None
    ) -> Tuple[Tensor, Optional[TensorState]]:
        raise NotImplementedError

    @staticmethod
    def normalized(x: Tensor, norm: Optional[nn.Module]) -> Tensor:
        """``norm(x)``, or ``x`` itself without a norm (post-norm: nothing is computed)."""
        return x if norm is None else norm(x)

    def keys_values(
        self, h: Tensor, mem: Optional[HiddenMemory], norm: Optional[nn.Module] = None
    ) -> Tuple[Tensor, Tensor]:
        """K, V (B x H x S x Dh) over ``[memory; segment]``: ``h`` is the segment as attended (already
        normalized), the memory's raw hidden states are normalized here with ``norm`` (the current
        weights). The memory's cached K, V are reused when there is no gradient (the weights are fixed),
        else recomputed from its hidden states (Transformer-XL)."""
        k, v = (self.split_heads(t) for t in self.kv_proj(h).chunk(2, dim=-1))  # B x H x T x Dh
        if mem is None:
            return k, v
        if mem.keys is not None and not torch.is_grad_enabled():
            k_mem, v_mem = mem.keys, mem.values
        else:
            hidden = self.normalized(mem.hidden, norm)  # B x M x D
            k_mem, v_mem = (self.split_heads(t) for t in self.kv_proj(hidden).chunk(2, dim=-1))
        return torch.cat([k_mem, k], dim=2), torch.cat([v_mem, v], dim=2)  # B x H x S x Dh

    def set_layer_index(self, index: int) -> None:
        """Told once, after the model is built, the depth of this attention (0: first layer), for
        mechanisms whose pattern alternates with depth (e.g. the Sparse Transformer's interleaved factors)."""

    def share_with(self, first: Attention) -> None:
        """Tie parameters shared across layers: called on layers 1..N-1 with layer 0's attention."""

    def aux_losses(self, new_mem: Optional[TensorState]) -> Dict[str, AuxLoss]:
        """Auxiliary losses of this layer's last forward (e.g. a span penalty), name -> AuxLoss."""
        return {}

    def metrics(self) -> Dict[str, Tensor]:
        """Numbers worth logging during training (e.g. the learned spans), name -> detached scalar tensor
        (left on its device: no synchronization per step); the criterion logs them per layer."""
        return {}


class SoftmaxAttention(Attention):
    """Softmax attention over ``[memory; segment]`` with a ``HiddenMemory`` (Transformer-XL style:
    keys/values of the memory are recomputed from the cached layer inputs). Subclasses implement
    ``attend``, the inner attention ``(q, k, v, bias) -> out`` (fast-transformers' split).

    Rotary (``--pos-emb rotary``) and ALiBi (``--pos-emb alibi``) positions are applied here, at the
    place of each key in the current window, so they remain correct with memory. Persistent memory
    (``--persistent-mem-size``, ``persistent.py``) is prepended to the keys after the positions: the
    slots have none."""

    encodes_positions = ("rotary", "alibi")

    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        h = self.normalized(x, norm)  # B x T x D
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = self.keys_values(h, mem, norm)  # B x H x S x Dh (unrotated: cached as such)
        T, S = q.size(2), k.size(2)
        new_mem = HiddenMemory.extend(mem, x, keep, k, v)  # the raw inputs
        bias = None
        if self.pos_emb == "rotary":  # rotated at their place in the current window
            key_pos = torch.arange(S, device=x.device)
            q, k = rotate(q, key_pos[S - T :]), rotate(k, key_pos)
        elif self.pos_emb == "alibi":
            bias = alibi_bias(self.num_heads, T, S, x.device).to(q.dtype)  # H x T x S
        if self.persistent is not None:  # slots before the keys: the causal mask stays aligned on the last T
            k, v, bias = self.persistent.prepend(k, v, bias)  # B x H x (N+S) x Dh
        out = self.merge_heads(self.attend(q, k, v, bias))  # B x T x D
        return self.out_proj(out), new_mem

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """Causal attention of T queries over S >= T keys, the last T of which are the queries'; ``bias``
        (H x T x S, optional) is added to the scores."""
        raise NotImplementedError

"""Compressive Transformer attention (Rae et al. 2020, "Compressive Transformers for Long-Range Sequence
Modelling", arXiv 1911.05507, Sec. 3, Algorithms 1 and 2).

Shape legend: B = batch (streams), T = segment (queries), M = memory (uncompressed), N = compressed memory,
S = N + M + T keys, E = evicted states (a multiple of c), c = --compression-rate, D = model dim,
H = heads, Dh = head dim.

Transformer-XL's relative attention (``relative.py``: the same score, u, v, W_R, shared code) over
``[compressed memory; memory; segment]``; relative distances count slots, a compressed slot being one
position, as in the paper. Per layer (Algorithm 1):

    out      = Attention(x, [cm; m; x])                          attend first, then update the memories
    old      = the oldest states of [m; x] beyond mem_len        (E = c * floor(overflow / c) of them)
    m'       = [m; x] without ``old``                            mem_len positions + a remainder < c
    cm'      = [cm; f_c(old)], last cmem_len slots               FIFO: the oldest compressed slots go

The overflow is compressed in whole blocks of c: a remainder (< c states) stays in the uncompressed memory
until a block is complete, so nothing is dropped and the context stays contiguous; the memory then holds
between mem_len and mem_len + c - 1 states. With ``--cmem-len 0`` nothing is compressed and the model is
Transformer-XL exactly (same parameters, same outputs).

m and cm hold the layer's RAW inputs (the hidden states of Algorithm 1) and f_c compresses raw inputs. A
pre-norm layer (``--decoder-normalize-before``) normalizes ``[cm; m; x]`` with the current LayerNorm
weights when it attends them (Transformer-XL's ``pre_lnorm``, ``base.py``), so compressed slots live in the
same space as the memory and the LayerNorm learns from every attended position.

How f_c is trained (``--compression-loss``):

- ``attention_reconstruction`` (Algorithm 2, the paper's best): with stop-gradients on the layer input x,
  the evicted states and the attention weights W_q, W_k, W_v (and the pre-norm LayerNorm),
  ``L = || attn(x, old) - attn(x, f_c(old)) ||^2`` (content attention per head, mean squared error), so the
  loss trains only f_c; the compressed memory the next segments attend to is detached, so the LM loss does
  not train f_c (the paper's stop-gradient in the other direction);
- ``autoencoding``: ``L = || g(f_c(old)) - old ||^2`` with a learned decoder g (a transposed convolution),
  the evicted states detached;
- ``bptt``: no auxiliary loss; f_c is trained by the LM loss. The evicted states are kept (detached, like
  the memory) and compressed at the start of the forward that first attends to them, so the LM loss of
  that segment reaches f_c (one segment of backpropagation through the compression).

The losses of every layer are summed and added as ``--compression-loss-weight * L`` (``aux_losses``); since
the stop-gradients make the compression parameters disjoint from the rest, the weight only scales their
gradients (Adam is invariant to it except through --clip-norm).
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn

from ..errors import UserError
from ..memory import HiddenMemory
from ..modules.compression import COMPRESSION_REGISTRY, Decompression, build_compression
from .base import AuxLoss, register_attention
from .relative import RelativeAttention, RelativeAttentionConfig

COMPRESSION_LOSSES = ("attention_reconstruction", "autoencoding", "bptt")


def frozen(norm: Optional[nn.Module], m: Tensor) -> Tensor:
    """``norm(m)`` with its parameters detached (the compression loss trains f_c only), or ``m``."""
    if norm is None:
        return m
    params = {name: p.detach() for name, p in norm.named_parameters()}
    return torch.func.functional_call(norm, params, (m,))


@dataclass
class CompressiveAttentionConfig(RelativeAttentionConfig):
    cmem_len: int = field(
        default=0,
        metadata={"help": "compressed memory slots per layer (0: none, plain Transformer-XL); needs --mem-len: "
                  "states leaving the memory are compressed into it (Rae et al. 2020: 1500 on WikiText-103)"},
    )  # fmt: skip
    compression_rate: int = field(
        default=3,
        metadata={"help": "c: every c evicted states become one compressed slot (Rae et al. 2020: 3 on "
                  "enwik8, 4 on WikiText-103); a remainder waits in the memory until c states are there"},
    )  # fmt: skip
    compression_fn: ChoiceEnum(sorted(COMPRESSION_REGISTRY)) = field(
        default="conv",
        metadata={"help": "compression function f_c (Rae et al. 2020 Sec. 3.1; conv is the paper's best)"},
    )
    compression_loss: ChoiceEnum(COMPRESSION_LOSSES) = field(
        default="attention_reconstruction",
        metadata={"help": "how f_c is trained (Sec. 3.2): attention_reconstruction (the paper's best), "
                  "autoencoding, or bptt (the LM loss, through the compressed memory)"},
    )  # fmt: skip
    compression_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the compression loss, summed over layers (lucidrains' default)"}
    )


@dataclass
class CompressiveMemory(HiddenMemory):
    """The Transformer-XL memory (``hidden``: the last mem_len layer inputs + a remainder < c not yet
    compressed; ``keys``/``values``: its no-gradient cache) and the compressed memory, per layer."""

    compressed: Optional[Tensor] = None  # B x N x D (None: empty)
    pending: Optional[Tensor] = None  # B x E x D: evicted, compressed by the next forward (bptt only)
    usage: Optional[Tensor] = None  # B x M: attention weight each memory state received, summed (most_used)
    views: Optional[Tensor] = None  # B x M: how many queries attended it (usage / views = average attention)
    loss: Optional[Tensor] = None  # B: compression loss of the forward that returned this state

    @property
    def compressed_length(self) -> int:
        return 0 if self.compressed is None else self.compressed.size(1)


@register_attention("compressive", CompressiveAttentionConfig)
class CompressiveAttention(RelativeAttention):
    def __init__(self, embed_dim, num_heads, dropout, cfg: CompressiveAttentionConfig, pos_emb: str = "relative"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        self.compress = self.reconstruct = None
        if cfg.cmem_len > 0:
            self.compress = build_compression(str(cfg.compression_fn), embed_dim, cfg.compression_rate)
            if cfg.compression_loss == "autoencoding":
                self.reconstruct = Decompression(embed_dim, cfg.compression_rate)
        # bptt with a learned f_c: compress at the start of the next forward, where the LM loss reaches f_c
        # (a parameter-free f_c, e.g. max_pool, compresses at once: there is nothing to train)
        self.lazy = (
            self.compress is not None
            and cfg.compression_loss == "bptt"
            and any(True for _ in self.compress.parameters())
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.cmem_len < 0:
            raise UserError(f"--cmem-len must be >= 0 (0: no compressed memory), got {cfg.cmem_len}")
        if cfg.compression_rate < 1:
            raise UserError(f"--compression-rate must be >= 1 (c states -> 1 slot), got {cfg.compression_rate}")
        if cfg.compression_fn not in COMPRESSION_REGISTRY:
            raise UserError(f"unknown --compression-fn '{cfg.compression_fn}': choose one of "
                            f"{', '.join(sorted(COMPRESSION_REGISTRY))}")  # fmt: skip
        if cfg.compression_loss not in COMPRESSION_LOSSES:
            raise UserError(f"unknown --compression-loss '{cfg.compression_loss}': choose one of "
                            f"{', '.join(COMPRESSION_LOSSES)}")  # fmt: skip
        if cfg.cmem_len > 0 and getattr(cfg, "persistent_mem_size", 0) > 0:
            raise UserError(
                "--persistent-mem-size with --cmem-len > 0 is not supported (the compression losses and most_used "
                "read attention weights over the memories only): drop one of them"
            )
        if cfg.cmem_len == 0:
            return
        if cfg.mem_len == 0:
            raise UserError("--cmem-len holds states compressed as they leave the memory: it needs --mem-len > 0")
        if cfg.compression_rate > cfg.mem_len:
            raise UserError(
                f"--compression-rate {cfg.compression_rate} is larger than --mem-len {cfg.mem_len}: evicted states "
                "wait uncompressed in the memory until c of them are there; use c <= mem_len"
            )
        if cfg.same_length:
            raise UserError("--same-length (Transformer-XL's evaluation window) is not defined with --cmem-len > 0")

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        compressed, fresh = self.compressed_memory(x, mem)  # B x N x D: f_c of raw inputs
        h = self.normalized(x, norm)  # B x T x D (pre-norm: LN of [cm; m; x] with the current weights)
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = self.keys_values(h, mem, norm)  # B x H x (M+T) x Dh: [memory; segment]
        ck, cv = self.compressed_keys_values(compressed, norm)  # B x H x N x Dh
        window = keep if self.cfg.same_length else None
        need_usage = self.compress is not None and self.compress.needs_usage  # most_used only
        out, received = self.relative_attention(
            q, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), window, need_usage=need_usage
        )  # B x H x T x Dh, B x S (attention each key received, summed over queries: most_used)
        out = self.out_proj(self.merge_heads(out))  # B x T x D
        if self.lazy and not fresh:
            out = out + self.untouched_compression()  # exactly + 0: keeps every parameter in the graph (DDP)
        if keep == 0:
            return out, None
        usage = None if received is None else received[:, compressed.size(1) :]  # B x (M+T)
        return out, self.next_memory(mem, x, keep, compressed, k, v, usage, h, norm)

    def compressed_keys_values(self, compressed: Tensor, norm: Optional[nn.Module]) -> Tuple[Tensor, Tensor]:
        """K, V (B x H x N x Dh) of the compressed slots (raw states), normalized like the memory."""
        kv = self.kv_proj(self.normalized(compressed, norm))  # B x N x 2D
        return tuple(self.split_heads(t) for t in kv.chunk(2, dim=-1))

    def compressed_memory(self, x: Tensor, mem: Optional[HiddenMemory]) -> Tuple[Tensor, bool]:
        """The compressed memory this forward attends to (B x N x D), and whether f_c ran to make it (bptt:
        the pending evicted states are compressed now, so the LM loss reaches f_c; else it is stored,
        detached: the LM loss never trains f_c)."""
        stored = getattr(mem, "compressed", None)
        pending = getattr(mem, "pending", None)
        if stored is None:
            stored = x.new_zeros(x.size(0), 0, x.size(2))  # B x 0 x D
        if pending is None or pending.size(1) == 0:
            return stored, False
        new = self.compress(pending)  # B x E/c x D, in the graph of this forward (bptt)
        return torch.cat([stored, new], dim=1)[:, -self.cfg.cmem_len :], True  # B x N x D (FIFO)

    def next_memory(
        self, mem: Optional[HiddenMemory], x: Tensor, keep: Optional[int], compressed: Tensor, k, v, usage,
        h: Tensor, norm: Optional[nn.Module],
    ) -> "CompressiveMemory":  # fmt: skip
        """Append the segment (raw inputs ``x``; ``h``: as attended), evict the overflow beyond ``keep`` in
        whole blocks of c, compress it (or, bptt, keep it pending for the next forward), and track each
        memory state's attention usage. What is compressed is the memory's old raw inputs (the layer's
        hidden states, Rae et al. 2020 Algorithm 1); a pre-norm layer normalizes the compressed slots when
        it attends them, with the current weights, like the memory."""
        ctx = x if mem is None else torch.cat([mem.hidden, x], dim=1)  # B x (M+T) x D
        overflow = 0 if keep is None else max(ctx.size(1) - keep, 0)
        evict = (
            overflow if self.compress is None else self.cfg.compression_rate * (overflow // self.cfg.compression_rate)
        )
        state = CompressiveMemory(ctx[:, evict:], compressed=compressed if self.compress is not None else None)
        if not torch.is_grad_enabled():  # fixed weights: cache the memory's keys and values (as Transformer-XL)
            state.keys, state.values = k[:, :, evict:], v[:, :, evict:]
        if usage is not None:  # most_used
            state.usage, state.views = self.accumulate_usage(mem, usage, x.size(1))  # B x (M+T)
        evicted = ctx[:, :evict]  # B x E x D, oldest first
        evicted_usage = None if state.usage is None else self.average_usage(state.usage, state.views, evict)
        if state.usage is not None:
            state.usage, state.views = state.usage[:, evict:], state.views[:, evict:]
        if self.compress is None:  # Transformer-XL: the overflow is forgotten
            return state
        if self.lazy:
            state.pending = evicted.detach()  # compressed by the next forward, inside its graph
            return state
        if evict == 0:
            if self.cfg.compression_loss != "bptt":  # a loss at every step (zero here), as DDP needs
                state.loss = self.untouched_compression().expand(x.size(0))
            return state
        old = evicted.detach()
        new = self.compress(old, evicted_usage)  # B x E/c x D: gradient only into f_c
        if self.cfg.compression_loss != "bptt":
            state.loss = self.compression_loss(h, old, new, norm)
        state.compressed = torch.cat([compressed, new.detach()], dim=1)[:, -self.cfg.cmem_len :]  # FIFO
        return state

    @staticmethod
    def accumulate_usage(mem: Optional[HiddenMemory], received: Tensor, T: int) -> Tuple[Tensor, Tensor]:
        """The attention each position of [memory; segment] has received (summed over queries; ``received``:
        this segment's weights averaged over heads and summed over its T queries, B x (M+T)) and from how
        many queries: every query sees the memory, segment position j is seen by the T - j queries from j on."""
        B, L = received.shape
        views = torch.cat([received.new_full((B, L - T), T), torch.arange(T, 0, -1).to(received)[None].expand(B, T)], 1)
        if getattr(mem, "usage", None) is not None:  # what the memory positions received before
            received = received + F.pad(mem.usage, (0, T))
            views = views + F.pad(mem.views, (0, T))
        return received, views

    @staticmethod
    def average_usage(usage: Optional[Tensor], views: Optional[Tensor], n: int) -> Optional[Tensor]:
        """Average attention received by the ``n`` oldest memory states: B x n."""
        return None if usage is None else usage[:, :n] / views[:, :n].clamp(min=1)

    def untouched_compression(self) -> Tensor:
        """0, computed from every compression parameter: a step where nothing is compressed still gives
        them a (zero) gradient, so data-parallel training needs no --find-unused-parameters."""
        params = [p for m in (self.compress, self.reconstruct) if m is not None for p in m.parameters()]
        return sum((p.sum() for p in params), self.q_proj.weight.new_zeros(())) * 0.0

    # ---- compression losses (Sec. 3.2) -------------------------------------------------------------------
    def compression_loss(self, h: Tensor, old: Tensor, new: Tensor, norm: Optional[nn.Module] = None) -> Tensor:
        """Per-stream loss (B) for compressing ``old`` (B x E x D, raw, detached) into ``new`` (B x E/c x D);
        ``h``: the segment as attended (B x T x D), ``norm``: how the layer normalizes attended states."""
        if self.cfg.compression_loss == "autoencoding":
            return (self.reconstruct(new) - old).pow(2).mean(dim=(1, 2))
        q = F.linear(h.detach(), self.q_proj.weight.detach(), self.q_proj.bias.detach())
        q = self.split_heads(q)  # B x H x T x Dh

        def content_attention(m: Tensor) -> Tensor:  # softmax(q k^T / sqrt(Dh)) v with frozen LN, W_k, W_v
            m = frozen(norm, m)  # B x L x D, as the attention sees it
            kv = F.linear(m, self.kv_proj.weight.detach(), self.kv_proj.bias.detach())
            k, v = (self.split_heads(t) for t in kv.chunk(2, dim=-1))  # B x H x L x Dh
            return F.scaled_dot_product_attention(q, k, v)  # B x H x T x Dh

        return (content_attention(old) - content_attention(new)).pow(2).mean(dim=(1, 2, 3))

    def aux_losses(self, new_mem) -> Dict[str, AuxLoss]:
        loss = getattr(new_mem, "loss", None)
        if loss is None:
            return {}
        return {"compression": AuxLoss(loss.mean(), self.cfg.compression_loss_weight)}

    # ---- analysis ----------------------------------------------------------------------------------------
    def attention_weights(
        self, x: Tensor, mem: Optional[HiddenMemory], norm: Optional[nn.Module] = None
    ) -> Tuple[Tensor, Tuple[int, int, int]]:
        """The attention weights of a forward over ``(x, mem, norm)`` (B x H x T x S) and the key spans
        (compressed N, memory M, segment T), for analysis (recipes/compressive/attention_analysis.py)."""
        with torch.no_grad():
            compressed, _ = self.compressed_memory(x, mem)
            h = self.normalized(x, norm)
            q = self.split_heads(self.q_proj(h))
            k, v = self.keys_values(h, mem, norm)
            ck, cv = self.compressed_keys_values(compressed, norm)
            _, weights = self.relative_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), need_weights=True)
        N, T = compressed.size(1), x.size(1)
        return weights, (N, k.size(2) - T, T)

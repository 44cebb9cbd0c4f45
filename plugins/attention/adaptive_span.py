"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers",
arXiv 1905.07799, Sec. 2.2 "Adaptive attention span").

Every head h learns its span z_h = s_h * S (s_h in [0, 1] is the parameter, S = ``--max-span``). The
attention weight of key r for query t (distance x = t - r >= 0) is softly masked::

    m_z(x) = clamp((R + z - x) / R, 0, 1)                        R = --span-ramp
    a_tr   = m_z(t - r) exp(s_tr) / sum_q m_z(t - q) exp(s_tq)
    s_tr   = (q_t^T k_r + q_t^T p_(t-r)) / sqrt(Dh)

with p_x a learned embedding per distance x = 0 .. S-1 (the official code's ``key_pe``, one table of
S x Dh shared by all heads and layers). Normalizing after the mask is the same as adding log m_z to the
scores before the softmax (log 0 = -inf), which is how it is computed here: one fused
``scaled_dot_product_attention`` call, exactly the paper's equation (the official code multiplies the
softmax output by the mask and divides by ``sum + 1e-8``). The span loss is the L1 penalty
``--span-loss-weight * sum over layers of mean_h z_h`` (official ``get_loss``: coefficient x S x mean s),
returned by ``aux_losses`` as ``span``.

**Compute follows the span.** Only distances x < R + max_h z_h have a nonzero mask. Every forward
attends to a window of W = that many keys, rounded up to a multiple of 64 and capped at S (the official
``get_trim_len``), and the memory passed to the next segment is cut to what the window needs, so short
learned spans mean fewer keys, a smaller cache and less compute, in training and in evaluation/generation:

- the memory (``HiddenMemory``, layer inputs of past positions) is trimmed to the last W - 1 positions
  (``official``: W) before keys and values are computed;
- the next memory keeps ``min(keep, W)`` positions without gradients (evaluation, generation: the spans
  are fixed) and ``min(keep, W + 64)`` in training, where the next optimizer step may lengthen the spans
  (the official ``get_cache_size`` buffer); ``keep`` is the decoder's ``--mem-len`` (``None``: unbounded,
  when generating). So ``--mem-len`` caps the cache and ``--max-span`` caps the window; the presets set
  both to S, like the official code, which caches S positions at most.

Two windows (``--span-window``):

- ``inclusive`` (default): a query attends its own position and the W - 1 before it (distances 0 .. W-1,
  like every attention here), computed as above (log m_z in one fused softmax);
- ``official`` (facebookresearch/adaptive-span, the presets copied from its scripts): query t attends
  x_(t-1) .. x_(t-W), not itself (models.py: ``h_all = cat([h_cache, h])``, scores ``_unskew``-ed so that
  query i sees h_all[i : i + S]); every stream starts with a cache of zero vectors (train.py) that
  receive attention for the first S positions, and a cache shorter than the window is padded with zeros
  (``trim_memory``). The arithmetic is the official one: softmax, times the mask, divided by
  ``sum + 1e-8`` (jointly with the persistent slots), which also gives the official gradient where the
  mask is exactly 0 at the ramp's end.

In both, the i-th most recent key the query may see (rank x = i - 1) gets the mask m_z(x) and the
position embedding p_x; the key sets differ by one position, so the outputs differ.

The queries are processed in chunks over only the keys their windows reach. The inclusive window (float32,
float64; in query chunks or from ``distance_bias.MIN_SCORE_ELEMENTS`` scores per sequence, below which the
former route measured faster) goes through ``distance_bias.py``, Transformer-XL's explicit route: p_x and log m_z(x) are tables by
distance, the scores by distance are one product per (query chunk, key block), shifted to keys by a strided view, the window and
causal masks are -inf column blocks, and the backward pass is written by hand. The official window (and bf16
or autocast) keeps the former route: a gather, a masked fill, chunks beyond ``--score-chunk-elements``
recomputed in the backward pass when training (``chunking.py``). Both are the same function, in memory
O(chunk x (chunk + W)) instead of O(T x S_k).

The span parameters must stay in [0, 1]: ``after_optimizer_step`` clamps them and ``segment_lm``'s
``optimizer_step`` calls it after every update (fairseq has no other hook after the step).

Shapes: B = batch, H = heads, T = queries (segment), M = memory positions used, S_k = keys (M + T),
W = window (keys one query may see), N = persistent slots, D = model dim, Dh = head dim.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn

from ..errors import UserError
from ..memory import HiddenMemory
from .base import Attention, AttentionConfig, AuxLoss, register_attention
from .chunking import ChunkedScoresConfig, cat_queries, check_chunk_config, chunk_bounds, query_chunk_size, run_chunk
from .distance_bias import distance_bias_applies, distance_bias_attention, position_rows, route_chunk
from .persistent import PersistentMemoryConfig

logger = logging.getLogger(__name__)
SPAN_WINDOWS = ("inclusive", "official")
OFFICIAL_EPS = 1e-8  # official adaptive_span.py: attn / (attn.sum(-1, keepdim=True) + 1e-8)
SPAN_GRANULARITY = 64  # windows and caches grow in steps of 64 positions (official get_trim_len / get_cache_size)


@dataclass
class AdaptiveSpanConfig(AttentionConfig, PersistentMemoryConfig, ChunkedScoresConfig):
    max_span: int = field(
        default=8192,
        metadata={"help": "S: the longest span a head can learn, in positions; also the size of the learned "
                  "position table (official --attn-span, 8192 in experiments/enwik8.sh)"},
    )  # fmt: skip
    span_ramp: int = field(
        default=32, metadata={"help": "R: length of the soft mask's ramp from 1 to 0 (official --adapt-span-ramp)"}
    )
    span_init: float = field(
        default=0.0,
        metadata={"help": "initial span as a fraction of --max-span, in [0, 1] (official --adapt-span-init)"},
    )
    span_window: ChoiceEnum(SPAN_WINDOWS) = field(
        default="inclusive",
        metadata={"help": "which S keys a query attends: 'inclusive' (itself and the S-1 before it, as every "
                  "attention here) or 'official' (the S positions before it, not itself, and a stream starts "
                  "with S zero vectors: facebookresearch/adaptive-span models.py; the default of the presets "
                  "copied from the official scripts, needed to reproduce their numbers)"},
    )  # fmt: skip
    span_loss_weight: float = field(
        default=2e-6,
        metadata={"help": "weight of the L1 span penalty (sum over layers of the mean span in positions); "
                  "official --adapt-span-loss: 2e-6 in experiments/enwik8_small.sh, 5e-7 for the 12/24-layer models"},
    )  # fmt: skip


def soft_span_mask(spans: Tensor, distance: Tensor, ramp: int) -> Tensor:
    """m_z(x) = clamp((R + z - x) / R, 0, 1) for spans z (H, in positions) and distances x (W): H x W."""
    return ((ramp + spans[:, None] - distance[None, :]) / ramp).clamp(0, 1)


def window_size(longest_span: float, max_span: int, ramp: int) -> int:
    """Keys a query must see (itself included) so that every nonzero mask value is covered: distances
    x < R + z, rounded up to a multiple of ``SPAN_GRANULARITY``, at most S."""
    needed = math.ceil(longest_span + ramp)
    return max(1, min(max_span, SPAN_GRANULARITY * math.ceil(needed / SPAN_GRANULARITY)))


def last_positions(mem: Optional[HiddenMemory], n: int) -> Optional[HiddenMemory]:
    """The last ``n`` positions of ``mem`` (and of its cached keys/values), or None for n <= 0."""
    if mem is None or n <= 0:
        return None
    if mem.length <= n:
        return mem
    keys = None if mem.keys is None else mem.keys[:, :, -n:]  # B x H x n x Dh
    values = None if mem.values is None else mem.values[:, :, -n:]
    return HiddenMemory(mem.hidden[:, -n:], keys, values)  # hidden: B x n x D


def log_of(mask: Tensor) -> Tensor:
    """log(mask) with log 0 = -inf and a zero (not NaN) gradient where the mask is 0."""
    positive = mask > 0
    return torch.where(positive, mask.clamp_min(torch.finfo(mask.dtype).tiny).log(), float("-inf"))


@register_attention("adaptive_span", AdaptiveSpanConfig)
class AdaptiveSpanAttention(Attention):
    encodes_positions = ("relative",)  # a learned embedding per distance (not Transformer-XL's sinusoids)
    requires_own_positions = True

    def __init__(self, embed_dim, num_heads, dropout, cfg: AdaptiveSpanConfig, pos_emb: str = "relative"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        self.max_span, self.ramp = cfg.max_span, cfg.span_ramp
        self.span_fraction = nn.Parameter(torch.full((num_heads,), float(cfg.span_init)))  # s_h in [0, 1]
        # p_x for distance x = 0 .. S-1; official key_pe: torch.randn, one table for all layers (share_with)
        self.key_pe = nn.Parameter(torch.randn(cfg.max_span, self.head_dim))  # S x Dh
        # False: attend over the whole window S whatever the spans (the reference the tests and the
        # benchmark compare the trimmed computation with); the result is the same, only slower
        self.trim_to_span = True

    @classmethod
    def check_config(cls, cfg) -> None:
        check_chunk_config(cfg)
        if cfg.max_span <= 0:
            raise UserError(f"--max-span must be positive, got {cfg.max_span}")
        if not 0 < cfg.span_ramp <= cfg.max_span:
            raise UserError(
                f"--span-ramp {cfg.span_ramp} must be between 1 and --max-span {cfg.max_span} (official: 32)"
            )
        if not 0.0 <= cfg.span_init <= 1.0:
            raise UserError(f"--span-init is a fraction of --max-span: give a value in [0, 1], got {cfg.span_init}")
        if cfg.span_window not in SPAN_WINDOWS:
            raise UserError(f"unknown --span-window '{cfg.span_window}': choose one of {', '.join(SPAN_WINDOWS)}")
        if cfg.span_loss_weight < 0:
            raise UserError(f"--span-loss-weight must be >= 0, got {cfg.span_loss_weight}")
        if cfg.mem_len < cfg.max_span:
            logger.warning(
                f"--mem-len {cfg.mem_len} < --max-span {cfg.max_span}: spans can reach back at most "
                f"{cfg.mem_len} positions into past segments (the presets set --mem-len to --max-span)"
            )

    def share_with(self, first: "AdaptiveSpanAttention") -> None:
        self.key_pe = first.key_pe  # one position table for the whole model, as in the official code

    # ---- spans ---------------------------------------------------------------------------------
    def spans(self) -> Tensor:
        """z_h = s_h * S, in positions (H)."""
        return self.span_fraction * self.max_span

    def window(self) -> int:
        """W: keys one query attends to, itself included (the trimmed window, or S untrimmed)."""
        if not self.trim_to_span:
            return self.max_span
        return window_size(float(self.spans().detach().max()), self.max_span, self.ramp)

    def cache_length(self, keep: Optional[int], window: int) -> int:
        """Positions the next memory keeps: what the window needs (+64 in training, where the next step may
        lengthen the spans; official get_cache_size), at most ``keep`` (--mem-len; None: no bound)."""
        needed = window if not torch.is_grad_enabled() else min(self.max_span, window + SPAN_GRANULARITY)
        return needed if keep is None else min(keep, needed)

    def after_optimizer_step(self) -> None:
        """Keep s_h in [0, 1] (official ``clamp_param``); called by ``segment_lm`` after every update."""
        with torch.no_grad():
            self.span_fraction.clamp_(0.0, 1.0)

    def aux_losses(self, new_mem) -> Dict[str, AuxLoss]:
        return {"span": AuxLoss(self.spans().mean(), self.cfg.span_loss_weight)}

    def metrics(self) -> Dict[str, Tensor]:
        spans = self.spans().detach()  # kept on the device: no synchronization per step
        return {"span": spans.mean(), "span_max": spans.max()}

    def zero_padded(
        self, mem: Optional[HiddenMemory], n: int, x: Tensor, norm: Optional[nn.Module]
    ) -> Optional[HiddenMemory]:
        """``mem`` preceded by zero vectors up to ``n`` positions (official ``--span-window``): the official
        code starts every stream with a cache of zero hidden states (train.py) and pads a cache shorter than
        the window with zeros (``trim_memory``). Cached keys/values are padded with those of a zero state."""
        missing = n - (0 if mem is None else mem.length)
        if missing <= 0:
            return mem
        zeros = x.new_zeros(x.size(0), missing, x.size(2))  # B x (n - M) x D
        if mem is None:
            return HiddenMemory(zeros)
        keys = values = None
        if mem.keys is not None:  # the no-gradient cache: K/V of the zero states, B x H x (n - M) x Dh
            zk, zv = (self.split_heads(t) for t in self.kv_proj(self.normalized(zeros, norm)).chunk(2, dim=-1))
            keys, values = torch.cat([zk, mem.keys], dim=2), torch.cat([zv, mem.values], dim=2)
        return HiddenMemory(torch.cat([zeros, mem.hidden], dim=1), keys, values)  # B x n x D

    def official_attention(
        self, q: Tensor, k: Tensor, v: Tensor, position: Tensor, index: Tensor, allowed: Tensor, p: float
    ) -> Tensor:
        """The official arithmetic (models.py ``SeqAttention``, adaptive_span.py ``AdaptiveSpan``,
        persistent_memory.py): softmax over the window (jointly with the persistent slots), times the soft
        mask, divided by ``sum + 1e-8``, dropout, times the values. Same function as the log-mask softmax
        up to the 1e-8, and the same gradient as the official code where a mask value is exactly 0 at the
        ramp's end (clamp passes the gradient there; log m would not), e.g. at ``--span-init 0``.
        ``position``: B x H x T x W by rank; ``index``, ``allowed``: T x S_k (rank of each key, window)."""
        B, H, T, S_k = *q.shape[:3], k.size(2)
        mask = soft_span_mask(self.spans().to(q.dtype), torch.arange(position.size(-1), device=q.device), self.ramp)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # B x H x T x S_k
        scores = scores + position.gather(-1, index.expand(B, H, T, S_k))
        scores = scores.masked_fill(~allowed, float("-inf"))
        mask = mask[:, None, :].expand(H, T, -1).gather(-1, index.expand(H, T, S_k)) * allowed  # H x T x S_k
        if self.persistent is None:
            weights = scores.softmax(dim=-1) * mask  # B x H x T x S_k
        else:  # one softmax with the slots (no position, no mask), then the mask on the context only
            k_pers, v_pers = self.persistent.keys_values(q.dtype)  # H x N x Dh
            N = k_pers.size(1)
            pers = torch.einsum("bhtd,hnd->bhtn", q, k_pers) * self.scale  # B x H x T x N
            weights = torch.cat([pers, scores], dim=-1).softmax(dim=-1)  # B x H x T x (N+S_k)
            weights = torch.cat([weights[..., :N], weights[..., N:] * mask], dim=-1)
            v = torch.cat([v_pers.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)  # B x H x (N+S_k) x Dh
        weights = weights / (weights.sum(dim=-1, keepdim=True) + OFFICIAL_EPS)
        return F.dropout(weights, p=p) @ v  # B x H x T x Dh

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        W = self.window()
        official = self.cfg.span_window == "official"
        if official:  # query t sees t-W .. t-1: exactly W past positions, zero vectors where there are none
            used = self.zero_padded(last_positions(mem, W), W, x, norm)
        else:  # query t sees t-W+1 .. t: the first query sees at most W - 1 past positions
            used = last_positions(mem, W - 1)
        h = self.normalized(x, norm)  # B x T x D (pre-norm: the memory is normalized in keys_values)
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = self.keys_values(h, used, norm)  # B x H x S_k x Dh
        B, H, T, _ = q.shape
        S_k = k.size(2)
        if torch.is_grad_enabled():  # training: the cache may exceed the window (buffer); K/V are recomputed
            new_mem = HiddenMemory.extend(mem, x, self.cache_length(keep, W))
        else:  # the cache is at most W <= len(used) + T positions: all within [used; x], whose K/V are kept
            new_mem = HiddenMemory.extend(used, x, self.cache_length(keep, W), k, v)

        N = 0 if self.persistent is None else self.persistent.size
        chunk = query_chunk_size(H, T, S_k + N, self.cfg.score_chunk_elements)
        if not official and distance_bias_applies(q, S_k + N, chunk):
            out = self.distance_bias_route(q, k, v, W)  # B x H x T x Dh
            return self.out_proj(self.merge_heads(out)), new_mem
        if chunk >= T:  # one pass
            out = self.attend(q, k, v, S_k - T, W, official)  # B x H x T x Dh
            return self.out_proj(self.merge_heads(out)), new_mem
        outs = []
        for t0, t1 in chunk_bounds(T, chunk):  # query chunks (chunking.py): keys from the window's start only
            first = S_k - T + t0  # key position of the chunk's first query
            lo, hi = max(0, first - W), S_k - T + t1  # keys outside [lo, hi) are masked for every query
            outs.append(run_chunk(self.attend_chunk, q, k, v, t0, t1, lo, hi, W, official))
        return self.out_proj(self.merge_heads(cat_queries(outs))), new_mem

    def distance_bias_route(self, q: Tensor, k: Tensor, v: Tensor, W: int) -> Tensor:
        """The inclusive window by ``distance_bias.py``: position keys p_x and log m_z(x) as tables by distance
        (S_k - 1 .. -(C-1); zero rows beyond the window and for negative distances, which are masked), the
        shift as a strided view, a hand-written backward: B x H x T x Dh."""
        B, H, T, _ = q.shape
        S_k = k.size(2)
        p = self.dropout if self.training else 0.0
        N = 0 if self.persistent is None else self.persistent.size
        chunk = route_chunk(H, T, S_k, N, self.cfg.score_chunk_elements, p)  # sized for key blocks
        top, rows = position_rows(S_k, T, chunk)
        n = min(W, S_k)  # distances 0 .. n-1 are in the window and among the keys
        pad = (S_k - n, rows - S_k)  # rows before distance n-1, rows after distance 0
        table = F.pad(self.key_pe[:n].to(q.dtype).flip(0), (0, 0, *pad))[None]  # 1 x E x Dh, row e = distance top-e
        log_mask = log_of(soft_span_mask(self.spans().to(q.dtype), torch.arange(n, device=q.device), self.ramp))
        colbias = F.pad(log_mask.flip(1), pad)  # H x E, by distance like the table
        kp = vp = None
        if self.persistent is not None:  # joint softmax with the slots (never masked, no position)
            kp, vp = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in self.persistent.keys_values(q.dtype))
        qs = q * self.scale  # B x H x T x Dh: the content and the position query
        out, _ = distance_bias_attention(qs, qs, k, v, table, top, chunk, W, colbias, kp, vp, dropout=p)
        return out

    def attend_chunk(self, q, k, v, t0: int, t1: int, lo: int, hi: int, W: int, official: bool) -> Tensor:
        """Queries t0 .. t1-1 over keys lo .. hi-1 (every key they may see): B x H x C x Dh."""
        first = k.size(2) - q.size(2) + t0 - lo  # key position of query t0 among keys lo .. hi-1
        return self.attend(q[:, :, t0:t1], k[:, :, lo:hi], v[:, :, lo:hi], first, W, official)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, first: int, W: int, official: bool) -> Tensor:
        """The T queries (the first at key position ``first`` of ``k``, the others after it) over the S_k
        keys ``k``, ``v`` with window W: B x H x T x Dh."""
        B, H, T, _ = q.shape
        S_k = k.size(2)
        # rank of key j for query t (which sits at key position first + t): 0 for the most recent key
        # it may see, i.e. distance - 1 (official: itself excluded) or distance (inclusive: itself first)
        rank = torch.arange(first, first + T, device=q.device)[:, None] - torch.arange(S_k, device=q.device)  # T x S_k
        if official:
            rank = rank - 1
        allowed = (rank >= 0) & (rank < W)
        index = rank.clamp(0, W - 1)  # T x S_k
        position = torch.einsum("bhtd,wd->bhtw", q, self.key_pe[:W].to(q.dtype)) * self.scale  # B x H x T x W
        p = self.dropout if self.training else 0.0
        if official:
            return self.official_attention(q, k, v, position, index, allowed, p)  # B x H x T x Dh
        exact = torch.promote_types(q.dtype, torch.float32)  # the bias in float32 at least (log of the mask)
        log_mask = log_of(soft_span_mask(self.spans().to(exact), torch.arange(W, device=q.device), self.ramp))
        bias = position.to(exact) + log_mask[:, None, :]  # B x H x T x W, by rank (log_mask: H x W)
        bias = bias.gather(-1, index.expand(B, H, T, S_k)).masked_fill(~allowed, float("-inf"))  # B x H x T x S_k
        if self.persistent is not None:  # joint softmax with the slots (never masked, no position)
            k, v, bias = self.persistent.prepend(k, v, bias)  # B x H x (N+S_k) x Dh
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)  # B x H x T x Dh

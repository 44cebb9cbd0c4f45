"""Transformer-XL relative positional attention (Dai et al. 2019, Sec. 3.3, Eq. in "Relative
Positional Encodings").

For query i (absolute position M + i, after M memory positions) and key j::

    A_ij = (q_i + u)^T k_j  +  (q_i + v)^T W_R r_(M+i-j)
           \\_ content (a)+(c) _/   \\_ position (b)+(d) __/

where r_d is the sinusoidal encoding of the relative distance d (clamped to ``--clamp-len``), W_R a
learned projection, and u, v learned global biases per head, shared by all layers as in the official
code (``--untie-r`` gives every layer its own). Keys and values span ``[memory; segment]``; the
memory is the layer inputs of the previous segments (``HiddenMemory``), recomputed with the current
weights. ``--same-length`` (used at evaluation in the paper) lets every query see exactly ``mem_len``
keys, so early and late positions of a segment are scored with the same context length.

Two routes compute the same function (``--relative-route``; tests/test_relative_sinusoid.py compares them):

- fused (``relative_sinusoid.py``): by the angle-difference identities the position term is a dot product of
  rotated queries and keys, so the whole score is one ``scaled_dot_product_attention`` call over
  [q + u, qt] . [k, kt] (Dh + D dimensions per head): no B x H x T x S tensor. Not with ``--clamp-len`` > 0 (a
  clamped distance is not a rotation), nor where the attention weights are needed (``most_used``
  compression, analysis): those calls take the explicit route;
- explicit (``distance_bias.py``): the position keys W_R r_d are computed once per distance (S + C - 1 rows,
  not T x S x D); per chunk of C queries and block of Kb keys (flash-style, online softmax; dropout: the
  chunk's whole key range L) one C x (Kb + C - 1) product gives the position scores by distance,
  the masks are -inf column blocks in that matrix (negative distances, and distances >= the
  ``--same-length`` window), and the paper's "relative shift" (App. B) is a zero-copy strided view of it,
  added to the content scores; the backward pass is written by hand (the block's weights recomputed from the
  saved log-sum-exp, nothing of C x S size stored): memory linear in the keys, 3 + 8 matrix products per
  (chunk, block). In float32 and
  float64 outside autocast, for calls in query chunks or with at least ``MIN_SCORE_ELEMENTS`` (2^17) scores
  per sequence; otherwise (bf16, autocast, short segments, where it measured faster) the former route: a
  gather for the shift, a float mask, and checkpointed chunks (``chunking.py``), the same function.

``auto`` (the default) takes the explicit route on every device: on CPU it is measured faster than the fused
one and lighter (the fused route does T x S x (Dh + D) work per head, i.e. (1 + H) x D per query-key pair over
all heads, against about 3 x D for the explicit one; docs/long-context.md); on CUDA the fused route has not
been measured yet. ``--relative-route fused`` chooses it.

With ``--persistent-mem-size N`` (``persistent.py``) N learned key/value slots join the keys; they get the
content term (q_i + u)^T k only.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn

from ..errors import UserError
from ..memory import HiddenMemory
from ..modules.positional import SinusoidalPositions
from .base import Attention, AttentionConfig, causal_mask, register_attention
from .chunking import ChunkedScoresConfig, cat_queries, check_chunk_config, chunk_bounds, query_chunk_size, run_chunk
from .distance_bias import distance_bias_applies, distance_bias_attention, key_range, position_rows, route_chunk
from .persistent import PersistentMemoryConfig
from .relative_sinusoid import sinusoid_relative_attention

RELATIVE_ROUTES = ("auto", "fused", "explicit")


@dataclass
class RelativeAttentionConfig(AttentionConfig, PersistentMemoryConfig, ChunkedScoresConfig):
    clamp_len: int = field(
        default=0,
        metadata={"help": "clamp relative distances to at most this (0: no clamp); Transformer-XL's --clamp_len, "
                  "used at evaluation with a long memory (e.g. 1000 with mem 1600 on WikiText-103)"},
    )  # fmt: skip
    same_length: bool = field(
        default=False, metadata={"help": "every query attends to exactly mem_len keys (Transformer-XL evaluation)"}
    )
    untie_r: bool = field(default=False, metadata={"help": "one pair of position biases u, v per layer"})
    relative_route: ChoiceEnum(RELATIVE_ROUTES) = field(
        default="auto",
        metadata={"help": "how the position term is computed, the same function either way: fused (one fused "
                  "attention call by the sinusoid identity, no T x S tensor; not with --clamp-len), explicit "
                  "(the position term by distance in query chunks, shifted by a strided view), or auto: explicit "
                  "(measured faster and lighter on CPU; the fused route is not measured on GPUs yet: "
                  "docs/long-context.md)"},
    )  # fmt: skip


def same_length_mask(num_queries: int, num_keys: int, window: int, device=None) -> Tensor:
    """T x S mask: query t (at key position S - T + t) sees the ``window`` keys up to itself."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]  # T x 1
    key_pos = torch.arange(num_keys, device=device)[None, :]  # 1 x S
    return (key_pos <= query_pos) & (key_pos > query_pos - window)


def relative_shift(scores: Tensor) -> Tensor:
    """B x H x T x S scores whose column s is distance S-1-s -> column j is key j (distance S-T+t-j).

    Entries for future keys (negative distance) are clamped to distance 0; they are masked anyway.
    """
    T, S = scores.shape[-2:]
    t = torch.arange(T, device=scores.device)[:, None]
    j = torch.arange(S, device=scores.device)[None, :]
    index = (T - 1 - t + j).clamp(max=S - 1)  # T x S: column of distance (S - T + t - j)
    return scores.gather(-1, index.expand(scores.shape))


class PositionKeyCache:
    """The last position-key table of a layer (``RelativeAttention.position_keys``) and the W_R it was computed
    with: reused, without projecting the S + C - 1 sinusoids again, while no gradient reaches W_R, the request
    (shape, dtype, device, clamp) is the same and W_R is equal to the copy kept with the table. Comparing W_R's
    values (D x D, a small fraction of the E x D x D projection) rather than its version counter keeps the table
    exact after any update, including in-place writes through ``.data`` that the counter does not see. A memo
    of a pure function of the weights, not recurrent state: dropping it changes nothing but the time. Kept
    contiguous (H x E x Dh), as the distance route multiplies it."""

    def __init__(self):
        self.key, self.weight, self.table = None, None, None

    def get(self, key: tuple, weight: Tensor, compute) -> Tensor:
        if self.key != key or self.weight is None or not torch.equal(self.weight, weight):
            table = compute()
            self.key, self.weight, self.table = key, weight.detach().clone(), table.detach().contiguous()
        return self.table


@register_attention("relative", RelativeAttentionConfig)
class RelativeAttention(Attention):
    encodes_positions = ("relative",)
    requires_own_positions = True

    def __init__(self, embed_dim, num_heads, dropout, cfg: RelativeAttentionConfig, pos_emb: str = "relative"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        self.r_proj = nn.Linear(embed_dim, embed_dim, bias=False)  # W_R
        self.u = nn.Parameter(torch.empty(num_heads, self.head_dim).normal_(std=0.02))  # content bias
        self.v = nn.Parameter(torch.empty(num_heads, self.head_dim).normal_(std=0.02))  # position bias
        self.sinusoid = SinusoidalPositions(embed_dim)
        self.position_cache = PositionKeyCache()

    @classmethod
    def check_config(cls, cfg) -> None:
        check_chunk_config(cfg)
        route = getattr(cfg, "relative_route", "auto")
        if route not in RELATIVE_ROUTES:
            raise UserError(f"unknown --relative-route '{route}': choose one of {', '.join(RELATIVE_ROUTES)}")
        if route == "fused" and cfg.clamp_len > 0:
            raise UserError("--relative-route fused is not the same function with --clamp-len > 0 (a clamped "
                            "distance is not a rotation): use --relative-route auto or explicit")  # fmt: skip

    def fused_route(self) -> bool:
        """Whether the position term goes through the fused sinusoid-identity call: only when asked for
        (``auto`` is explicit until the fused route is measured faster: module docstring), never with
        ``--clamp-len`` > 0, where it would not be the same function."""
        return self.cfg.relative_route == "fused" and self.cfg.clamp_len == 0

    def share_with(self, first: "RelativeAttention") -> None:
        if not self.cfg.untie_r:
            self.u, self.v = first.u, first.v

    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        h = self.normalized(x, norm)  # B x T x D (pre-norm: the memory is normalized in keys_values)
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = self.keys_values(h, mem, norm)  # B x H x S x Dh
        out, _ = self.relative_attention(q, k, v, window=keep if self.cfg.same_length else None)
        return self.out_proj(self.merge_heads(out)), HiddenMemory.extend(mem, x, keep, k, v)

    def position_keys(self, num_keys: int, q: Tensor, negative: int = 0) -> Tensor:
        """W_R r_d for the S distances d = S-1 .. 0 (clamped to ``--clamp-len``), by head: H x S x Dh; with
        ``negative`` > 0, followed by the rows of distances -1 .. -negative (those of distance 0: placeholders
        for keys after the query, which are masked): H x (S + negative) x Dh. Where no gradient reaches W_R
        (evaluation), the table of the last call is reused while the weights and the shape are the same
        (``PositionKeyCache``): segments of one length over a full memory ask for the same rows every time."""
        if torch.is_grad_enabled() and self.r_proj.weight.requires_grad:
            return self.project_distances(num_keys, q, negative)
        key = (num_keys, negative, q.dtype, q.device, self.cfg.clamp_len)
        return self.position_cache.get(key, self.r_proj.weight, lambda: self.project_distances(num_keys, q, negative))

    def project_distances(self, num_keys: int, q: Tensor, negative: int = 0) -> Tensor:
        """``position_keys`` computed: the sinusoids of the distances projected by W_R."""
        distance = torch.arange(
            num_keys - 1, -1 - negative, -1, device=q.device
        )  # distance of row s from the last query
        distance = distance.clamp(min=0)
        if self.cfg.clamp_len > 0:
            distance = distance.clamp(max=self.cfg.clamp_len)
        r = self.r_proj(self.sinusoid(distance, q.dtype))  # (S + negative) x D
        return r.view(distance.numel(), self.num_heads, self.head_dim).transpose(0, 1)  # H x (S + negative) x Dh

    def distance_bias_route(
        self, q: Tensor, k: Tensor, v: Tensor, window: Optional[int], need_usage: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``relative_attention`` by ``distance_bias.py``: (q + u) and (q + v) scaled, the position keys of
        distances S-1 .. -(C-1) (H x (S + C - 1) x Dh), the shift as a strided view, a hand-written backward."""
        B, H, T, _ = q.shape
        S = k.size(2)
        p = self.dropout if self.training else 0.0
        N = 0 if self.persistent is None else self.persistent.size
        chunk = route_chunk(H, T, S, N, self.cfg.score_chunk_elements, p)  # sized for key blocks
        top, rows = position_rows(S, T, chunk)
        r = self.position_keys(S, q, rows - S).contiguous()  # H x E x Dh, row e = distance S-1-e
        kp = vp = None
        if self.persistent is not None:  # content term only, never masked
            kp, vp = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in self.persistent.keys_values(q.dtype))
        qc = (q + self.u[:, None]) * self.scale  # B x H x T x Dh
        qp = (q + self.v[:, None]) * self.scale
        return distance_bias_attention(qc, qp, k, v, r, top, chunk, window, kp=kp, vp=vp, usage=need_usage, dropout=p)

    def score_bias(self, q: Tensor, num_keys: int, window: Optional[int] = None, r: Optional[Tensor] = None) -> Tensor:
        """The position term (b)+(d), scaled, of T queries over the last S keys, -inf where a query may
        not look (causal; ``window``: only the ``window`` keys up to the query): B x H x T x S. ``r``: the
        position keys of the S distances S-1 .. 0 (``position_keys``), computed here if not given."""
        T, S = q.size(2), num_keys
        r = self.position_keys(S, q) if r is None else r  # H x S x Dh
        position = torch.einsum("bhtd,hsd->bhts", q + self.v[:, None], r)  # B x H x T x S (by distance)
        position = relative_shift(position) * self.scale  # B x H x T x S (by key)
        allowed = same_length_mask(T, S, window, q.device) if window else causal_mask(T, S, q.device)
        return position.masked_fill(~allowed, float("-inf"))

    def relative_attention(
        self, q: Tensor, k: Tensor, v: Tensor, window: Optional[int] = None, need_weights: bool = False,
        need_usage: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
        """softmax((q + u)^T k * scale + position term) v over the S keys (the queries are the last T):
        B x H x T x Dh, and the attention weights (B x H x T x S, before dropout) if ``need_weights``, or the
        attention each key received (B x S: weights averaged over heads, summed over queries, no gradient)
        if ``need_usage``. Persistent slots (``--persistent-mem-size``) get the content term only, no
        position, never masked. Beyond ``--score-chunk-elements`` the queries are processed in chunks
        (``chunking.py``), except for ``need_weights`` (the B x H x T x S weights are the result). ``window``
        (``--same-length``): every query sees the ``window`` keys up to itself; None or 0 (``--mem-len 0``, no
        memory to equalize over): causal only, on every route."""
        window = window or None
        if not (need_weights or need_usage) and self.fused_route():  # the weights need the explicit path
            p = self.dropout if self.training else 0.0
            out = sinusoid_relative_attention(
                q, k, v, self.u, self.v, self.r_proj.weight, self.scale, p, window, self.persistent,
                self.cfg.score_chunk_elements,
            )  # fmt: skip
            return out, None
        B, H, T, _ = q.shape
        S = k.size(2)
        N = 0 if self.persistent is None else self.persistent.size
        chunk = query_chunk_size(H, T, S + N, self.cfg.score_chunk_elements)
        if not need_weights and distance_bias_applies(q, S + N, chunk):
            return self.distance_bias_route(q, k, v, window, need_usage)
        if need_weights or chunk >= T:
            out, weights = self.attend_keys(q, k, v, self.score_bias(q, S, window), need_weights or need_usage)
            if need_usage:
                return out, weights.detach().mean(dim=1).sum(dim=1)  # B x S
            return out, weights
        r = self.position_keys(S, q)  # H x S x Dh, distances S-1 .. 0

        def attend_chunk(t0: int, t1: int, q: Tensor, k: Tensor, v: Tensor, r: Tensor):
            lo, hi = key_range(S, T, t0, t1, window)  # the keys masked for every query of the chunk are left out
            qc = q[:, :, t0:t1]  # B x H x C x Dh
            bias = self.score_bias(qc, hi - lo, window, r[:, S - (hi - lo) :])  # B x H x C x L (L = hi - lo)
            out, weights = self.attend_keys(qc, k[:, :, lo:hi], v[:, :, lo:hi], bias, need_usage)
            usage = None if weights is None else F.pad(weights.detach().mean(dim=1).sum(dim=1), (lo, S - hi))
            return out, usage  # B x H x C x Dh, B x S

        outs, usage = [], None
        for t0, t1 in chunk_bounds(T, chunk):
            out, used = run_chunk(attend_chunk, t0, t1, q, k, v, r)
            outs.append(out)
            usage = used if usage is None else usage + used
        return cat_queries(outs), usage

    def attend_keys(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, need_weights: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """softmax((q + u)^T k * scale + bias) v (B x H x T x Dh) with the persistent slots joining the keys,
        and the weights (B x H x T x S, before dropout) if ``need_weights`` (not with persistent slots)."""
        if self.persistent is not None:
            if need_weights:
                raise ValueError("attention weights over persistent slots are not defined here")
            k, v, bias = self.persistent.prepend(k, v, bias)  # B x H x (N+S) x Dh
        p = self.dropout if self.training else 0.0
        if not need_weights:  # the fused kernel; it does not return the weights
            return F.scaled_dot_product_attention(q + self.u[:, None], k, v, attn_mask=bias, dropout_p=p), None
        scores = torch.einsum("bhtd,bhsd->bhts", q + self.u[:, None], k) * self.scale + bias  # B x H x T x S
        weights = scores.softmax(dim=-1)
        return F.dropout(weights, p=p) @ v, weights  # B x H x T x Dh

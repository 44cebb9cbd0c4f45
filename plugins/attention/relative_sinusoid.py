"""Transformer-XL's relative attention as ONE fused softmax attention, by the sinusoid identity.

The score of query i over key j (Dai et al. 2019, arXiv 1901.02860, Sec. 3.3; ``relative.py``), per head h::

    A_ij = scale * [ (q_i + u)^T k_j  +  (q_i + v)^T W_R^h r_(i-j) ]

with r_d = [sin(w d) | cos(w d)] (``modules/positional.py``'s layout: D/2 sines then D/2 cosines, frequencies
w_f = 10000^(-f / (D/2)), f = 0 .. D/2-1) and W_R^h the Dh x D rows of W_R that belong to head h. Write the
position term as p_i . r_(i-j) with p_i = W_R^h^T (q_i + v) (D values per head) and a, b the halves of p_i
that meet the sines and the cosines. The angle-difference identities

    sin(w(i - j)) = sin(wi) cos(wj) - cos(wi) sin(wj),     cos(w(i - j)) = cos(wi) cos(wj) + sin(wi) sin(wj)

give, summed over the frequencies::

    p_i . r_(i-j) = qt_i . kt_j,     qt_i = [a sin(wi) + b cos(wi) | b sin(wi) - a cos(wi)],
                                     kt_j = [cos(wj) | sin(wj)]

(r_(i-j) is the encoding of -j rotated by the angles wi). The whole score is therefore one dot product::

    A_ij = scale * [q_i + u | qt_i] . [k_j | kt_j]

and the attention is one ``scaled_dot_product_attention`` call over Dh + D dimensions per head (the values are
zero-padded to the same width, which the CPU flash kernel requires, and cut back to Dh after): no B x H x T x S
score, position or weight tensor, so the memory is linear in the keys (the fused kernel's backward recomputes
the weights). Positions i, j count from the first key of the window (memory included), so the angles stay
below S radians; they are taken in float64 and cast to the model's dtype after the sine and cosine.

Masks: T = K (no memory, no slots) is the kernel's own causal mode (``is_causal``, no mask tensor); one query
sees every key (no mask). Otherwise (memory, persistent slots, a ``--same-length`` window) the queries are
processed in chunks of C with a boolean C x K' mask each (K' <= K: the keys the chunk may see), C x K' at most
``--score-chunk-elements`` (the CPU kernel turns the mask into a float tensor of that size, shared by the
heads); on CUDA, without a window, the memory's causal mask is ``causal_lower_right`` (the efficient kernel, no
tensor). Persistent slots (``--persistent-mem-size``) join the keys first with kt = 0 (content term only) and
are never masked. Adaptive span (``adaptive_span.py``) learns its own position embedding: not this file's.

Cost: the scores take Dh + D (not Dh) products per query-key pair and head, (1 + H) x D over all heads,
and the values are padded to the same width: more arithmetic than the explicit path's ~3 x D as soon as
H >= 2, for no T x S memory traffic. ``--relative-route auto`` therefore does not take it: on CPU it is measured
no faster and heavier (docs/long-context.md), on CUDA it is not measured yet; ``--relative-route fused`` does.

Exactly the same function as the explicit path (``relative.py``), checked on values and gradients in
tests/test_relative_sinusoid.py. Not covered, so kept on the explicit path by ``RelativeAttention``:
``--clamp-len`` > 0 (a clamped distance is not a rotation: r_(min(i-j, c)) does not factor into a product of
a function of i and a function of j), and callers that need the attention weights (compressive's
``most_used`` compression, the analysis of ``attention_weights``): the fused kernel does not return them.

Shapes: B = batch, H = heads, T = queries (the last T of the S keys), S = keys ([memory; segment]),
N = persistent slots, K = N + S, C = queries per chunk, Dh = head dim, D = model dim, F = D // 2 frequencies.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules.positional import sinusoid_frequencies
from .chunking import chunk_bounds, query_chunk_size


def angles(positions: Tensor, num_freqs: int) -> Tensor:
    """w_f * position in float64 (the frequencies of ``SinusoidalPositions``): L x F."""
    inv_freq = sinusoid_frequencies(num_freqs, positions.device, torch.float64)  # F
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rotated_queries(p: Tensor, first: int, dtype) -> Tensor:
    """qt_i from p_i (B x H x T x 2F) for queries at key positions first .. first + T - 1: B x H x T x 2F."""
    T, Fq = p.size(2), p.size(3) // 2
    theta = angles(torch.arange(first, first + T, device=p.device), Fq)  # T x F
    sin, cos = theta.sin().to(dtype), theta.cos().to(dtype)
    a, b = p[..., :Fq], p[..., Fq:]  # the sine and cosine halves of p_i
    return torch.cat([a * sin + b * cos, b * sin - a * cos], dim=-1)


def rotated_keys(num_keys: int, num_freqs: int, device, dtype) -> Tensor:
    """kt_j = [cos(wj) | sin(wj)] for j = 0 .. S-1: S x 2F."""
    theta = angles(torch.arange(num_keys, device=device), num_freqs)  # S x F
    return torch.cat([theta.cos(), theta.sin()], dim=-1).to(dtype)


def sinusoid_relative_attention(
    q: Tensor, k: Tensor, v: Tensor, u: Tensor, pos_bias: Tensor, r_weight: Tensor, scale: float,
    dropout: float = 0.0, window: Optional[int] = None, persistent=None, mask_budget: int = 0,
) -> Tensor:  # fmt: skip
    """softmax(scale * [(q + u)^T k + (q + v)^T W_R r_(i-j)]) v over [persistent; memory; segment] with the causal
    mask (``window``: each query sees the ``window`` keys ending at itself), the T queries being the last T of
    the S keys: B x H x T x Dh.

    q: B x H x T x Dh, k, v: B x H x S x Dh, u, pos_bias (v of the paper): H x Dh, r_weight: W_R (D x D, the
    ``r_proj`` weight), persistent: ``PersistentMemory`` or None, mask_budget: the largest C x K boolean mask
    built at once (0: one mask for all queries)."""
    H, Dh = q.size(1), q.size(3)
    D = r_weight.size(1)
    W = r_weight.view(H, Dh, D)[..., : 2 * (D // 2)]  # H x Dh x 2F (odd D: the table's zero column meets nothing)
    N = 0
    if persistent is not None:  # slots first, content only (kt = 0 below)
        k, v, _ = persistent.prepend(k, v)  # B x H x K x Dh
        N = persistent.size
    return fused_attention(q, k, v, u, pos_bias, W, N, scale, dropout, window, mask_budget)


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, u: Tensor, pos_bias: Tensor, W: Tensor, N: int, scale: float, dropout: float,
    window: Optional[int], mask_budget: int,
) -> Tensor:  # fmt: skip
    """``sinusoid_relative_attention`` with W: W_R by head (H x Dh x 2F), the first N of the K keys being
    persistent slots."""
    B, H, T, Dh = q.shape
    K = k.size(2)
    S, Fq = K - N, W.size(2) // 2
    p = torch.einsum("bhtd,hde->bhte", q + pos_bias[:, None], W)  # B x H x T x 2F
    qt = rotated_queries(p, S - T, q.dtype)  # B x H x T x 2F
    kt = F.pad(rotated_keys(S, Fq, q.device, q.dtype), (0, 0, N, 0))  # K x 2F (slots: 0)
    query = torch.cat([q + u[:, None], qt], dim=-1)  # B x H x T x (Dh + 2F)
    key = torch.cat([k, kt.expand(B, H, K, 2 * Fq)], dim=-1)  # B x H x K x (Dh + 2F)
    value = F.pad(v, (0, 2 * Fq))  # B x H x K x (Dh + 2F): the CPU kernel wants one head width

    def attend(query, key, value, **mask):
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale, **mask)
        return out[..., :Dh]  # B x H x C x Dh

    if window is None and T == K:  # no memory, no slots: the kernel's causal mode
        return attend(query, key, value, is_causal=True)
    if window is None and T == 1:  # one query sees every key
        return attend(query, key, value)
    if window is None and q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return attend(query, key, value, attn_mask=causal_lower_right(T, K))
    chunk = query_chunk_size(1, T, K, mask_budget)
    outs = []
    for t0, t1 in chunk_bounds(T, chunk):
        hi = K - T + t1  # keys after the chunk's last query are masked for all of it: left out
        lo = 0 if window is None or N else max(0, S - T + t0 - window + 1)  # and those before every window
        allowed = key_mask(t0, t1, T, S, N, lo, hi, window, q.device)  # C x (hi - lo)
        outs.append(attend(query[:, :, t0:t1], key[:, :, lo:hi], value[:, :, lo:hi], attn_mask=allowed))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def key_mask(t0: int, t1: int, T: int, S: int, N: int, lo: int, hi: int, window: Optional[int], device) -> Tensor:
    """Boolean mask (C x (hi - lo)) of queries t0 .. t1-1 over keys lo .. hi-1 of [slots; context], True where
    the query may look: the N slots always (lo is then 0), context keys up to the query (and within ``window``)."""
    query_pos = torch.arange(S - T + t0, S - T + t1, device=device)[:, None]  # C x 1, context numbering
    key_pos = torch.arange(lo, hi, device=device)[None, :] - N  # 1 x L, context numbering (slots < 0)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (key_pos > query_pos - window)
    return allowed | (key_pos < 0)

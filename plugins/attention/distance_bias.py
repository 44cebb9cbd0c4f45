"""Softmax attention with an additive term that depends on the query-key distance, in query chunks and key
blocks, with a hand-written backward pass: the explicit route of relative attention (``relative.py``, Dai et al. 2019,
arXiv 1901.02860, Sec. 3.3 and App. B) and of adaptive span (``adaptive_span.py``, Sukhbaatar et al. 2019).

For query i at key position a_i and key j (distance d = a_i - j), per head::

    A_ij = qc_i . k_j  +  qp_i . R_d  +  c_d        (-inf where d < 0, or d >= window)
    out_i = sum_j softmax_j(A_ij) v_j

with qc the content queries and qp the position queries (already scaled, the biases u, v added by the
caller), R_d a position key per distance (by head, or one table for all heads) and c_d an optional additive
term per distance and head (adaptive span's log soft mask). Persistent slots (``persistent.py``) join the
keys with the content term only, never masked.

**The shift as a strided view** (the "relative shift" of the official Transformer-XL code, App. B). A chunk
of C queries sees the L keys lo .. hi-1 (none after its last query, none before its first query's window),
so its distances run from L-1 down to -(C-1): the position scores of all of them are ONE C x (L + C - 1)
matrix product P = qp R^T, column m holding distance L-1-m. Query c, key j has distance L-C+c-j, i.e.
column C-1-c+j: row c of the by-key matrix starts one column earlier than row c-1 does, so the by-key
matrix is the zero-copy view ``P.as_strided((C, L), (L + C - 2, 1), offset=C-1)``. The causal mask is the
column block of negative distances (the last C-1 columns of P) and the window mask the block of distances
>= window (the first columns): both are filled with -inf in P once, before the shift, instead of a C x L
mask (no gather, no index or boolean tensor, no ``masked_fill``).

**Backward without autograd's stored graph.** The forward keeps only its inputs and its output (B x H x T x
Dh): no C x L tensor survives a chunk. The backward recomputes each chunk's weights W = softmax(A) (two
matrix products, as memory-efficient attention does, Rabe & Staats 2021; FlashAttention, Dao et al. 2022)
and applies::

    dV = W^T dO,    dA = W * (dO V^T - rowsum(dO * O)),    dqc = dA K,    dK = dA^T qc,
    dP = unshift(dA)  (zero outside the view),    dqp = dP R,    dR = dP^T qp,    dc = colsum(dP)

so a chunk costs 3 matrix products forward and 8 backward (autograd with ``torch.utils.checkpoint``, the
former route, does 12 and several more passes over C x L: the float mask of a math-kernel SDPA call, its
gradient, the gather and its scatter). The arithmetic is the same function as the former route (tests:
tests/test_distance_bias.py against the paper's equation written plainly, tests/test_long_context.py,
tests/test_relative_sinusoid.py against the former route).

**Key blocks** (``KeyBlockAttention``, the default without dropout; flash-style, Dao et al. 2022). Inside a
chunk the L keys are taken in blocks of Kb = ``KEY_BLOCK`` (aligned on the chunk's last key, the diagonal block
first; the last one may be shorter). A block [j0, j1) of Lb keys and the C queries (the last at key position
hi - 1) span the Lp = Lb + C - 1 distances hi-1-j0 down to hi-C-j1+1: ONE C x Lp product qp R[rows]^T, the
same strided view and the same -inf column blocks (negative distances in the diagonal block only, distances
>= window in the oldest). The forward keeps the online softmax over the blocks::

    m' = max(m, rowmax(A_b)),   l = l exp(m - m') + rowsum(exp(A_b - m')),   acc = acc exp(m - m') + exp(A_b - m') V_b
    out = acc / l,   lse = m + log l      (B x H x T, saved with the inputs and the output)

(the slots are a block of their own, first: content only, never masked; every row's first key block holds its
own key, so m is finite from there on). The backward takes each (chunk, block) pair from W = exp(A_b - lse)
with the formulas above, dR and dc accumulated by the unshift over the block's rows. The products are the same
11 per (chunk, block), none wider than C x (Kb + C - 1): a chunk's scores stay in cache at every length, where
a C x L tensor of the whole key range (up to 8 MiB per head at N = 16384) does not. Their buffers (``Workspace``)
are allocated once per call: reallocated per block they cost a page fault per 4 KiB under a low glibc mmap
threshold (the suite's ``MALLOC_MMAP_THRESHOLD_``), which had made the route 4x SDPA's time at N = 4096 in
the suite against 1.9x in a plain process (docs/long-context.md). The attention each key received (``usage``,
most_used compression) needs the normalized weights: a second pass over the blocks with the final lse, only
when asked. Dropout keeps ``DistanceBiasAttention`` (whole key range per chunk): its backward redraws the
forward's masks in the same order and shapes, which a block loop would have to reproduce per block.

Chunks: C queries such that one sequence's H x C x (N + min(L, Kb)) scores hold at most
``--score-chunk-elements`` (``route_chunk``; N + L without key blocks), and at most ``QUERY_BLOCK`` (128): a
chunk does about C x C / 2 products above the causal half for its masked keys (in the diagonal block) and
C x (C - 1) more per block for the position columns no query of the block reads, so shorter inputs are cut too.

Shapes: B = batch, H = heads, T = queries (the last T of the S keys), S = keys, N = persistent slots,
C = queries per chunk, L = keys of a chunk, Kb = keys per block, Lb = keys of a block (<= Kb), Dh = head dim,
G = heads of the position table (H or 1), E = rows of the position table.
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .chunking import chunk_bounds, query_chunk_size

# At most this many queries per chunk, whatever --score-chunk-elements allows: a chunk computes C x (L + C - 1)
# position scores and C x L content scores of which about C x C / 2 are masked, so the work above the causal
# half grows with C; 128 measured fastest of 32 .. 512 at N = 1024 (docs/long-context.md), and is what the
# default budget gives at N = 4096, 4 heads.
QUERY_BLOCK = 128

# Keys per block inside a query chunk (``KeyBlockAttention``); 0: the whole key range of a chunk at once
# (``DistanceBiasAttention``). At least the chunk's C queries (the first block must hold every query's own key).
# One relative layer fwd + bwd, D 256, 4 heads, 1 thread, process CPU time (the machine was loaded), the suite's
# MALLOC_MMAP_THRESHOLD_, 128 queries per chunk, vs SDPA in the same process (2026-12-05): whole key range (0) /
# 256 / 512 / 1024 keys per block: N = 1024: 2.26x / 1.66x / 1.67x / -; N = 4096: 3.08x / - / 1.87x / 1.85x;
# N = 8192: - / 2.11x / 1.89x / 1.92x. Blocks are faster at every N measured, so there is no threshold below
# which the whole key range is kept (one block when L <= Kb).
KEY_BLOCK = 512


def key_range(S: int, T: int, t0: int, t1: int, window: Optional[int]) -> Tuple[int, int]:
    """Keys lo .. hi-1 that queries t0 .. t1-1 (the last T of the S keys) may see: none after the last
    query; with a ``window``, none before the first query's window."""
    hi = S - T + t1
    lo = 0 if window is None else max(0, S - T + t0 - window + 1)
    return lo, hi


class DistanceBiasAttention(torch.autograd.Function):
    """softmax(qc K^T + shift(qp R^T + c), masked) V in query chunks; see the module docstring."""

    @staticmethod
    def forward(
        ctx, qc, qp, k, v, R, colbias, kp, vp, top: int, window: Optional[int], chunk: int, usage: bool, dropout: float
    ):
        """qc, qp: B x H x T x Dh; k, v: B x H x S x Dh; R: G x E x Dh, row e = distance ``top`` - e (rows for
        distances top .. -(C-1) at least); colbias: H x E or 1 x E (same rows) or None; kp, vp: B x H x N x Dh
        persistent slots or None; window: allowed distances 0 .. window-1 (None: every d >= 0); dropout: the
        probability of zeroing a weight (the backward redraws the same masks from the saved RNG state). Returns the
        output B x H x T x Dh and, if ``usage``, the attention each key received (B x S: weights averaged over
        heads, summed over queries; over the S keys, not the slots) else an empty tensor."""
        B, H, T, _ = qc.shape
        S = k.size(2)
        received = qc.new_zeros(B, S) if usage else qc.new_zeros(0)
        ctx.rng = rng_state(qc.device) if dropout > 0 else None
        outs = []
        for t0, t1 in chunk_bounds(T, chunk):
            weights, lo, hi, (_, values, *_) = DistanceBiasAttention.chunk_weights(
                qc, qp, k, v, R, colbias, kp, vp, top, window, t0, t1
            )  # fmt: skip
            kept = weights if dropout == 0 else weights * dropout_scale(weights, dropout)
            outs.append(kept @ values)  # B x H x C x Dh
            del kept
            if usage:
                N = weights.size(-1) - (hi - lo)
                received[:, lo:hi] += weights[..., N:].mean(dim=1).sum(dim=1)  # B x L
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # B x H x T x Dh
        ctx.save_for_backward(qc, qp, k, v, R, colbias, kp, vp, out)
        ctx.top, ctx.window, ctx.chunk, ctx.dropout = top, window, chunk, dropout
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def chunk_weights(qc, qp, k, v, R, colbias, kp, vp, top, window, t0, t1):
        """Softmax weights of queries t0 .. t1-1 (B x H x C x (N + L)), the key range lo, hi, the keys and
        values they see ([slots; k[lo:hi]], B x H x (N + L) x Dh), the position queries as multiplied
        (G x X x Dh), the rows of R used and their number Lp = L + C - 1. The position scores are freed before
        the softmax: two C x L tensors at most are alive."""
        B, H, T, Dh = qc.shape
        S = k.size(2)
        lo, hi = key_range(S, T, t0, t1, window)
        C, L = t1 - t0, hi - lo
        Lp = L + C - 1  # distances L-1 .. -(C-1), column m = distance L-1-m
        G = R.size(0)
        rows = slice(top - (L - 1), top + C)  # rows of R for those distances
        qp_c = qp[:, :, t0:t1].transpose(0, 1).reshape(G, -1, Dh)  # G x (H/G * B * C) x Dh
        P = torch.bmm(qp_c, R[:, rows].transpose(1, 2))  # G x X x Lp
        P = P.view(H, B, C, Lp)
        if colbias is not None:
            P += colbias[:, rows][:, None, None, :]  # H (or 1) x Lp, by distance
        P[..., L:] = float("-inf")  # negative distances: keys after the query
        if window is not None and L > window:
            P[..., : L - window] = float("-inf")  # distances >= window
        by_key = P.as_strided((H, B, C, L), (B * C * Lp, C * Lp, Lp - 1, 1), P.storage_offset() + C - 1)
        keys, values = k[:, :, lo:hi], v[:, :, lo:hi]  # B x H x L x Dh
        if kp is not None:
            keys, values = torch.cat([kp, keys], dim=2), torch.cat([vp, values], dim=2)  # B x H x (N + L) x Dh
        scores = qc[:, :, t0:t1] @ keys.transpose(-1, -2)  # B x H x C x (N + L)
        scores[..., scores.size(-1) - L :] += by_key.transpose(0, 1)
        del P, by_key
        weights = torch.softmax(scores, dim=-1)
        return weights, lo, hi, (keys, values, qp_c, rows, Lp)

    @staticmethod
    def backward(ctx, grad_out, _grad_received):
        qc, qp, k, v, R, colbias, kp, vp, out = ctx.saved_tensors
        B, H, T, Dh = qc.shape
        G = R.size(0)
        dqc, dqp = torch.zeros_like(qc), torch.zeros_like(qp)
        dk, dv, dR = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(R)
        dc = None if colbias is None else torch.zeros_like(colbias)
        dkp = None if kp is None else torch.zeros_like(kp)
        dvp = None if vp is None else torch.zeros_like(vp)
        N = 0 if kp is None else kp.size(2)
        with torch.random.fork_rng(devices=forked_devices(qc.device), enabled=ctx.rng is not None):
            if ctx.rng is not None:  # the forward's dropout masks, drawn again in the same order
                set_rng_state(qc.device, ctx.rng)
            DistanceBiasAttention.backward_chunks(ctx, grad_out, dqc, dqp, dk, dv, dR, dc, dkp, dvp, N, G)
        return dqc, dqp, dk, dv, dR, dc, dkp, dvp, None, None, None, None, None

    @staticmethod
    def backward_chunks(ctx, grad_out, dqc, dqp, dk, dv, dR, dc, dkp, dvp, N: int, G: int):
        """Accumulate the gradients chunk by chunk (module docstring); with dropout, dO V^T is taken through
        the same masks as the forward's."""
        qc, qp, k, v, R, colbias, kp, vp, out = ctx.saved_tensors
        B, H, T, Dh = qc.shape
        for t0, t1 in chunk_bounds(T, ctx.chunk):
            weights, lo, hi, (keys, values, qp_c, rows, Lp) = DistanceBiasAttention.chunk_weights(
                qc, qp, k, v, R, colbias, kp, vp, ctx.top, ctx.window, t0, t1
            )  # fmt: skip
            C, L = t1 - t0, hi - lo
            g = grad_out[:, :, t0:t1]  # B x H x C x Dh
            scale = None if ctx.dropout == 0 else dropout_scale(weights, ctx.dropout)  # B x H x C x (N + L)
            kept = weights if scale is None else weights * scale
            d_values = kept.transpose(-1, -2) @ g  # B x H x (N + L) x Dh
            del kept
            delta = (g * out[:, :, t0:t1]).sum(dim=-1, keepdim=True)  # B x H x C x 1: rowsum(dW * W)
            d_weights = g @ values.transpose(-1, -2)  # B x H x C x (N + L)
            if scale is not None:
                d_weights.mul_(scale)
            dA = d_weights.sub_(delta).mul_(weights)  # in place: d_weights is dA
            del weights, scale, d_weights  # at most two C x L tensors alive (dA, then dP)
            dqc[:, :, t0:t1] = dA @ keys
            d_keys = dA.transpose(-1, -2) @ qc[:, :, t0:t1]  # B x H x (N + L) x Dh
            dk[:, :, lo:hi] += d_keys[:, :, N:]
            dv[:, :, lo:hi] += d_values[:, :, N:]
            if kp is not None:
                dkp += d_keys[:, :, :N]
                dvp += d_values[:, :, :N]
            dP = dA.new_zeros(H, B, C, Lp)  # the view's inverse, zero where the view does not read
            dP.as_strided((H, B, C, L), (B * C * Lp, C * Lp, Lp - 1, 1), C - 1).copy_(dA[..., N:].transpose(0, 1))
            del dA
            dP = dP.view(G, -1, Lp)  # G x X x Lp
            dqp[:, :, t0:t1] = torch.bmm(dP, R[:, rows]).view(H, B, C, Dh).transpose(0, 1)
            dR[:, rows] += torch.bmm(dP.transpose(1, 2), qp_c)  # G x Lp x Dh
            if dc is not None:
                column_sums = dP.view(H, B * C, Lp).sum(dim=1)  # H x Lp
                dc[:, rows] += column_sums.sum(dim=0, keepdim=True) if dc.size(0) == 1 else column_sums


def key_blocks(lo: int, hi: int, block: int) -> List[Tuple[int, int]]:
    """[(j0, j1)] covering keys lo .. hi-1 in blocks of ``block``, aligned on ``hi`` and listed from it backwards:
    the first block holds the diagonal (every query's own key when ``block`` >= C), the last may be shorter."""
    return [(max(lo, j1 - block), j1) for j1 in range(hi, lo, -block)]


class Workspace:
    """Scratch tensors reused by every (query chunk, key block): a float32 C x Kb score block of 4 heads is
    1 MiB, which glibc maps and unmaps at each allocation when its mmap threshold is low (the benchmark
    suite's ``MALLOC_MMAP_THRESHOLD_``), paying a page fault per 4 KiB; allocated once per call instead."""

    def __init__(self, like: Tensor, sizes: List[int]):
        self.buffers = [like.new_empty(n) for n in sizes]

    def view(self, index: int, *shape: int) -> Tensor:
        return self.buffers[index][: math.prod(shape)].view(shape)


def block_scores(qc_c, qp_c, keys, R, colbias, top: int, window: Optional[int], hi: int, j0: int, j1: int,
                 scores_out: Tensor, P_out: Tensor):  # fmt: skip
    """Scores of a chunk's C queries (the last at key position hi - 1) over the keys j0 .. j1-1: B x H x C x Lb
    (-inf where masked), the rows of R used (the Lp = Lb + C - 1 distances hi-1-j0 down to hi-C-j1+1) and Lp.
    qc_c: B x H x C x Dh; qp_c: G x (H/G * B * C) x Dh; keys: B x H x Lb x Dh; ``scores_out`` (B*H*C*Lb
    elements at least) and ``P_out`` (H*B*C*Lp) receive the scores and the position scores. Column m of the
    position scores P (C x Lp) is distance hi-1-j0-m; query c, key j0 + i reads column C-1-c+i (the strided
    view), as in ``DistanceBiasAttention.chunk_weights``."""
    B, H, C, Dh = qc_c.shape
    G = R.size(0)
    Lb = j1 - j0
    Lp = Lb + C - 1
    dmax = hi - 1 - j0  # the longest distance in the block: last query, first key
    rows = slice(top - dmax, top - dmax + Lp)  # rows of R for distances dmax .. dmax - Lp + 1
    P = torch.bmm(qp_c, R[:, rows].transpose(1, 2), out=P_out.view(G, -1, Lp)).view(H, B, C, Lp)
    if colbias is not None:
        P += colbias[:, rows][:, None, None, :]  # H (or 1) x Lp, by distance
    if hi - j0 < Lp:
        P[..., hi - j0 :] = float("-inf")  # negative distances (the diagonal block only)
    if window is not None and dmax - window + 1 > 0:
        P[..., : dmax - window + 1] = float("-inf")  # distances >= window
    by_key = P.as_strided((H, B, C, Lb), (B * C * Lp, C * Lp, Lp - 1, 1), P.storage_offset() + C - 1)
    scores = torch.bmm(qc_c.view(B * H, C, Dh), keys.view(B * H, Lb, Dh).transpose(1, 2), out=scores_out)
    scores = scores.view(B, H, C, Lb)
    scores += by_key.transpose(0, 1)
    return scores, rows, Lp


class KeyBlockAttention(torch.autograd.Function):
    """The same function as ``DistanceBiasAttention`` with the keys in blocks as well (flash-style, online
    softmax); see the module docstring. No dropout (that stays with ``DistanceBiasAttention``)."""

    @staticmethod
    def forward(ctx, qc, qp, k, v, R, colbias, kp, vp, top: int, window: Optional[int], chunk: int, usage: bool,
                block: int):  # fmt: skip
        """As ``DistanceBiasAttention.forward`` (without dropout), keys in blocks of ``block`` (>= ``chunk``):
        the output B x H x T x Dh and, if ``usage``, the attention each key received (B x S) else an empty
        tensor. Saves the inputs, the output and the row log-sum-exp (B x H x T)."""
        qc, qp, k, v, R = (t.contiguous() for t in (qc, qp, k, v, R))  # B x H merged in views below
        B, H, T, Dh = qc.shape
        S = k.size(2)
        G = R.size(0)
        C = min(chunk, T)
        received = qc.new_zeros(B, S) if usage else qc.new_zeros(0)
        out = torch.empty_like(qc)
        lse = qc.new_empty(B, H, T)
        work = Workspace(qc, [B * H * C * block, H * B * C * (block + C - 1), H * B * C * Dh, B * H * C * Dh])
        for t0, t1 in chunk_bounds(T, chunk):
            lo, hi = key_range(S, T, t0, t1, window)
            C = t1 - t0
            qc_c = qc[:, :, t0:t1]  # B x H x C x Dh
            qp_c = work.view(2, H, B, C, Dh).copy_(qp[:, :, t0:t1].transpose(0, 1)).view(G, -1, Dh)  # G x X x Dh
            acc = work.view(3, B * H, C, Dh)  # exp(scores - m) V
            m = total = None  # running row max, row sum of exp(scores - m): B x H x C x 1
            if kp is not None:  # the slots: content only, never masked
                scores = qc_c @ kp.transpose(-1, -2)  # B x H x C x N
                m = scores.amax(dim=-1, keepdim=True)
                weights = scores.sub_(m).exp_()
                total = weights.sum(dim=-1, keepdim=True)
                torch.bmm(weights.view(B * H, C, -1), vp.reshape(B * H, -1, Dh), out=acc)
            for j0, j1 in key_blocks(lo, hi, block):
                Lb = j1 - j0
                scores_out, P_out = work.view(0, B * H, C, Lb), work.view(1, H * B * C * (Lb + C - 1))
                scores, _, _ = block_scores(qc_c, qp_c, k[:, :, j0:j1], R, colbias, top, window, hi, j0, j1,
                                            scores_out, P_out)  # fmt: skip
                m_block = scores.amax(dim=-1, keepdim=True)  # finite: the first block holds every row's own key
                if m is None:
                    m = m_block
                else:
                    m_new = torch.maximum(m, m_block)
                    rescale = (m - m_new).exp_()
                    total.mul_(rescale)
                    acc.view(B, H, C, Dh).mul_(rescale)
                    m = m_new
                weights = scores.sub_(m).exp_()  # B x H x C x Lb
                values = v[:, :, j0:j1].view(B * H, Lb, Dh)
                if total is None:
                    total = weights.sum(dim=-1, keepdim=True)
                    torch.bmm(weights.view(B * H, C, Lb), values, out=acc)
                else:
                    total += weights.sum(dim=-1, keepdim=True)
                    acc.baddbmm_(weights.view(B * H, C, Lb), values)
            torch.div(acc.view(B, H, C, Dh), total, out=out[:, :, t0:t1])
            lse_c = m.add_(total.log_())  # B x H x C x 1
            lse[:, :, t0:t1] = lse_c.squeeze(-1)
            if usage:  # a second pass with the final weights exp(scores - lse)
                for j0, j1 in key_blocks(lo, hi, block):
                    Lb = j1 - j0
                    scores_out, P_out = work.view(0, B * H, C, Lb), work.view(1, H * B * C * (Lb + C - 1))
                    scores, _, _ = block_scores(qc_c, qp_c, k[:, :, j0:j1], R, colbias, top, window, hi, j0, j1,
                                                scores_out, P_out)  # fmt: skip
                    received[:, j0:j1] += scores.sub_(lse_c).exp_().mean(dim=1).sum(dim=1)  # B x Lb
        ctx.save_for_backward(qc, qp, k, v, R, colbias, kp, vp, out, lse)
        ctx.top, ctx.window, ctx.chunk, ctx.block = top, window, chunk, block
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad_out, _grad_received):
        """Per (query chunk, key block), from W = exp(scores - lse): dV += W^T dO, dA = W * (dO V^T - rowsum(dO * O)),
        dqc += dA K, dK += dA^T qc, dP = unshift(dA), dqp += dP R, dR += dP^T qp, dc += colsum(dP)."""
        qc, qp, k, v, R, colbias, kp, vp, out, lse = ctx.saved_tensors
        B, H, T, Dh = qc.shape
        S = k.size(2)
        G = R.size(0)
        top, window, block = ctx.top, ctx.window, ctx.block
        C = min(ctx.chunk, T)
        grad_out = grad_out.contiguous()
        dqc, dqp = torch.empty_like(qc), torch.empty_like(qp)
        dk, dv, dR = torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(R)
        dc = None if colbias is None else torch.zeros_like(colbias)
        dkp = None if kp is None else torch.zeros_like(kp)
        dvp = None if vp is None else torch.zeros_like(vp)
        BHC, HBCp = B * H * C * block, H * B * C * (block + C - 1)
        work = Workspace(qc, [BHC, HBCp, BHC, H * B * C * Dh, H * B * C * Dh, B * H * C * Dh])
        for t0, t1 in chunk_bounds(T, ctx.chunk):
            lo, hi = key_range(S, T, t0, t1, window)
            C = t1 - t0
            qc_c = qc[:, :, t0:t1]  # B x H x C x Dh
            qc3 = qc_c.view(B * H, C, Dh)
            qp_c = work.view(3, H, B, C, Dh).copy_(qp[:, :, t0:t1].transpose(0, 1)).view(G, -1, Dh)  # G x X x Dh
            g = grad_out[:, :, t0:t1]  # B x H x C x Dh
            g3 = g.view(B * H, C, Dh)
            delta = (g * out[:, :, t0:t1]).sum(dim=-1, keepdim=True)  # B x H x C x 1: rowsum(dW * W)
            lse_c = lse[:, :, t0:t1, None]  # B x H x C x 1
            dq_c = work.view(5, B * H, C, Dh).zero_()
            dqp_c = work.view(4, G, qp_c.size(1), Dh).zero_()
            if kp is not None:
                weights = (qc_c @ kp.transpose(-1, -2)).sub_(lse_c).exp_()  # B x H x C x N
                dvp += weights.transpose(-1, -2) @ g
                dA = (g @ vp.transpose(-1, -2)).sub_(delta).mul_(weights)
                dq_c += (dA @ kp).view(B * H, C, Dh)
                dkp += dA.transpose(-1, -2) @ qc_c
            for j0, j1 in key_blocks(lo, hi, block):
                Lb = j1 - j0
                keys, values = k[:, :, j0:j1], v[:, :, j0:j1]  # B x H x Lb x Dh
                scores_out, P_out = work.view(0, B * H, C, Lb), work.view(1, H * B * C * (Lb + C - 1))
                scores, rows, Lp = block_scores(qc_c, qp_c, keys, R, colbias, top, window, hi, j0, j1,
                                                scores_out, P_out)  # fmt: skip
                weights = scores.sub_(lse_c).exp_().view(B * H, C, Lb)
                dv[:, :, j0:j1].view(B * H, Lb, Dh).baddbmm_(weights.transpose(1, 2), g3)
                dA = torch.bmm(g3, values.view(B * H, Lb, Dh).transpose(1, 2), out=work.view(2, B * H, C, Lb))
                dA = dA.view(B, H, C, Lb).sub_(delta).mul_(weights.view(B, H, C, Lb)).view(B * H, C, Lb)
                dq_c.baddbmm_(dA, keys.view(B * H, Lb, Dh))
                dk[:, :, j0:j1].view(B * H, Lb, Dh).baddbmm_(dA.transpose(1, 2), qc3)
                dP = P_out.view(H, B, C, Lp).zero_()  # the view's inverse, zero where the view does not read
                dP.as_strided((H, B, C, Lb), (B * C * Lp, C * Lp, Lp - 1, 1), dP.storage_offset() + C - 1).copy_(
                    dA.view(B, H, C, Lb).transpose(0, 1)
                )
                dP = dP.view(G, -1, Lp)  # G x X x Lp
                dqp_c.baddbmm_(dP, R[:, rows])
                dR[:, rows].baddbmm_(dP.transpose(1, 2), qp_c)  # G x Lp x Dh
                if dc is not None:
                    column_sums = dP.view(H, B * C, Lp).sum(dim=1)  # H x Lp
                    dc[:, rows] += column_sums.sum(dim=0, keepdim=True) if dc.size(0) == 1 else column_sums
            dqc[:, :, t0:t1] = dq_c.view(B, H, C, Dh)
            dqp[:, :, t0:t1] = dqp_c.view(H, B, C, Dh).transpose(0, 1)
        return dqc, dqp, dk, dv, dR, dc, dkp, dvp, None, None, None, None, None


def dropout_scale(weights: Tensor, p: float) -> Tensor:
    """The dropout mask of ``weights``, as factors: 0 (probability p) or 1 / (1 - p); drawn from the
    default generator of the weights' device (``F.dropout``'s arithmetic)."""
    return torch.empty_like(weights).bernoulli_(1 - p).div_(1 - p)


def forked_devices(device: torch.device) -> list:
    """The accelerator devices whose RNG ``fork_rng`` must save around the redraw (none on CPU)."""
    return [device] if device.type == "cuda" else []


def rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def distance_bias_attention(
    qc: Tensor, qp: Tensor, k: Tensor, v: Tensor, R: Tensor, top: int, chunk: int, window: Optional[int] = None,
    colbias: Optional[Tensor] = None, kp: Optional[Tensor] = None, vp: Optional[Tensor] = None,
    usage: bool = False, dropout: float = 0.0,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """softmax_j(qc_i . k_j + qp_i . R_(a_i - j) + c_(a_i - j)) v_j over [slots; keys] with the causal mask
    (and ``window``), query i at key position S - T + i, in chunks of ``chunk`` queries: B x H x T x Dh, and
    with ``usage`` the attention each of the S keys received (B x S, no gradient), else None. R: G x E x Dh
    with row e = distance ``top`` - e, covering distances from the longest a chunk sees down to -(chunk - 1)
    (``position_rows``). At most ``QUERY_BLOCK`` queries per chunk."""
    tensors = (qc, qp, k, v, R, colbias, kp, vp)
    if dropout == 0 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return distance_bias_inference(qc, qp, k, v, R, top, chunk, window, colbias, kp, vp, usage)
    chunk = min(chunk, QUERY_BLOCK)
    if dropout == 0 and KEY_BLOCK > 0:
        block = max(KEY_BLOCK, chunk)
        out, received = KeyBlockAttention.apply(qc, qp, k, v, R, colbias, kp, vp, top, window, chunk, usage, block)
    else:
        out, received = DistanceBiasAttention.apply(
            qc, qp, k, v, R, colbias, kp, vp, top, window, chunk, usage, dropout
        )
    return out, (received if usage else None)


# Queries per chunk where no gradient is needed (evaluation, generation): a chunk of C queries over a window of
# W keys multiplies W + C - 1 keys, of which C - 1 are masked for every query, and its C x L scores should stay in
# cache. One call, B 1, H 4, Dh 32, CPU, 1 thread (2026-12-05, loaded machine, ms, chunks of 32 / 64 / 128; the
# training path's forward in chunks of 128): T 128 window 800: 1.30 / 1.19 / 1.23 (1.45); window 256: 0.54 / 0.47
# / 0.50 (0.59); T 256 window 800: 2.60 / 2.57 / 4.4 (3.5); T 128, S 928, no window: 1.42 / 1.24 / 1.23 (1.33).
INFERENCE_QUERY_BLOCK = 64


def distance_bias_inference(
    qc: Tensor, qp: Tensor, k: Tensor, v: Tensor, R: Tensor, top: int, chunk: int, window: Optional[int] = None,
    colbias: Optional[Tensor] = None, kp: Optional[Tensor] = None, vp: Optional[Tensor] = None, usage: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """``distance_bias_attention`` where no gradient is needed and there is no dropout: the same function as
    ``DistanceBiasAttention.forward`` (same arguments and results), without the autograd record (nothing saved
    for backward), in chunks of at most ``INFERENCE_QUERY_BLOCK`` queries, and with the position scores of a
    chunk multiplied only for the distances its queries see: of the C x (L + C - 1) matrix P, the columns of
    distances min(L, window) - 1 .. 0; the others (negative distances, distances >= window) are filled with
    -inf without a product. The training paths (``KeyBlockAttention``, ``DistanceBiasAttention``) are separate."""
    B, H, T, Dh = qc.shape
    S = k.size(2)
    chunk = min(chunk, INFERENCE_QUERY_BLOCK)
    received = qc.new_zeros(B, S) if usage else None
    outs = []
    for t0, t1 in chunk_bounds(T, chunk):
        lo, hi = key_range(S, T, t0, t1, window)
        C, L = t1 - t0, hi - lo
        Lp = L + C - 1  # column m = distance L-1-m, as in chunk_weights
        first = L - min(L, window) if window is not None else 0  # column of the longest distance seen
        P = qc.new_empty(B, H, C, Lp)
        P[..., :first] = float("-inf")  # distances >= window
        P[..., L:] = float("-inf")  # negative distances: keys after the query
        rows = slice(top - (L - 1 - first), top + 1)  # rows of R for distances L-1-first .. 0
        position = qp[:, :, t0:t1] @ R[:, rows].transpose(1, 2)  # B x H x C x (L - first) (R: G x . x Dh)
        if colbias is not None:
            position += colbias[:, rows][:, None, :]  # H (or 1) x 1 x (L - first), by distance
        P[..., first:L] = position
        del position
        by_key = P.as_strided((B, H, C, L), (H * C * Lp, C * Lp, Lp - 1, 1), P.storage_offset() + C - 1)
        keys, values = k[:, :, lo:hi], v[:, :, lo:hi]  # B x H x L x Dh
        if kp is not None:
            keys, values = torch.cat([kp, keys], dim=2), torch.cat([vp, values], dim=2)  # B x H x (N + L) x Dh
        scores = qc[:, :, t0:t1] @ keys.transpose(-1, -2)  # B x H x C x (N + L)
        scores[..., scores.size(-1) - L :] += by_key
        del P, by_key
        weights = torch.softmax(scores, dim=-1)
        outs.append(weights @ values)  # B x H x C x Dh
        if usage:
            received[:, lo:hi] += weights[..., weights.size(-1) - L :].mean(dim=1).sum(dim=1)  # B x L
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), received


# Below this many score elements per sequence (H x T x S) the former route (one pass through SDPA with the
# gathered bias) measured faster on CPU: this route took 1.14x / 1.02x its time at H x T x S = 16k / 64k (B 16,
# T 64 / 128, D 128: the PTB studies' training segments), 0.65x / 0.74x / 0.26x at 262k / 1M / 4M (2026-12-05,
# `python -m recipes.benchmarks.run --quick --only mechanisms --mechanism-cases relative_routes`). Both routes
# compute the same function.
MIN_SCORE_ELEMENTS = 2**17


def route_chunk(num_heads: int, num_queries: int, num_keys: int, slots: int, budget: int, dropout: float) -> int:
    """Queries per chunk for ``distance_bias_attention`` over ``num_keys`` keys and ``slots`` persistent slots
    under ``--score-chunk-elements`` = ``budget``. With key blocks (no dropout) a score tensor is H x C x Kb,
    so C is sized for min(S, ``KEY_BLOCK``) + N keys and reaches ``QUERY_BLOCK`` at every length with the default
    budget; without them (dropout) for all S + N keys, as ``chunking.query_chunk_size`` does."""
    keys = min(num_keys, KEY_BLOCK) if dropout == 0 and KEY_BLOCK > 0 else num_keys
    return min(num_queries, QUERY_BLOCK, query_chunk_size(num_heads, num_queries, keys + slots, budget))


def distance_bias_applies(q: Tensor, num_keys: int, chunk: int) -> bool:
    """Whether ``distance_bias_attention`` computes the call: float32/float64 outside autocast (the backward
    runs in the inputs' dtype; the former route's float32 bias under a bf16 autocast is kept there), and
    either the queries come in chunks (``chunk`` < T) or the H x T x S scores of one sequence reach
    ``MIN_SCORE_ELEMENTS`` (below it the former route is faster)."""
    H, T = q.size(1), q.size(2)
    large = chunk < T or H * T * num_keys >= MIN_SCORE_ELEMENTS
    return large and q.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(q.device.type)


def position_rows(S: int, T: int, chunk: int) -> Tuple[int, int]:
    """(top, E): the rows of a position table for ``distance_bias_attention`` over S keys and T queries in
    chunks of ``chunk``: distances top = S - 1 down to -(C - 1), E = S + C - 1 rows (C = min(chunk, T))."""
    C = min(chunk, T, QUERY_BLOCK)
    return S - 1, S + C - 1

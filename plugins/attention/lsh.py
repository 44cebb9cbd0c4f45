"""LSH attention with shared queries and keys (Kitaev et al. 2020, "Reformer", Sec. 2 and Appendix A).

Shared-QK: one projection gives the queries, and the keys are the unit-normalized queries,
k_j = q_j / ||q_j|| (Sec. 2, "Shared-QK Transformer"); the values have their own projection.

Angular LSH by random rotations (Sec. 2, "Locality sensitive hashing", after Andoni et al. 2015): for
n_b buckets draw a random matrix R (Dh x n_b/2) per head and hashing round, and hash

    h(x) = argmax([x R ; -x R])

so that nearby vectors land in the same bucket with high probability. Per round r (``--lsh-n-hashes``
rounds with independent rotations), positions are sorted by (bucket, position) and the sorted sequence
is cut into chunks of m = ``--lsh-chunk-size`` positions; each query attends to the keys of its own
chunk and of the previous chunk (Eq. 5's P~_i) that are

    in the same bucket (Eq. 3's mask m(j, P_i)),  at a position <= its own (causal, by original position),

and never to itself unless nothing else is available (self-attention scores are replaced by -5e4: a
shared-QK query is always most similar to itself). The rounds are combined with their log-sum-exp
weights, correcting for keys found in several rounds (Appendix A, Eqs. 6-9):

    s_ij^(r) = q_i . k_j / sqrt(Dh) - log N_ij,   N_ij = #rounds in which j is compared with i,
    o_i = sum_r exp(z_i^(r) - logsumexp_r' z_i^(r')) o_i^(r),   z_i^(r) = logsumexp_j s_ij^(r),

where "compared" means in i's bucket AND in i's chunk or the previous one after that round's sort (trax's
``dup_counts``; sharing a bucket is not enough when a bucket spans more than two chunks). Then o_i is
exactly one softmax over the union of the pairs the rounds compared, each counted once (tested against
an enumeration of those pairs); if every same-bucket key falls into the query's two chunks, that union is
the union of its buckets. Sizes: n_b = ceil(S / ``--lsh-bucket-size``) buckets (rounded up to even;
the bucket size is the *average* bucket size), and a sequence no longer than one chunk gets a single
bucket and chunk: exact causal shared-QK attention. Longer sequences are padded to whole chunks (the
padding is masked as a future position).

Rotations are drawn from torch's global RNG in training (a new hash every step, as in the official
code; ``--reversible`` replays them by restoring the RNG state) and from a fixed-seed generator in
evaluation, so evaluation is deterministic. Causality: no query ever attends a later position, but
in the chunked regime (S > chunk) *which* earlier keys share a query's chunks depends on where later
tokens hash (they move the chunk boundaries). Outputs have zero gradient w.r.t. later tokens, but
they are not invariant to them; for S <= chunk they are.

Implementation (CPU time is dominated by fresh score-sized tensors, each a new mapping whose pages fault
on first touch): the sorted rows of all rounds form one flat table, so a chunk's keys and values (its own
and the previous chunk) are a strided window of it, never copied; the scores are computed, masked and
turned into softmax weights in place by one autograd function (``LSHScoresSoftmax``) that keeps only the
weights, and the windowed products write their gradients straight onto the table's rows
(``window_rows_grad``). Same function as the plain masked-tensor form (tested against it).

Generation: the layer keeps its inputs (``HiddenMemory``) and recomputes LSH attention over the whole
prefix at every step, so a step's output equals a parallel pass over the same prefix. No segment
memory (``--mem-len``): ``supports_memory = False``.

Shape legend: B = batch, H = heads, R = hashing rounds, S = positions (past + new when generating),
T = new positions, Dh = head dim, K = chunks per round, C = chunk size, P = K * C (padded length),
n_b = buckets.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..memory import HiddenMemory
from .base import Attention, AttentionConfig, register_attention

SELF_SCORE = -5e4  # self-attention score: ~0 weight unless alone (finite, and representable in fp16)
EVAL_HASH_SEED = 0  # evaluation hashes with fixed rotations: deterministic scores


@dataclass
class LSHAttentionConfig(AttentionConfig):
    lsh_n_hashes: int = field(
        default=2, metadata={"help": "LSH hashing rounds (Reformer Sec. 2; 2 in the official enwik8 config)"}
    )
    lsh_bucket_size: int = field(
        default=64,
        metadata={"help": "average LSH bucket size: a sequence of S positions is hashed into S / size buckets "
                  "(rounded up to even)"},
    )  # fmt: skip
    lsh_chunk_size: int = field(
        default=0,
        metadata={"help": "chunk length m of the sorted sequence; a query attends its chunk and the previous "
                  "one (0: the bucket size, as in reformer-pytorch; the official enwik8 config uses 2x)"},
    )  # fmt: skip


def even_buckets(length: int, bucket_size: int) -> int:
    """n_b = ceil(length / bucket_size), rounded up to even (the hash is an argmax over [xR; -xR])."""
    n = math.ceil(length / bucket_size)
    return 1 if n <= 1 else n + n % 2


def look_one_back(x: Tensor, fill) -> Tensor:
    """... x K x C x F -> ... x K x 2C x F: each chunk preceded by the previous one (``fill`` before the first)."""
    prev = torch.cat([torch.full_like(x[..., :1, :, :], fill), x[..., :-1, :, :]], dim=-3)
    return torch.cat([prev, x], dim=-2)


@register_attention("lsh", LSHAttentionConfig)
class LSHAttention(Attention):
    supports_memory = False  # hashing needs the whole sequence; a segment memory has no place in the sort
    attends_to_self = False  # shared-QK: self-attention is masked unless nothing else is available

    def __init__(self, embed_dim, num_heads, dropout, cfg: LSHAttentionConfig, pos_emb: str = "none"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        # Shared-QK: q_proj gives queries and (normalized) keys; the values get their own projection.
        del self.kv_proj
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.n_hashes = cfg.lsh_n_hashes
        self.bucket_size = cfg.lsh_bucket_size
        self.chunk_size = cfg.lsh_chunk_size or cfg.lsh_bucket_size
        if min(self.n_hashes, self.bucket_size, self.chunk_size) < 1:
            raise UserError("--lsh-n-hashes, --lsh-bucket-size and --lsh-chunk-size must be positive")

    @classmethod
    def check_config(cls, cfg) -> None:
        n_hashes, bucket, chunk = cfg.lsh_n_hashes, cfg.lsh_bucket_size, cfg.lsh_chunk_size or cfg.lsh_bucket_size
        if min(n_hashes, bucket) < 1 or chunk < 0:
            raise UserError("--lsh-n-hashes and --lsh-bucket-size must be positive, --lsh-chunk-size >= 0")
        if chunk % bucket != 0:
            raise UserError(
                f"--lsh-bucket-size {bucket} must divide --lsh-chunk-size {chunk}: a chunk holds whole average "
                "buckets (e.g. bucket 64, chunk 128)"
            )
        T = getattr(cfg, "tokens_per_sample", None)  # an unresolved "${task...}" link outside fairseq
        if isinstance(T, int) and T > chunk and T % chunk != 0:
            raise UserError(
                f"--lsh-chunk-size {chunk} must divide --tokens-per-sample {T} (training segments are cut into "
                "whole chunks); choose a multiple, or a chunk size >= the segment for exact attention"
            )

    # ---- hashing --------------------------------------------------------------------------------
    def rotations(self, n_buckets: int, like: Tensor) -> Tensor:
        """H x R x Dh x n_b/2 random rotations: global RNG in training, a fixed generator in evaluation."""
        shape = (self.num_heads, self.n_hashes, self.head_dim, n_buckets // 2)
        if self.training:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        generator = torch.Generator(device=like.device).manual_seed(EVAL_HASH_SEED)
        return torch.randn(shape, device=like.device, generator=generator).to(like.dtype)

    def hash(self, qk: Tensor, n_buckets: int) -> Tensor:
        """B x H x S x Dh -> B x H x R x S bucket ids in [0, n_b)."""
        rotated = torch.einsum("bhsd,hrdn->bhrsn", qk, self.rotations(n_buckets, qk))  # B x H x R x S x n_b/2
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)

    # ---- attention ------------------------------------------------------------------------------
    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        ctx = x if mem is None else torch.cat([mem.hidden, x], dim=1)  # B x S x D (generation: the raw prefix)
        ctx = self.normalized(ctx, norm)
        qk = self.split_heads(self.q_proj(ctx))  # B x H x S x Dh
        v = self.split_heads(self.v_proj(ctx))  # B x H x S x Dh
        out = self.lsh_attend(qk, v)[:, :, -x.size(1) :]  # B x H x T x Dh
        return self.out_proj(self.merge_heads(out)), HiddenMemory.extend(mem, x, keep)

    def lsh_attend(self, qk: Tensor, v: Tensor) -> Tensor:
        """Causal multi-round LSH attention of S shared-QK vectors over themselves: B x H x S x Dh."""
        B, H, S, _ = qk.shape
        C = self.chunk_size
        n_buckets = 1 if S <= C else even_buckets(S, self.bucket_size)
        if n_buckets == 1:  # one bucket: every round is the same, hash once
            R, buckets = 1, torch.zeros(B, H, 1, S, dtype=torch.long, device=qk.device)
        else:
            R, buckets = self.n_hashes, self.hash(qk, n_buckets)  # B x H x R x S
        K = math.ceil(S / C)
        P = K * C

        # Sort every round by (bucket, position); pad to whole chunks with position S (a "future"
        # position: masked for every real query), which sorts after every real position.
        pos = torch.arange(S, device=qk.device)
        order = (buckets * S + pos).argsort(dim=-1)  # B x H x R x S: sorted slot -> position
        unsort = order.argsort(dim=-1)  # B x H x R x S: position -> sorted slot
        order = F.pad(order, (0, P - S), value=S)  # B x H x R x P
        buckets = F.pad(buckets, (0, 1), value=-1)  # B x H x R x (S+1): the padding position's bucket
        sorted_buckets = buckets.gather(-1, order)  # B x H x R x P

        # Sorted rows of all rounds in one flat sequence (B*H*R*P rows), preceded by one chunk of filler rows:
        # the keys and values of chunk g are then the window of rows [g C, g C + 2C), a strided view (no
        # copy). The previous chunk of a round's first chunk is another round's last one (or the filler):
        # its keys carry the fill position S and bucket -1 below, so they are masked as before. Padding
        # slots and filler rows read row 0 of the table: masked keys (weight exactly 0) and dropped queries.
        heads = torch.arange(B * H, device=qk.device).view(B, H, 1, 1) * S
        rows = (heads + order.clamp(max=S - 1)).masked_fill_(order == S, 0)  # B x H x R x P: row of (B H) x S
        rows = F.pad(rows.flatten(), (C, 0))  # C + B*H*R*P

        def sort(t: Tensor) -> Tensor:  # B x H x S x Dh -> (C + B*H*R*P) x Dh
            return t.flatten(0, 2).index_select(0, rows)

        q = sort(qk)[C:].view(B * H * R * K, C, -1)  # (B H R K) x C x Dh
        keys, values = sort(F.normalize(qk, dim=-1)), sort(v)  # (C + B H R P) x Dh
        q_pos = order.view(B, H, R, K, C, 1)
        k_pos = look_one_back(q_pos, S).transpose(-1, -2)  # B x H x R x K x 1 x 2C
        q_bucket = sorted_buckets.view(B, H, R, K, C, 1)
        k_bucket = look_one_back(q_bucket, -1).transpose(-1, -2)  # B x H x R x K x 1 x 2C
        shape = (B * H * R * K, C, 2 * C)
        is_self = (k_pos == q_pos).view(shape)
        masked = ((k_pos > q_pos) | (k_bucket != q_bucket)).view(shape)  # self stays: no empty row
        counts = self.compared_rounds(buckets, order, unsort, K, C).view(shape) if R > 1 else None

        # The scores are the largest tensor (R x S x 2C per head): computed, masked and turned into the
        # softmax weights in place in one function, which keeps only the weights for the backward pass.
        weights, lse = LSHScoresSoftmax.apply(q, keys, self.scale, is_self, counts, masked)  # (BHRK) x C x {2C, 1}
        weights = F.dropout(weights, self.dropout, self.training)
        out = WindowProduct.apply(weights, values)  # (B H R K) x C x Dh

        # Unsort: slot -> position in every round (the padding slots, the last P - S, are never picked).
        slots = (torch.arange(B * H * R, device=qk.device).view(B, H, R, 1) * P + unsort).flatten()
        out = out.view(B * H * R * P, -1).index_select(0, slots).view(B, H, R, S, -1)  # B x H x R x S x Dh
        if R == 1:
            return out[:, :, 0]
        lse = lse.view(-1).index_select(0, slots).view(B, H, R, S)  # B x H x R x S
        round_weights = lse.softmax(dim=2)  # Appendix A: rounds weighted by their log-sum-exp
        return (round_weights[..., None] * out).sum(dim=2)  # B x H x S x Dh

    @staticmethod
    def compared_rounds(buckets: Tensor, order: Tensor, unsort: Tensor, K: int, C: int) -> Tensor:
        """N_ij for every scored pair: in how many rounds key j is *compared with* query i, i.e. is in i's
        bucket and in i's chunk or the previous one after that round's sort (Appendix A; trax's
        ``dup_counts``). Sharing a bucket is not enough: a bucket longer than two chunks puts some of its
        pairs in no common window. buckets: B x H x R x (S+1), order: B x H x R x P (slot -> position),
        unsort: B x H x R x S (position -> slot) -> uint8 counts B x H x R x K x C x 2C."""
        B, H, R = buckets.shape[:3]
        S = buckets.size(-1) - 1
        # Per round and position, code = bucket * (K + 2) + chunk: j is compared with i in that round iff
        # code_i = code_j (same bucket, same chunk) or code_i = code_j + 1 (same bucket, previous chunk);
        # codes of different buckets differ by at least 2, so the two cases never overlap.
        chunk = unsort // C  # B x H x R x S: position -> its chunk in each round
        chunk = F.pad(chunk, (0, 1), value=K)  # the padding position S: bucket -1, chunk K (code -2)
        code = (buckets * (K + 2) + chunk).to(torch.int32)  # B x H x R x (S+1)
        q_pos = order.view(B, H, 1, R * K * C)  # the query positions of every round's slots
        k_pos = look_one_back(order.view(B, H, R, K, C, 1), S).view(B, H, 1, R * K * 2 * C)
        count = torch.zeros(B, H, R, K, C, 2 * C, dtype=torch.uint8, device=order.device)
        hits = torch.empty_like(count, dtype=torch.bool)  # reused: one score-sized boolean in all
        for r in range(R):
            q_code = code[:, :, r : r + 1].gather(-1, q_pos).view(B, H, R, K, C, 1)
            k_code = code[:, :, r : r + 1].gather(-1, k_pos).view(B, H, R, K, 1, 2 * C)
            for shift in (0, 1):  # the key in the query's chunk, or in the previous one
                count.add_(torch.eq(q_code, k_code + shift, out=hits).view(torch.uint8))  # view: no bool copy
        # >= 1 for every pair of the same bucket in the round that scores it (it is compared there); 0 only
        # for pairs the bucket mask removes anyway (the caller clamps them to 1: a finite log until then)
        return count


def windows(rows: Tensor, n: int) -> Tensor:
    """(C + n C) x F rows -> n x F x 2C: window g holds rows [g C, g C + 2C) as columns (a view, no copy)."""
    C = rows.size(0) // (n + 1)
    return rows.unfold(0, 2 * C, C)


def window_rows_grad(weights: Tensor, other: Tensor, alpha: float = 1.0) -> Tensor:
    """The gradient of the rows behind ``windows``: window g's products weights_g^T other_g (2C x F) summed
    back onto their rows, the first C onto chunk g - 1's rows and the last C onto chunk g's: (C + n C) x F.
    weights: n x C x 2C, other: n x C x F."""
    n, C, F_ = weights.size(0), weights.size(1), other.size(-1)
    grad = other.new_empty(C + n * C, F_)
    torch.baddbmm(grad[C:].view(n, C, F_), weights[:, :, C:].transpose(1, 2), other, beta=0, alpha=alpha,
                  out=grad[C:].view(n, C, F_))  # fmt: skip
    grad[:C].zero_()
    grad[:-C].view(n, C, F_).baddbmm_(weights[:, :, :C].transpose(1, 2), other, alpha=alpha)
    return grad


class WindowProduct(torch.autograd.Function):
    """out_g = weights_g @ values[g C : g C + 2C] for every chunk g: weights n x C x 2C, values (C + n C) x Dh
    -> n x C x Dh, without materializing the overlapping windows (forward or backward)."""

    @staticmethod
    def forward(ctx, weights: Tensor, values: Tensor):
        ctx.save_for_backward(weights, values)
        return torch.bmm(weights, windows(values, weights.size(0)).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weights, values = ctx.saved_tensors
        grad_weights = torch.bmm(grad_out, windows(values, weights.size(0)))  # n x C x 2C
        return grad_weights, window_rows_grad(weights, grad_out)


class LSHScoresSoftmax(torch.autograd.Function):
    """The chunked scores, their masks and the softmax in one step, keeping for backward only the softmax
    weights (not the scores) and the inputs of the product. Per chunk g (shapes n x C x Dh, n x Dh x 2C):

        s = scale q k^T,  s[is_self] = SELF_SCORE,  s -= log max(counts, 1),  s[masked] = -inf,
        w = softmax(s),  lse = logsumexp(s)   (the max subtracted in place, then exp, then the sum)

    d lse / d s = w, so  grad_s = w * (g_w - sum(g_w * w) + g_lse), zero where is_self (a filled score has
    no gradient) and, as w = 0 there, where masked; then grad_q = scale grad_s k, grad_k = scale grad_s^T q (on the
    rows behind the windows: ``window_rows_grad``)."""

    @staticmethod
    def forward(ctx, q: Tensor, keys: Tensor, scale: float, is_self: Tensor, counts, masked: Tensor):
        keys_t = windows(keys, q.size(0))  # n x Dh x 2C (a view of the (C + n C) x Dh rows)
        scores = torch.baddbmm(q.new_empty(()), q, keys_t, beta=0, alpha=scale)  # n x C x 2C
        scores.masked_fill_(is_self, SELF_SCORE)
        if counts is not None:
            scores.sub_(counts.to(scores.dtype).clamp_(min=1).log_())
        scores.masked_fill_(masked, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True)  # finite: the self score is never masked
        weights = scores.sub_(top).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        weights.div_(total)
        ctx.scale = scale
        ctx.save_for_backward(q, keys, is_self, weights)
        return weights, total.log_().add_(top)

    @staticmethod
    def backward(ctx, grad_weights: Tensor, grad_lse: Tensor):
        q, keys, is_self, weights = ctx.saved_tensors
        grad = grad_weights * weights  # n x C x 2C
        inner = grad.sum(dim=-1, keepdim=True).neg_()
        if grad_lse is not None:
            inner.add_(grad_lse)
        grad.addcmul_(weights, inner).masked_fill_(is_self, 0.0)
        keys_t = windows(keys, q.size(0))
        grad_q = torch.baddbmm(q.new_empty(()), grad, keys_t.transpose(1, 2), beta=0, alpha=ctx.scale)
        grad_k = window_rows_grad(grad, q, alpha=ctx.scale)
        return grad_q, grad_k, None, None, None, None

"""Sparse Transformer attention: the two factorized causal patterns of Child et al. 2019 (arXiv
1904.10509), Sec. 4.2-4.3, computed block-sparsely (work and memory grow with the attended pairs).

Shape legend (see ``base.py``): B = batch, H = heads, T = query positions, S = key positions,
Dh = head dim; and here L = stride (``--sparse-stride``), c = summary positions per stride block
(``--sparse-summary``), Bk = computation block (``--sparse-block``), N = T padded to a multiple of L,
R = N / L stride blocks ("rows"), nb = N / Bk computation blocks, W = key blocks of a query block's
local window.

The two factors of query i (causal: only keys j <= i; Sec. 4.3, "Strided" and "Fixed")::

    strided:  A1(i) = {j : max(0, i - L) <= j <= i}            A2(i) = {j : (i - j) mod L = 0}
    fixed:    A1(i) = {j : floor(j / L) = floor(i / L)}        A2(i) = {j : j mod L >= L - c} u {i}

``{i}`` is added to the fixed A2 so that the first positions of the sequence, which precede every
summary position, still attend to something (the paper leaves that softmax over nothing undefined).

Distinct summary blocks per head (fixed pattern, ``--sparse-summary-blocks v``; Sec. 4.3: "when using
multiple heads, having them attend to distinct subblocks of length c within the block of size l was
preferable"; OpenAI's ``num_verts`` in ``get_blocksparse_obj``): the stride block's last v c positions
are cut into v sub-blocks of c, numbered s = 0, 1, ... from the end, and the k-th head that attends A2
(k = 0, 1, ... in head order) uses sub-block s = k mod v::

    A2_k(i) = {j : L - (s + 1) c <= j mod L < L - s c} u {i},   s = k mod v

v = 1 (the default) is the A2 above for every head: the last c positions.

With L ~ sqrt(N) (strided) or c * N / L ~ L (fixed) every query attends O(sqrt(N)) keys.

How the factors are spread over heads and layers (Sec. 5.2, ``--sparse-heads``):

- ``merged``: every head attends the union A1 u A2 with one softmax (the paper's "merged head"; its
  enwik8 model, Sec. 7.3);
- ``split``: the first ceil(H/2) heads attend A1, the others A2 (multi-head factorization);
- ``interleave``: layer r attends A(r mod 2 + 1) with all its heads (Eq. 2: one factor per residual
  block, alternating with depth). The layer index comes from ``Attention.set_layer_index``.

Block-sparse computation (no T x S matrix). Every allowed pair (i, j) falls in exactly one of two key
groups, each gathered in blocks and scored densely, then one softmax runs over both groups:

- local group, j within the query's window (strided: i - L < j; fixed: j in i's stride block): query
  block b (Bk positions) scores the W key blocks ending at b (W = L/Bk + 1 strided, L/Bk fixed), as W
  matmuls on shifted views of the key blocks (no copies of K or V);
- far group, j before the window: strided: column c of the R x L grid of positions (i = r L + c sees
  (r', c), r' < r), i.e. causal attention along columns of the transposed layout (openai
  sparse_attention's ``strided_transpose``); fixed: the R * c summary keys, shared by every query.

Per query that is W Bk + R (strided) or L + R c (fixed) scores instead of N. Sequences that are not a
multiple of L are padded at the end; causality keeps the padding out of every real query's softmax.
Incremental decoding (one token over the cached past, ``keep=None``) gathers the query's own key set
from the cache. ``--sparse-checkpoint`` recomputes the block scores in the backward pass (the paper's
recomputation of attention, Sec. 5.4) instead of storing them.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..memory import HiddenMemory
from .base import Attention, AttentionConfig, register_attention

UNION, FACTOR1, FACTOR2 = 0, 1, 2  # the key set a head attends: A1 u A2, A1, A2
QUERY_CHUNK = 1024  # queries per chunk (rounded to whole stride blocks): bounds the scores alive at once


@dataclass
class SparseAttentionConfig(AttentionConfig):
    sparse_pattern: ChoiceEnum(["strided", "fixed"]) = field(
        default="fixed",
        metadata={"help": "factorized pattern (Child et al. 2019, Sec. 4.3): strided (previous L positions + every "
                  "L-th) or fixed (own stride block + the last --sparse-summary positions of each earlier block); "
                  "default fixed, the paper's choice for text"},
    )  # fmt: skip
    sparse_stride: int = field(
        default=32,
        metadata={"help": "stride L of the pattern; default 32 = sqrt(1024), the paper's L ~ sqrt(N) for fairseq's "
                  "default length (its enwik8 model uses 128 with 12,288 tokens)"},
    )  # fmt: skip
    sparse_block: int = field(
        default=0,
        metadata={"help": "block size of the block-sparse computation, a divisor of --sparse-stride (0: the stride); "
                  "smaller blocks waste fewer masked scores in the local window, larger ones run fewer matmuls"},
    )  # fmt: skip
    sparse_summary: int = field(
        default=8,
        metadata={"help": "fixed pattern: summary positions c at the end of every stride block (the paper uses "
                  "c in {8, 16, 32}; 32 on enwik8)"},
    )  # fmt: skip
    sparse_summary_blocks: int = field(
        default=1,
        metadata={"help": "fixed pattern: v distinct summary sub-blocks of --sparse-summary positions; the k-th head "
                  "that attends the summaries uses the (k mod v)-th block of c counted from the end of each stride "
                  "block (Child et al. 2019, Sec. 4.3; openai's num_verts); needs v * c <= --sparse-stride; "
                  "1: every head the last c positions"},
    )  # fmt: skip
    sparse_heads: ChoiceEnum(["merged", "split", "interleave"]) = field(
        default="merged",
        metadata={"help": "merged: every head attends the union of both factors; split: half the heads each factor; "
                  "interleave: the factors alternate across layers (Child et al. 2019, Sec. 5.2)"},
    )  # fmt: skip
    sparse_checkpoint: bool = field(
        default=False,
        metadata={"help": "recompute the sparse attention scores in the backward pass instead of storing them "
                  "(torch.utils.checkpoint; the paper's recomputation, Sec. 5.4)"},
    )  # fmt: skip


def pattern_mask(pattern: str, stride: int, summary: int, factor: Tensor, query_pos: Tensor, key_pos: Tensor,
                 sub_block=0):  # fmt: skip
    """True where query ``query_pos`` may attend key ``key_pos`` (broadcast against each other and against
    ``factor``: UNION, FACTOR1 or FACTOR2 per head, and ``sub_block``: the fixed pattern's summary sub-block
    s per head, 0 = the last ``summary`` positions of each stride block). The definition of the pattern;
    the block-sparse computation and the test reference both use it. Negative key positions (padding) are
    never allowed."""
    i, j = query_pos, key_pos
    if pattern == "strided":
        a1 = j >= i - stride
        a2 = torch.remainder(i - j, stride) == 0
    else:
        a1 = torch.div(j, stride, rounding_mode="floor") == torch.div(i, stride, rounding_mode="floor")
        from_end = stride - 1 - torch.remainder(j, stride)  # 0 for the last position of a stride block
        a2 = (torch.div(from_end, summary, rounding_mode="floor") == sub_block) | (j == i)
    allowed = torch.where(factor == FACTOR1, a1, torch.where(factor == FACTOR2, a2, a1 | a2))
    return allowed & (j <= i) & (j >= 0)


@register_attention("sparse", SparseAttentionConfig)
class SparseAttention(Attention):
    supports_memory = False  # the fixed pattern needs absolute positions, which a bounded memory loses

    def __init__(self, embed_dim, num_heads, dropout, cfg: SparseAttentionConfig, pos_emb: str = "none"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        self.pattern = str(cfg.sparse_pattern)
        self.stride = cfg.sparse_stride
        self.block = cfg.sparse_block or cfg.sparse_stride
        self.summary = cfg.sparse_summary
        self.summary_blocks = getattr(cfg, "sparse_summary_blocks", 1)  # absent from older saved configs
        self.heads_mode = str(cfg.sparse_heads)
        self.layer_index = 0
        self.query_chunk = QUERY_CHUNK
        if self.stride < 1 or self.stride % self.block != 0:
            raise UserError(f"--sparse-block {self.block} must divide --sparse-stride {self.stride}")

    @classmethod
    def check_config(cls, cfg) -> None:
        stride, block, summary = cfg.sparse_stride, cfg.sparse_block, cfg.sparse_summary
        if stride < 1:
            raise UserError(f"--sparse-stride must be positive, got {stride}")
        length = getattr(cfg, "tokens_per_sample", None)
        if isinstance(length, int) and stride > length:
            raise UserError(
                f"--sparse-stride {stride} is longer than the sequence (--tokens-per-sample {length}): the pattern "
                f"would be full attention; use a stride <= {length} (the paper uses about sqrt(length))"
            )
        if block < 0 or (block > 0 and stride % block != 0):
            raise UserError(f"--sparse-block {block} must divide --sparse-stride {stride} (or be 0: the stride)")
        if str(cfg.sparse_pattern) == "fixed" and not 1 <= summary <= stride:
            raise UserError(f"--sparse-summary {summary} must be between 1 and --sparse-stride {stride}")
        blocks = getattr(cfg, "sparse_summary_blocks", 1)  # absent from configs saved before the option
        if blocks != 1:
            if str(cfg.sparse_pattern) != "fixed" or blocks < 1:
                raise UserError(
                    f"--sparse-summary-blocks {blocks}: distinct summary blocks per head exist only in the fixed "
                    "pattern and must be >= 1; use --sparse-pattern fixed, or --sparse-summary-blocks 1"
                )
            if blocks * summary > stride:
                raise UserError(
                    f"--sparse-summary-blocks {blocks} x --sparse-summary {summary} = {blocks * summary} summary "
                    f"positions do not fit in a stride block of --sparse-stride {stride}: lower one of them"
                )
            heads = cfg.decoder_attention_heads
            summary_heads = heads // 2 if str(cfg.sparse_heads) == "split" else heads
            if blocks > summary_heads:
                raise UserError(
                    f"--sparse-summary-blocks {blocks} is more than the {summary_heads} heads that attend the "
                    f"summaries (--decoder-attention-heads {heads}, --sparse-heads {cfg.sparse_heads}): some "
                    "sub-blocks would be attended by no head; use at most that many"
                )
        if str(cfg.sparse_heads) == "split" and cfg.decoder_attention_heads < 2:
            raise UserError("--sparse-heads split gives each factor its own heads: it needs at least 2 heads")
        if str(cfg.sparse_heads) == "interleave" and getattr(cfg, "share_layers", False):
            raise UserError(
                "--sparse-heads interleave gives each layer one factor, but --share-layers runs one layer at every "
                "depth: use --sparse-heads merged or split"
            )

    def set_layer_index(self, index: int) -> None:
        self.layer_index = index

    def head_factors(self) -> List[int]:
        """The key set of every head (UNION, FACTOR1 or FACTOR2)."""
        H = self.num_heads
        if self.heads_mode == "split":
            return [FACTOR1] * ((H + 1) // 2) + [FACTOR2] * (H // 2)
        if self.heads_mode == "interleave":
            return [FACTOR1 + self.layer_index % 2] * H
        return [UNION] * H

    def head_summary_blocks(self) -> List[int]:
        """The fixed pattern's summary sub-block of every head: the k-th head that attends A2 uses k mod v
        (0 for heads that do not attend A2, where it is never used)."""
        blocks, k = [], 0
        for factor in self.head_factors():
            blocks.append(k % self.summary_blocks if factor != FACTOR1 else 0)
            k += factor != FACTOR1
        return blocks

    def _head_layout(self, device) -> Tuple[Tensor, Tensor]:
        """Factor and summary sub-block per head, H' x 1 x 1 each (H' = 1 when every head is the same)."""
        layout = list(zip(self.head_factors(), self.head_summary_blocks()))
        if len(set(layout)) == 1:
            layout = layout[:1]  # one mask for all heads
        factor, sub_block = torch.tensor(layout, device=device).view(-1, 1, 1, 2).unbind(-1)
        return factor, sub_block

    def mask(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """H (or 1) x T x S mask of the pattern for these absolute positions."""
        factor, sub_block = self._head_layout(query_pos.device)
        return pattern_mask(self.pattern, self.stride, self.summary, factor, query_pos[:, None], key_pos[None, :],
                            sub_block)  # fmt: skip

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, mem: Optional[HiddenMemory], keep: Optional[int], norm: Optional[nn.Module] = None):
        h = self.normalized(x, norm)  # B x T x D (the memory holds raw inputs, normalized in keys_values)
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = self.keys_values(h, mem, norm)  # B x H x S x Dh, S = M + T
        # Only the whole past (keep=None: decoding) is kept: a bounded memory would lose the absolute
        # positions the fixed pattern needs, hence supports_memory = False (no --mem-len), and keep > 0
        # keeps nothing.
        new_mem = HiddenMemory.extend(mem, x, keep, k, v) if keep is None else None
        if mem is None:
            out = self.attend_blocks(q, k, v)
        else:
            out = self.attend_gathered(q, k, v)
        return self.out_proj(self.merge_heads(out)), new_mem

    def attend_gathered(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """T queries at the end of S keys (the cached past of decoding): gather the keys any of them may
        attend, then masked attention over those only (O(T x keys) work; T = 1 when generating)."""
        T, S = q.size(2), k.size(2)
        query_pos = torch.arange(S - T, S, device=q.device)
        mask = self.mask(query_pos, torch.arange(S, device=q.device))  # H' x T x S
        keys = mask.flatten(0, 1).any(0).nonzero().squeeze(1)  # the union of the key sets
        mask, k, v = mask[..., keys], k[:, :, keys], v[:, :, keys]  # ... x S' (the attended keys)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # B x H x T x S'
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return weights @ v  # B x H x T x Dh

    def block_layout(self, r0: int, r1: int, device=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Absolute key positions and masks of the two key groups of the Nc = (r1 - r0) L queries of stride
        blocks r0 .. r1-1: ``local_pos`` Nc x W Bk (each query block's window), ``local_mask`` H' x Nc x W Bk,
        ``far_pos`` (strided: Nc x F, the query's column in rows < r1, F = r1; fixed: H' x 1 x F, each
        head's summary keys of blocks < r1, F = r1 c) and ``far_mask`` H' x Nc x F. Every allowed pair is
        in exactly one group (tested); keys at or after the end of block r1 - 1 are in neither (causality)."""
        L, Bk, W = self.stride, self.block, self.window_blocks
        i = torch.arange(r0 * L, r1 * L, device=device)  # Nc query positions
        window_start = (i // Bk - (W - 1)) * Bk  # first key of each query's block window
        local_pos = window_start[:, None] + torch.arange(W * Bk, device=device)  # Nc x W Bk
        if self.pattern == "strided":
            far_pos = (torch.arange(r1, device=device) * L)[None, :] + (i % L)[:, None]  # Nc x r1: i's column
            in_window = local_pos > i[:, None] - L
            far_side = far_pos <= i[:, None] - L
        else:
            _, sub_block = self._head_layout(device)  # H' x 1 x 1
            first = L - (sub_block + 1) * self.summary  # H' x 1 x 1: each head's first summary offset
            summary = torch.arange(r1, device=device)[:, None] * L + torch.arange(self.summary, device=device)
            far_pos = first + summary.reshape(1, 1, -1)  # H' x 1 x r1 c: each head's summary keys
            block_start = (i // L * L)[:, None]
            in_window = local_pos >= block_start
            far_side = far_pos < block_start  # H' x Nc x r1 c
        factor, sub_block = self._head_layout(device)
        local_mask = pattern_mask(self.pattern, L, self.summary, factor, i[:, None], local_pos, sub_block) & in_window
        far_mask = pattern_mask(self.pattern, L, self.summary, factor, i[:, None], far_pos, sub_block) & far_side
        return local_pos, local_mask, far_pos, far_mask

    @property
    def window_blocks(self) -> int:
        """W: key blocks of a query block's local window (strided: the L keys before it reach into one
        more block; fixed: its stride block)."""
        return self.stride // self.block + (1 if self.pattern == "strided" else 0)

    def attend_blocks(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Block-sparse causal attention of T queries over their own T keys (no memory), one chunk of
        about ``query_chunk`` queries (whole stride blocks) at a time. With ``--sparse-checkpoint`` each
        chunk is recomputed in the backward pass, so at most one chunk's scores exist at any time."""
        T = q.size(2)
        L = self.stride
        N = -(-T // L) * L  # padded length
        if N > T:
            q, k, v = (F.pad(t, (0, 0, 0, N - T)) for t in (q, k, v))  # B x H x N x Dh
        recompute = self.cfg.sparse_checkpoint and torch.is_grad_enabled()
        rows = max(1, self.query_chunk // L)  # stride blocks per chunk
        outs = []
        for r0 in range(0, N // L, rows):
            r1 = min(r0 + rows, N // L)
            args = (q[:, :, r0 * L : r1 * L], k, v, r0, r1)
            outs.append(checkpoint(self._chunk, *args, use_reentrant=False) if recompute else self._chunk(*args))
        return torch.cat(outs, dim=2)[:, :, :T]

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, r0: int, r1: int) -> Tensor:
        """Output of the queries of stride blocks r0 .. r1-1 (q: B x H x Nc x Dh, Nc = (r1 - r0) L) over the
        keys k, v (B x H x N x Dh)."""
        B, H, Nc, Dh = q.shape
        L, Bk, W = self.stride, self.block, self.window_blocks
        b0, nb = r0 * L // Bk, Nc // Bk
        _, local_mask, far_pos, far_mask = self.block_layout(r0, r1, q.device)  # H' x Nc x (W Bk | F)
        q = q * self.scale

        # local group: query block b0 + b against key block b0 + b - d for d = W-1 .. 0 blocks back, one matmul
        # per d on views; blocks before the sequence start score 0 (and are masked)
        qb = q.reshape(B, H, nb, Bk, Dh)
        kb, vb = (t.view(B, H, -1, Bk, Dh) for t in (k, v))  # B x H x N/Bk x Bk x Dh
        front = [max(0, d - b0) for d in range(W)]  # query blocks of the chunk whose block d back is < 0
        local = [
            F.pad(qb[:, :, front[d] :] @ kb[:, :, b0 + front[d] - d : b0 + nb - d].transpose(-1, -2),
                  (0, 0, 0, 0, front[d], 0))
            for d in range(W - 1, -1, -1)
        ]  # fmt: skip
        local = torch.cat(local, dim=-1).view(B, H, Nc, W * Bk)  # keys in window order (earliest first)

        # far group, only the keys before the chunk's end
        if self.pattern == "strided":  # the column keys: the R x L grid of positions, transposed
            qc = q.view(B, H, r1 - r0, L, Dh).transpose(2, 3)  # B x H x L x rows x Dh
            kc, vc = (t[:, :, : r1 * L].view(B, H, r1, L, Dh).transpose(2, 3) for t in (k, v))  # B x H x L x r1 x Dh
            far = (qc @ kc.transpose(-1, -2)).transpose(2, 3).reshape(B, H, Nc, r1)  # query r L + c, key (r', c)
        else:  # the summary keys: each head's c of every stride block before the chunk's end
            index = far_pos.view(1, -1, far_pos.size(-1), 1).expand(B, H, -1, Dh)  # B x H x r1 c x Dh
            ks, vs = k.gather(2, index), v.gather(2, index)  # B x H x r1 c x Dh
            far = q @ ks.transpose(-1, -2)  # B x H x Nc x r1 c

        # one softmax over both groups
        scores = torch.cat([local, far], dim=-1)  # B x H x Nc x (W Bk + F)
        mask = torch.cat([local_mask, far_mask], dim=-1)  # H' x Nc x (W Bk + F)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        w_local, w_far = weights.split([W * Bk, far.size(-1)], dim=-1)

        w_local = w_local.reshape(B, H, nb, Bk, W * Bk)
        out = 0
        for d in range(W):
            w = W - 1 - d  # the window's w-th key block is d blocks back
            part = w_local[:, :, front[d] :, :, w * Bk : (w + 1) * Bk] @ vb[:, :, b0 + front[d] - d : b0 + nb - d]
            out = out + F.pad(part, (0, 0, 0, 0, front[d], 0))  # B x H x nb x Bk x Dh
        out = out.reshape(B, H, Nc, Dh)
        if self.pattern == "strided":
            w_far = w_far.reshape(B, H, r1 - r0, L, r1).transpose(2, 3)  # B x H x L x rows x r1
            return out + (w_far @ vc).transpose(2, 3).reshape(B, H, Nc, Dh)
        return out + w_far @ vs  # B x H x Nc x Dh

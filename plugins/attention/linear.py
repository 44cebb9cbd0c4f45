"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236).

Softmax similarity exp(q.k) is replaced by a kernel phi(q).phi(k) (Sec. 3.2, Eq. 4-6); causally
(Sec. 3.3, Eq. 8-10), with S_i = sum_{j<=i} phi(k_j) v_j^T and Z_i = sum_{j<=i} phi(k_j)::

    V'_i = phi(q_i)^T S_i / (phi(q_i)^T Z_i + eps)

- Parallel (training): a chunked form, quadratic inside chunks of C positions and a carried state
  between them, so time and memory are linear in N and the N x F x Dh cumulative sum is never built.
  ``CausalLinearAttention`` computes the whole normalized product (feature map, sums, division) block
  by block in buffers reused across blocks, and its hand-written backward (the gradient of Sec. 3.3.1,
  chunked) recomputes phi and the chunk states instead of storing them: only q, k, v, the output, the
  normalizer and one state per block are kept for backward. Few fresh buffers is what makes it fast on
  a CPU: each large new tensor is a fresh mapping whose pages fault on first touch.
- RNN mode (Sec. 3.4): the state (S, Z) is all the past a layer needs; decoding one token costs
  O(F Dh) time and memory whatever its position. The same state, carried across ``segment_lm``
  segments (detached by the decoder), gives a model unbounded context in training and evaluation.
- The normalizer is computed with the numerator by appending a column of ones to V (one causal
  product of width Dh + 1); everything from the feature map on runs in float32 (float64 stays
  float64), also under fp16/bf16 models or autocast, then the output is cast back: half-precision
  cumulative sums overflow or lose the small terms (a known NaN source in public implementations).

Feature maps (``--feature-map``): ``elu`` phi(x) = elu(x) + 1 (the paper's, Sec. 3.2.1); ``relu``;
``favor``: FAVOR+ positive orthogonal random features (Choromanski et al. 2021, "Rethinking Attention
with Performers", Lemma 1 and Sec. 2.4), an unbiased estimate of the softmax kernel exp(q.k / sqrt(Dh)),
with a fixed projection drawn once at construction (seeded by fairseq's ``--seed``) and saved as a buffer.

Shapes: B = batch, H = heads, T = positions of this call, Dh = head dim, F = feature dim (Dh for elu and
relu, ``--favor-features`` for favor), E = Dh + 1 (values and the ones column), C = chunk size,
n = number of chunks, nb = chunks per block, P = nb C positions per block.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import UserError
from ..memory import TensorState
from .base import Attention, AttentionConfig, register_attention

logger = logging.getLogger(__name__)
EPS = 1e-6  # added to the normalizer, as in fast-transformers' LinearAttention (relu features can be all 0)


# ---- feature maps -----------------------------------------------------------------------------------
class FeatureMap(nn.Module):
    """phi: ... x Dh -> ... x F, elementwise positive (the normalizer must not vanish)."""

    def __init__(self, head_dim: int, cfg):
        super().__init__()
        self.dim = head_dim

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        raise NotImplementedError


class PointwiseFeatureMap(FeatureMap):
    """phi applied to each coordinate alone (F = Dh), with its derivative a function of its value: the
    fused product (``CausalLinearAttention``) then computes phi block by block into reused buffers and
    recomputes it in backward instead of keeping phi(Q), phi(K)."""

    def apply_(self, x: Tensor, out: Tensor) -> Tensor:
        """out = phi(x), no autograd (``out``: a buffer of x's shape)."""
        raise NotImplementedError

    def derivative_(self, phi: Tensor) -> Tensor:
        """phi(x) -> phi'(x), in place."""
        raise NotImplementedError


FEATURE_MAPS: Dict[str, Callable[..., FeatureMap]] = {}


def register_feature_map(name: str):
    def wrap(cls):
        FEATURE_MAPS[name] = cls
        return cls

    return wrap


@register_feature_map("elu")
class EluFeatures(PointwiseFeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, Eq. 7): positive, with a gradient everywhere:
    phi'(x) = 1 for x > 0 and exp(x) = phi(x) <= 1 otherwise, so phi' = min(phi, 1)."""

    def forward(self, x, is_query):
        return F.elu(x) + 1

    def apply_(self, x, out):
        return torch._C._nn.elu(x, out=out).add_(1)  # (F.elu has no out=)

    def derivative_(self, phi):
        return phi.clamp_(max=1)


@register_feature_map("relu")
class ReluFeatures(PointwiseFeatureMap):
    """phi(x) = relu(x): sparse features; a query with no positive feature outputs 0 (eps keeps it finite).
    phi'(x) = [phi(x) > 0] (0 at x = 0, as autograd's)."""

    def forward(self, x, is_query):
        return F.relu(x)

    def apply_(self, x, out):
        return torch.clamp(x, min=0, out=out)

    def derivative_(self, phi):
        return phi.gt_(0)


@register_feature_map("favor")
class FavorFeatures(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021, Lemma 1):

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(F),   x' = x / Dh^(1/4)

    so that E[phi(q).phi(k)] = exp(q.k / sqrt(Dh)), the softmax kernel. The rows of W (F x Dh) are
    orthogonal in blocks of Dh with chi-distributed norms (Sec. 2.4, orthogonal random features).

    Queries subtract their own largest exponent (a per-query factor, cancelled by the normalization).
    Keys get no data-dependent stabilizer: a maximum over the sequence would let future keys change past
    outputs, and a per-key one would change the kernel. Their exponent is bounded by |w|^2 / 2 (about
    Dh / 2), which float32 (the precision this runs in) holds easily.
    """

    def __init__(self, head_dim: int, cfg):
        super().__init__(head_dim, cfg)
        self.dim = cfg.favor_features or head_dim
        self.register_buffer("projection", orthogonal_gaussian(self.dim, head_dim))  # F x Dh, saved

    def forward(self, x, is_query):
        x = x * x.size(-1) ** -0.25
        exponent = x @ self.projection.to(x.dtype).t() - x.square().sum(-1, keepdim=True) / 2  # ... x F
        if is_query:
            exponent = exponent - exponent.amax(-1, keepdim=True).detach()
        return exponent.exp() / math.sqrt(self.dim)


def orthogonal_gaussian(rows: int, cols: int) -> Tensor:
    """``rows`` x ``cols``: blocks of ``cols`` orthonormal rows, each row scaled to the norm of a Gaussian
    vector (so every row is marginally N(0, I), and rows within a block are exactly orthogonal).

    A block is Q of the QR decomposition of a Gaussian matrix with Q's columns multiplied by the signs of
    R's diagonal (Mezzadri 2007, "How to generate random matrices from the classical compact groups",
    Sec. 5): that Q is Haar-distributed. Without it Q inherits the QR routine's sign convention (R's
    diagonal of one fixed sign), which makes, e.g., the first coordinate of every block's first row
    negative, and the kernel estimate biased."""
    blocks = []
    for _ in range(math.ceil(rows / cols)):
        q, r = torch.linalg.qr(torch.randn(cols, cols))
        q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)  # column j times sign(R_jj) (a zero diagonal: +1)
        blocks.append(q.t())
    norms = torch.randn(rows, cols).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


# ---- the causal product, chunked --------------------------------------------------------------------
def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """... x T x W -> ... x n x C x W, zero-padded at the end (zero rows add nothing to any state)."""
    T = x.size(-2)
    n = -(-T // chunk)
    if n * chunk != T:
        x = F.pad(x, (0, 0, 0, n * chunk - T))
    return x.view(*x.shape[:-2], n, chunk, x.size(-1))


def _exclusive_cumsum(states: Tensor, reverse: bool = False) -> Tensor:
    """... x n x F x E -> the sum over the chunks strictly before (``reverse``: after) each chunk."""
    out = torch.zeros_like(states)
    if reverse:  # out[c] = sum of states[c + 1 :]
        out[..., :-1, :, :] = states[..., 1:, :, :].flip(-3).cumsum(-3).flip(-3)
    else:  # out[c] = sum of states[: c]
        out[..., 1:, :, :] = states[..., :-1, :, :].cumsum(-3)
    return out


def causal_dot_product_reference(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
    """out_i = sum_{j<=i} (q_i . k_j) v_j in chunks (q, k: ... x T x F, v: ... x T x E -> ... x T x E).

    Inside a chunk, the masked C x C products; across chunks, the state sum_{j in earlier chunks}
    k_j v_j^T (n x F x E in all: linear in T). Differentiable by autograd, which then stores the C x C
    products and the chunk states. The layer runs ``CausalLinearAttention`` (the same sums in blocks, with
    the normalization and a recomputing backward); this plain form is the tests' and benchmarks' yardstick."""
    T = q.size(-2)
    chunk = max(1, min(chunk, T))  # a short call (one generated token) is one small chunk, not a padded one
    qc, kc, vc = (_to_chunks(t, chunk) for t in (q, k, v))  # ... x n x C x W
    allowed = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # C x C: j <= i
    intra = (qc @ kc.transpose(-1, -2)).masked_fill_(~allowed, 0) @ vc  # ... x n x C x E
    prefix = _exclusive_cumsum(kc.transpose(-1, -2) @ vc)  # ... x n x F x E
    out = intra + qc @ prefix  # ... x n x C x E
    return out.flatten(-3, -2)[..., :T, :]  # ... x T x E


# positions per block of the fused product on a CPU: 128-512 measure alike (D 256, 4 heads), 256 is fastest
# at N = 512. Elsewhere one block (all chunks batched in each call, no Python loop, as the previous form;
# a GPU's caching allocator makes fresh buffers cheap). Not measured on a GPU.
BLOCK = 256


def _block(x: Tensor) -> int:
    """Positions per block for x (B x H x T x W)."""
    return BLOCK if x.device.type == "cpu" else x.size(-2)


def _blocks(T: int, chunk: int, block: int) -> Tuple[int, int, int]:
    """(C, chunks per block, blocks): blocks of whole chunks, balanced so that the last one is not mostly
    padding."""
    C = max(1, min(chunk, T))
    chunks = -(-T // C)
    blocks = max(1, -(-chunks // max(1, block // C)))
    return C, -(-chunks // blocks), blocks


class _Workspace:
    """The buffers of one block, allocated once per call and reused by every block: block-sized
    temporaries cost page faults on each allocation (large blocks are fresh mappings), reused ones do not.
    Rows past the sequence end (padding of the last block) are zero in phi(Q), phi(K) and G."""

    def __init__(self, phi: Optional[PointwiseFeatureMap], B, H, C, nb, Fd, Dh, like: Tensor):
        P, E = nb * C, Dh + 1
        self.phi, self.C, self.P, self.Dh = phi, C, P, Dh
        self.fq, self.fk = (like.new_zeros(B, H, P, Fd) for _ in range(2))  # phi(Q), phi(K) of the block
        self.v1 = like.new_zeros(B, H, P, E)  # [V, 1]
        self.v1[..., Dh] = 1
        self.prod = like.new_empty(B * H * nb, C, C)  # the C x C products of each chunk
        self.states = like.new_empty(B, H, nb, Fd, E)  # per chunk: sum phi(k) [v, 1]^T, then a prefix

    def chunks(self, x: Tensor) -> Tensor:
        """B x H x P x W -> (B H nb) x C x W (a view)."""
        return x.view(-1, self.C, x.size(-1))

    def load(self, q: Tensor, k: Tensor, v: Tensor, t0: int, L: int) -> None:
        """phi(q), phi(k), [v, 1] of positions t0 ... t0 + L - 1 into the buffers."""
        for src, dst in ((q, self.fq), (k, self.fk)):
            if self.phi is None:  # features computed by the caller (not pointwise: favor)
                dst[:, :, :L].copy_(src[:, :, t0 : t0 + L])
            else:
                self.phi.apply_(src[:, :, t0 : t0 + L], dst[:, :, :L])
            if L < self.P:
                dst[:, :, L:].zero_()
        self.v1[:, :, :L, : self.Dh].copy_(v[:, :, t0 : t0 + L])


def _running_sum_(states: Tensor, carry: Tensor, spare: Tensor, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """states: B x H x nb x F x E, the sum of each chunk -> in place, the sum strictly before (``reverse``:
    after) each chunk plus ``carry`` (B x H x F x E). Returns (the new carry, a spare buffer): the two
    buffers ``carry`` and ``spare``, in some order."""
    order = range(states.size(2))
    for c in reversed(order) if reverse else order:
        torch.add(carry, states[:, :, c], out=spare)
        states[:, :, c].copy_(carry)
        carry, spare = spare, carry
    return carry, spare


class CausalLinearAttention(torch.autograd.Function):
    """The whole normalized causal product, out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) with
    S_i = P + sum_{j<=i} phi(k_j) v_j^T and z_i = p + sum_{j<=i} phi(k_j) ([P, p]: the state before the
    call), and the state after the call, in one function with a hand-written backward.

    The sequence is cut into blocks of a few chunks; for each block, in buffers reused across blocks:
    the masked C x C products inside each chunk, the chunk sums phi(K_c)^T [V_c, 1] turned into the state
    before each chunk by a running sum, then [num, den] = masked(phi(Q_c) phi(K_c)^T) [V_c, 1] + phi(Q_c) S_c
    (the normalizer rides on V's ones column: one product of width Dh + 1). The output is written in
    B x T x H x Dh memory, so that merging the heads is a view.

    Backward (Katharopoulos et al. 2020, Sec. 3.3.1, chunked), for g = dL/d out: with the normalizer's
    gradient on the ones column, G_i = [g_i, -g_i . out_i] / den_i (dL/d[num_i, den_i]), then

        d phi(q_i) = sum_{j<=i} (G_i . [v_j, 1]) phi(k_j)    (+ S_c G_i: the prefix state)
        d phi(k_j) = sum_{i>=j} (G_i . [v_j, 1]) phi(q_i)    (+ R_c [v_j, 1]: R = suffix sum of phi(q) G^T)
        d v_j      = sum_{i>=j} (phi(q_i) . phi(k_j)) g_i/den_i   (+ R_c^T phi(k_j), first Dh columns)

    in one pass over the blocks from the last: R starts at the gradient of the returned state, the prefix
    states are rebuilt from the state before each block (saved: blocks x F x E), and phi is recomputed
    from q, k with its derivative from its value. Saved: q, k, v (the caller's, no copy), the output, the
    normalizer (B x H x T) and the block states."""

    @staticmethod
    def forward(ctx, q, k, v, past, phi: Optional[PointwiseFeatureMap], chunk: int, block: int):
        """q, k: B x H x T x Dh (``phi`` None: phi(q), phi(k), B x H x T x F), v: B x H x T x Dh, past:
        B x H x F x E or None -> out: B x H x T x Dh, the state after the call: B x H x F x E."""
        B, H, T, Dh = v.shape
        Fd = q.size(-1)
        C, nb, n_blocks = _blocks(T, chunk, block)
        ws = _Workspace(phi, B, H, C, nb, Fd, Dh, v)
        out = v.new_empty(B, T, H, Dh).transpose(1, 2)  # B x H x T x Dh, stored as B x T x H x Dh
        den = v.new_empty(B, H, T)
        starts = v.new_empty(n_blocks, B, H, Fd, Dh + 1)  # the state before each block
        carry = past.clone() if past is not None else v.new_zeros(B, H, Fd, Dh + 1)
        spare = torch.empty_like(carry)
        num = v.new_empty(B, H, nb * C, Dh + 1)  # [numerator, normalizer] of the block
        fq, fk, v1, num_c = ws.chunks(ws.fq), ws.chunks(ws.fk), ws.chunks(ws.v1), ws.chunks(num)
        states = ws.states.view(-1, Fd, Dh + 1)  # (B H nb) x F x E
        for b in range(n_blocks):
            t0 = b * nb * C
            L = min(nb * C, T - t0)
            starts[b].copy_(carry)
            ws.load(q, k, v, t0, L)
            torch.bmm(fq, fk.transpose(1, 2), out=ws.prod).tril_()  # [i, j] = phi(q_i) . phi(k_j), j <= i
            torch.bmm(ws.prod, v1, out=num_c)
            torch.bmm(fk.transpose(1, 2), v1, out=states)
            carry, spare = _running_sum_(ws.states, carry, spare)
            num_c.baddbmm_(fq, states)  # + phi(q_i) S_c
            torch.add(num[:, :, :L, Dh], EPS, out=den[:, :, t0 : t0 + L])
            torch.div(num[:, :, :L, :Dh], den[:, :, t0 : t0 + L, None], out=out[:, :, t0 : t0 + L])
        ctx.save_for_backward(q, k, v, out, den, starts)
        ctx.phi, ctx.chunk, ctx.block, ctx.has_past = phi, chunk, block, past is not None
        return out, carry

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, grad_state: Optional[Tensor]):
        q, k, v, out, den, starts = ctx.saved_tensors
        B, H, T, Dh = v.shape
        Fd = q.size(-1)
        C, nb, n_blocks = _blocks(T, ctx.chunk, ctx.block)
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(v.dtype)
            ws = _Workspace(ctx.phi, B, H, C, nb, Fd, Dh, v)
            dq, dk = (q.new_empty(B, T, H, Fd).transpose(1, 2) for _ in range(2))  # B x H x T x F
            dv = v.new_empty(B, T, H, Dh).transpose(1, 2)  # B x H x T x Dh
            G = torch.zeros_like(ws.v1)  # B x H x P x E: dL / d[num, den] of the block
            suffix = torch.empty_like(ws.states)  # per chunk: sum phi(q) G^T, then the sum after it
            dfq, dfk = (torch.empty_like(ws.fq) for _ in range(2))  # B x H x P x F
            dv1 = v.new_empty(B * H * nb, C, Dh)
            carry = grad_state.to(v.dtype).clone() if grad_state is not None else v.new_zeros(starts.shape[1:])
            spare, before = torch.empty_like(carry), torch.empty_like(carry)
            fq, fk, v1, G_c = ws.chunks(ws.fq), ws.chunks(ws.fk), ws.chunks(ws.v1), ws.chunks(G)
            prefix, suffix_c = ws.states.view(-1, Fd, Dh + 1), suffix.view(-1, Fd, Dh + 1)
            dfq_c, dfk_c = ws.chunks(dfq), ws.chunks(dfk)
            for b in reversed(range(n_blocks)):
                t0 = b * nb * C
                L = min(nb * C, T - t0)
                ws.load(q, k, v, t0, L)
                torch.div(grad[:, :, t0 : t0 + L], den[:, :, t0 : t0 + L, None], out=G[:, :, :L, :Dh])
                scratch = dv1.view(B, H, -1, Dh)[:, :, :L]
                torch.sum(
                    torch.mul(G[:, :, :L, :Dh], out[:, :, t0 : t0 + L], out=scratch), -1, out=G[:, :, :L, Dh]
                ).neg_()
                torch.bmm(fk.transpose(1, 2), v1, out=prefix)
                before.copy_(starts[b])
                _running_sum_(ws.states, before, spare)
                torch.bmm(fq.transpose(1, 2), G_c, out=suffix_c)
                carry, spare = _running_sum_(suffix, carry, spare, reverse=True)
                torch.bmm(G_c, v1.transpose(1, 2), out=ws.prod).tril_()  # [i, j] = G_i . [v_j, 1], j <= i
                torch.bmm(ws.prod, fk, out=dfq_c).baddbmm_(G_c, prefix.transpose(1, 2))
                torch.bmm(ws.prod.transpose(1, 2), fq, out=dfk_c).baddbmm_(v1, suffix_c.transpose(1, 2))
                torch.bmm(fq, fk.transpose(1, 2), out=ws.prod).tril_()  # [i, j] = phi(q_i) . phi(k_j)
                torch.bmm(ws.prod.transpose(1, 2), G_c[..., :Dh], out=dv1).baddbmm_(fk, suffix_c[..., :Dh])
                dv[:, :, t0 : t0 + L].copy_(dv1.view(B, H, -1, Dh)[:, :, :L])
                for f, df, dx in ((ws.fq, dfq, dq), (ws.fk, dfk, dk)):
                    if ctx.phi is None:
                        dx[:, :, t0 : t0 + L].copy_(df[:, :, :L])
                    else:
                        torch.mul(df[:, :, :L], ctx.phi.derivative_(f[:, :, :L]), out=dx[:, :, t0 : t0 + L])
        return dq, dk, dv, carry if ctx.has_past else None, None, None, None


# ---- state and attention ----------------------------------------------------------------------------
@dataclass
class LinearState(TensorState):
    """The whole past of one linear attention layer (Sec. 3.4): float32 (float64 in float64 models)."""

    s: Tensor  # B x H x F x Dh: sum_j phi(k_j) v_j^T
    z: Tensor  # B x H x F: sum_j phi(k_j)


def causal_linear_attention(
    feature_map: FeatureMap, q: Tensor, k: Tensor, v: Tensor, state: Optional[LinearState], keep: Optional[int],
    chunk: int,
) -> Tuple[Tensor, Optional[LinearState]]:  # fmt: skip
    """q, k, v: B x H x T x Dh -> B x H x T x Dh (in q's dtype) and the next state (``keep`` 0: none).

    ``state`` holds the positions before this call; ``keep`` None or positive carries the state (it
    summarizes the whole past: there is no window to trim)."""
    dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)  # accumulate in float32 whatever the dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        past = None if state is None else torch.cat([state.s, state.z.unsqueeze(-1)], dim=-1).to(acc)  # B x H x F x E
        if q.size(-2) == 1:  # one token (generation): the RNN step of Sec. 3.4, add phi(k) v^T then read
            fq, fk = feature_map(q, is_query=True), feature_map(k, is_query=False)  # B x H x 1 x F
            v1 = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)  # B x H x 1 x E
            total = fk.transpose(-1, -2) @ v1 if past is None else past + fk.transpose(-1, -2) @ v1
            num_den = fq @ total  # B x H x 1 x E
            out = num_den[..., :-1] / (num_den[..., -1:] + EPS)  # B x H x 1 x Dh
        elif isinstance(feature_map, PointwiseFeatureMap):  # phi computed inside, block by block
            out, total = CausalLinearAttention.apply(q, k, v, past, feature_map, chunk, _block(q))
        else:
            fq, fk = feature_map(q, is_query=True), feature_map(k, is_query=False)  # B x H x T x F
            out, total = CausalLinearAttention.apply(fq, fk, v, past, None, chunk, _block(q))
        new_state = None if keep == 0 else LinearState(total[..., :-1], total[..., -1])
    return out.to(dtype), new_state


@dataclass
class LinearAttentionConfig(AttentionConfig):
    feature_map: ChoiceEnum(sorted(FEATURE_MAPS)) = field(
        default="elu", metadata={"help": "linear attention feature map phi: elu (elu+1, Katharopoulos et al. 2020), "
                                 "relu, or favor (FAVOR+ positive random features, Choromanski et al. 2021)"},
    )  # fmt: skip
    favor_features: int = field(
        default=0, metadata={"help": "random features of --feature-map favor (0: the head dimension)"}
    )
    linear_chunk_size: int = field(
        default=64,
        metadata={"help": "linear attention: positions per chunk of the parallel form (quadratic inside a chunk, "
                  "a carried state between chunks); changes speed only. 64: with 32 the fastest of 32-128 on a CPU "
                  "(head dim 64, 4 heads, 512-8192 positions, forward + backward)"},
    )  # fmt: skip


@register_attention("linear", LinearAttentionConfig)
class LinearAttention(Attention):
    """Causal linear attention with the RNN state (S, Z) as its memory; see the module docstring.

    ``--mem-len`` is a switch here: any positive value carries the state across segments (all the past,
    not the last mem_len positions). ``--attention-dropout`` has no attention weights to act on."""

    windowed_memory = False
    exact_softmax = False

    def __init__(self, embed_dim, num_heads, dropout, cfg: LinearAttentionConfig, pos_emb: str = "none"):
        super().__init__(embed_dim, num_heads, dropout, cfg, pos_emb)
        self.check_options(cfg)
        self.feature_map = FEATURE_MAPS[str(cfg.feature_map)](self.head_dim, cfg)

    @staticmethod
    def check_options(cfg) -> None:
        if str(cfg.feature_map) not in FEATURE_MAPS:
            raise UserError(f"unknown --feature-map '{cfg.feature_map}': choose one of {', '.join(FEATURE_MAPS)}")
        if cfg.linear_chunk_size <= 0:
            raise UserError(f"--linear-chunk-size must be positive, got {cfg.linear_chunk_size}")
        if cfg.favor_features < 0:
            raise UserError(f"--favor-features must be >= 0 (0: the head dimension), got {cfg.favor_features}")

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_options(cfg)
        if getattr(cfg, "attention_dropout", 0) > 0:
            logger.warning("--attention linear has no attention weights: --attention-dropout is ignored")

    def forward(self, x: Tensor, mem: Optional[LinearState], keep: Optional[int], norm: Optional[nn.Module] = None):
        h = self.normalized(x, norm)  # B x T x D (the state sums phi(K) V of past inputs: nothing to recompute)
        q = self.split_heads(self.q_proj(h))  # B x H x T x Dh
        k, v = (self.split_heads(t) for t in self.kv_proj(h).chunk(2, dim=-1))  # B x H x T x Dh
        out, new_mem = causal_linear_attention(self.feature_map, q, k, v, mem, keep, self.cfg.linear_chunk_size)
        return self.out_proj(self.merge_heads(out)), new_mem  # B x T x D

"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236).

Softmax similarity exp(q.k) is replaced by a kernel phi(q).phi(k) (Sec. 3.2, Eq. 4-6); causally
(Sec. 3.3, Eq. 8-10), with S_i = sum_{j<=i} phi(k_j) v_j^T and Z_i = sum_{j<=i} phi(k_j)::

    V'_i = phi(q_i)^T S_i / (phi(q_i)^T Z_i + eps)

- Parallel (training): a chunked form, quadratic inside chunks of C positions and a carried state
  between them, so time and memory are linear in N and the N x F x Dh cumulative sum is never built.
  The causal product is an ``autograd.Function`` whose backward recomputes the chunk states instead of
  storing them (the gradient of Sec. 3.3.1, chunked): only phi(Q), phi(K), V are kept for backward.
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
n = number of chunks.
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


FEATURE_MAPS: Dict[str, Callable[..., FeatureMap]] = {}


def register_feature_map(name: str):
    def wrap(cls):
        FEATURE_MAPS[name] = cls
        return cls

    return wrap


@register_feature_map("elu")
class EluFeatures(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, Eq. 7): positive, with a gradient everywhere."""

    def forward(self, x, is_query):
        return F.elu(x) + 1


@register_feature_map("relu")
class ReluFeatures(FeatureMap):
    """phi(x) = relu(x): sparse features; a query with no positive feature outputs 0 (eps keeps it finite)."""

    def forward(self, x, is_query):
        return F.relu(x)


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


def _add_matmul_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b over the leading dimensions, in place (no temporary for the product)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


def causal_dot_product_reference(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
    """out_i = sum_{j<=i} (q_i . k_j) v_j in chunks (q, k: ... x T x F, v: ... x T x E -> ... x T x E).

    Inside a chunk, the masked C x C products; across chunks, the state sum_{j in earlier chunks}
    k_j v_j^T (n x F x E in all: linear in T). Differentiable by autograd, which then stores the C x C
    products and the chunk states; ``CausalDotProduct`` is the same forward with a recomputing backward."""
    T = q.size(-2)
    chunk = max(1, min(chunk, T))  # a short call (one generated token) is one small chunk, not a padded one
    qc, kc, vc = (_to_chunks(t, chunk) for t in (q, k, v))  # ... x n x C x W
    allowed = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # C x C: j <= i
    intra = (qc @ kc.transpose(-1, -2)).masked_fill_(~allowed, 0) @ vc  # ... x n x C x E
    prefix = _exclusive_cumsum(kc.transpose(-1, -2) @ vc)  # ... x n x F x E
    out = intra + qc @ prefix  # ... x n x C x E
    return out.flatten(-3, -2)[..., :T, :]  # ... x T x E


class CausalDotProduct(torch.autograd.Function):
    """``causal_dot_product_reference`` with the gradient of Katharopoulos et al. 2020, Sec. 3.3.1
    (Eq. 13-15), chunked: for g = dL/d out,

        dq_i = sum_{j<=i} (g_i . v_j) k_j      (prefix states S, recomputed forward over the chunks)
        dk_j = sum_{i>=j} (g_i . v_j) q_i      (suffix states R = sum_{i in later chunks} q_i g_i^T)
        dv_j = sum_{i>=j} (q_i . k_j) g_i

    Only q, k, v are saved; the n x F x E chunk states and the C x C products are temporaries of the
    backward, so activation memory is that of the inputs alone."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.chunk = max(1, min(chunk, q.size(-2)))
        return causal_dot_product_reference(q, k, v, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        chunk, T = ctx.chunk, q.size(-2)
        with torch.autocast(grad.device.type, enabled=False):
            qc, kc, vc, gc = (_to_chunks(t, chunk) for t in (q, k, v, grad.to(v.dtype)))  # ... x n x C x W
            future = ~torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # C x C: j > i
            # in the order that frees each temporary soonest (the backward's peak memory is its temporaries)
            gv = (gc @ vc.transpose(-1, -2)).masked_fill_(future, 0)  # ... x n x C x C: [i, j] = g_i . v_j, j <= i
            dq = gv @ kc
            _add_matmul_(dq, gc, _exclusive_cumsum(kc.transpose(-1, -2) @ vc).transpose(-1, -2))  # prefix states
            dk = gv.transpose(-1, -2) @ qc
            del gv
            suffix = _exclusive_cumsum(qc.transpose(-1, -2) @ gc, reverse=True)  # ... x n x F x E
            _add_matmul_(dk, vc, suffix.transpose(-1, -2))
            qk = (qc @ kc.transpose(-1, -2)).masked_fill_(future, 0)  # [i, j] = q_i . k_j, j <= i
            dv = qk.transpose(-1, -2) @ gc
            del qk
            _add_matmul_(dv, kc, suffix)
        dq, dk, dv = (x.flatten(-3, -2)[..., :T, :] for x in (dq, dk, dv))  # ... x T x W
        return dq, dk, dv, None


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
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in float32 whatever the model's dtype
    with torch.autocast(q.device.type, enabled=False):
        fq, fk = feature_map(q.to(acc), is_query=True), feature_map(k.to(acc), is_query=False)  # B x H x T x F
        v1 = torch.cat([v.to(acc), v.new_ones(v.shape[:-1] + (1,), dtype=acc)], dim=-1)  # B x H x T x E
        past = None if state is None else torch.cat([state.s, state.z.unsqueeze(-1)], dim=-1).to(acc)  # B x H x F x E
        total = None  # the state after this call: B x H x F x E
        if q.size(-2) == 1:  # one token (generation): the RNN step of Sec. 3.4, add phi(k) v^T then read
            total = fk.transpose(-1, -2) @ v1 if past is None else past + fk.transpose(-1, -2) @ v1
            num_den = fq @ total  # B x H x 1 x E
        else:
            num_den = CausalDotProduct.apply(fq, fk, v1, chunk)  # B x H x T x E
            if past is not None:
                num_den = num_den + fq @ past
        out = num_den[..., :-1] / (num_den[..., -1:] + EPS)  # B x H x T x Dh
        new_state = None
        if keep != 0:
            if total is None:
                total = fk.transpose(-1, -2) @ v1 if past is None else past + fk.transpose(-1, -2) @ v1
            new_state = LinearState(total[..., :-1], total[..., -1])
    return out.to(q.dtype), new_state


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
                  "a carried state between chunks); changes speed only. 64: the fastest of 16-256 on a CPU (head dim 64, "
                  "4096 positions, forward + backward)"},
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

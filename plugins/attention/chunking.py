"""Query chunks: softmax attention with an explicit score tensor in memory linear in the keys.

Attention with a position term that is not a plain dot product (Transformer-XL's relative term, adaptive
span's soft mask) materializes B x H x T x S scores, biases and weights: O(T x S) memory. Each query's
row of the softmax only depends on that query, so the T queries can be processed in chunks of C::

    out[t0:t1] = softmax(scores(q[t0:t1], keys the chunk may see)) v        for t0 = 0, C, 2C, ...

which is the same function (the rows are computed by the same operations; only the keys a chunk cannot
see, masked to -inf and so weighted exactly 0, are left out). The forward then peaks at O(C x S) per head.
In training, autograd would still keep every chunk's B x H x C x S tensors for the backward pass; each
chunk is therefore wrapped in ``torch.utils.checkpoint`` (non-reentrant): only its inputs are kept and the
backward recomputes the chunk (one more forward of the attention core, as in memory-efficient attention,
Rabe & Staats 2021, arXiv 2112.05682), so the training step also peaks at O(C x S). Dropout draws the
same mask in the recomputation (the RNG state is restored).

Relative attention and adaptive span's inclusive window (float32, float64, above a size) use neither these chunk
sizes nor the checkpoint: ``distance_bias.py`` takes the keys in blocks as well (its chunks are sized for one
block, ``route_chunk``) and recomputes each block in its own hand-written backward pass, which needs neither
autograd's graph of the chunk nor a second forward of its values product.

C is chosen so that one sequence's H x C x S score tensor holds at most ``--score-chunk-elements``;
inputs under that budget run in one pass, the code path of an unchunked attention.

Shapes: B = batch, H = heads, T = queries, S = keys, C = queries per chunk.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import UserError


@dataclass
class ChunkedScoresConfig:
    """Mixed into the config of every mechanism that computes its scores in query chunks."""

    score_chunk_elements: int = field(
        default=2**21,  # 8 MiB per float32 score tensor of one sequence; N = 4096, H = 4: chunks of 128 queries
        metadata={"help": "largest score tensor (heads x queries x keys, per sequence) computed at once: longer "
                  "inputs are processed in query chunks (recomputed in the backward pass when training), so "
                  "memory grows linearly with the keys; the result is the same (0: never chunk)"},
    )  # fmt: skip


def check_chunk_config(cfg) -> None:
    """``UserError`` for a negative ``--score-chunk-elements``."""
    if cfg.score_chunk_elements < 0:
        raise UserError(f"--score-chunk-elements must be >= 0 (0: never chunk), got {cfg.score_chunk_elements}")


def query_chunk_size(num_heads: int, num_queries: int, num_keys: int, budget: int) -> int:
    """Queries per chunk so that H x C x S <= ``budget`` (at least 1); T (one pass) under the budget or for
    ``budget`` <= 0."""
    if budget <= 0 or num_heads * num_queries * num_keys <= budget:
        return num_queries
    return max(1, min(num_queries, budget // (num_heads * num_keys)))


def chunk_bounds(num_queries: int, chunk: int) -> List[Tuple[int, int]]:
    """[(t0, t1)] covering 0 .. T in steps of ``chunk``."""
    return [(t0, min(num_queries, t0 + chunk)) for t0 in range(0, num_queries, chunk)]


def run_chunk(fn: Callable, *args):
    """``fn(*args)``, recomputed in the backward pass instead of stored when autograd records (training)."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def cat_queries(outs: List[Tensor]) -> Tensor:
    """The chunks' outputs (B x H x C x Dh each) in query order: B x H x T x Dh."""
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

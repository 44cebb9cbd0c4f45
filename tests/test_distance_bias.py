"""The explicit route of relative attention and adaptive span (``plugins/attention/distance_bias.py``: query
chunks, the shift as a strided view, masks filled in the distance domain, a hand-written backward).

- the relative route against Dai et al.'s equation (arXiv 1901.02860, Sec. 3.3) written plainly over the full
  T x S score matrix, values and the gradients of every input and parameter, float64, with memory,
  ``--clamp-len``, ``--same-length``, persistent slots, in one pass and in chunks of 1 and 3 queries;
- adaptive span's route against its equation (Sukhbaatar et al. 2019, Sec. 2.2: log m_z(x) added to the scores);
- ``torch.autograd.gradcheck`` of the hand-written backward (finite differences), with the additive term per
  distance, one position table for all heads, a window and persistent slots;
- the route's operations: no gather, scatter or ``masked_fill``, and 3 + 8 matrix products per chunk (no
  recomputed forward of the whole chunk, as ``torch.utils.checkpoint`` did);
- the key blocks (``KeyBlockAttention``, online softmax): every paper-equation and former-route test also with 2
  queries per chunk and 3 keys per block (several blocks per chunk), ``gradcheck`` of the blocked backward,
  the blocked Function = the whole-key-range one with usage, slots, a window and the additive term, and the
  op trace: 11 products per (chunk, block), none wider than a block.

Shapes: B = batch, H = heads, T = queries (the last T of the S keys), S = keys, N = slots, Dh = head dim.
"""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugins.attention import build_attention, distance_bias, relative
from plugins.attention.adaptive_span import log_of, soft_span_mask
from plugins.attention.distance_bias import DistanceBiasAttention, KeyBlockAttention, position_rows

D, H = 16, 2


@pytest.fixture(autouse=True)
def every_size_takes_the_route(monkeypatch):
    """The tests' tiny shapes are below ``MIN_SCORE_ELEMENTS``, where the layers take the former route."""
    monkeypatch.setattr(distance_bias, "MIN_SCORE_ELEMENTS", 0)


def test_short_segments_take_the_former_route_and_long_ones_this_one(monkeypatch):
    """Below 2^17 scores per sequence (H x T x S; e.g. the word-level studies' 64-token segments) the former
    route measured faster, so the layers take it there; chunked calls and larger ones take this route."""
    monkeypatch.setattr(distance_bias, "MIN_SCORE_ELEMENTS", 2**17)
    q = torch.randn(16, 4, 64, 32)  # B x H x T x Dh
    assert not distance_bias.distance_bias_applies(q, 128, chunk=64)  # T = M = 64: 32k scores
    assert distance_bias.distance_bias_applies(q, 128, chunk=32)  # in query chunks
    assert distance_bias.distance_bias_applies(torch.randn(1, 4, 256, 32), 256, chunk=256)  # 262k scores
    assert not distance_bias.distance_bias_applies(torch.randn(1, 4, 256, 32).bfloat16(), 256, chunk=256)


def relative_reference(attn, q, k, v, window):
    """softmax_j(scale * [(q_i + u)^T k_j + (q_i + v)^T W_R r_(clamp(a_i - j))]) v_j, a_i = S - T + i, the
    causal (and same-length ``window``) mask, the slots with the content term only: B x H x T x Dh."""
    T, S = q.size(2), k.size(2)
    a = torch.arange(S - T, S)[:, None]  # T x 1: key position of each query
    j = torch.arange(S)[None, :]  # 1 x S
    distance = a - j  # T x S
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    d = distance.clamp(min=0)
    if attn.cfg.clamp_len > 0:
        d = d.clamp(max=attn.cfg.clamp_len)
    r = attn.r_proj(attn.sinusoid(d.reshape(-1), q.dtype)).view(T, S, H, -1)  # T x S x H x Dh: W_R r_d
    content = torch.einsum("bhid,bhjd->bhij", q + attn.u[:, None], k)
    position = torch.einsum("bhid,ijhd->bhij", q + attn.v[:, None], r)
    scores = ((content + position) * attn.scale).masked_fill(~allowed, float("-inf"))  # B x H x T x S
    if attn.persistent is not None:
        kp, vp = attn.persistent.keys_values(q.dtype)  # H x N x Dh
        slots = torch.einsum("bhid,hnd->bhin", q + attn.u[:, None], kp) * attn.scale
        scores = torch.cat([slots, scores], dim=-1)
        v = torch.cat([vp.expand(q.size(0), -1, -1, -1), v], dim=2)
    return scores.softmax(dim=-1) @ v


def gradients(out, tensors):
    grads = torch.autograd.grad((out.square().sum() + out.sum()), tensors, allow_unused=True)
    return [torch.zeros(()) if g is None else g for g in grads]


RELATIVE_CASES = {  # name: (options, T, S, window)
    "no-memory": (dict(), 9, 9, None),
    "memory": (dict(), 7, 13, None),
    "clamp-len": (dict(clamp_len=3), 7, 13, None),
    "same-length": (dict(same_length=True), 8, 12, 4),
    "persistent-same-length-clamp": (dict(persistent_mem_size=3, clamp_len=5), 7, 11, 6),
}


BLOCKS = {  # name: (QUERY_BLOCK, KEY_BLOCK): the whole key range of a chunk at once, or several key blocks
    "unblocked": (distance_bias.QUERY_BLOCK, 0),
    "key-blocks": (2, 3),
}


def use_blocks(monkeypatch, blocks: str) -> None:
    query_block, key_block = BLOCKS[blocks]
    monkeypatch.setattr(distance_bias, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(distance_bias, "KEY_BLOCK", key_block)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("budget", [0, 2 * 1 * 20, 2 * 3 * 20], ids=["one-pass", "chunks-of-1", "chunks-of-3"])
@pytest.mark.parametrize("case", list(RELATIVE_CASES))
def test_relative_route_is_the_papers_equation(case, budget, blocks, monkeypatch):
    """With ``key-blocks`` (2 queries per chunk, 3 keys per block): every chunk crosses several key blocks
    (online softmax, the backward from the saved log-sum-exp)."""
    use_blocks(monkeypatch, blocks)
    options, T, S, window = RELATIVE_CASES[case]
    torch.manual_seed(0)
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=budget, relative_route="explicit", **options)
    attn = build_attention("relative", D, H, 0.0, ns).double().train()
    with torch.no_grad():  # position biases far from 0, so that a misplaced term shows
        attn.u.normal_()
        attn.v.normal_()
    q = torch.randn(2, H, T, D // H, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, H, S, D // H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tensors = [q, k, v, *attn.parameters()]
    out, _ = attn.relative_attention(q, k, v, window=window)
    ref = relative_reference(attn, q, k, v, window)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(gradients(out, tensors), gradients(ref, tensors)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("persistent", [0, 2], ids=["no-slots", "slots"])
def test_adaptive_span_route_is_the_papers_equation(persistent, blocks, monkeypatch):
    """s_tr = (q_t^T k_r + q_t^T p_(t-r)) / sqrt(Dh) + log m_z(t - r) over the window (inclusive), softmax."""
    use_blocks(monkeypatch, blocks)
    torch.manual_seed(0)
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=2 * 3 * 16, max_span=10, span_ramp=3,
                         span_init=0.5, persistent_mem_size=persistent)  # fmt: skip
    attn = build_attention("adaptive_span", D, H, 0.0, ns).double().train()
    with torch.no_grad():
        attn.span_fraction.copy_(torch.tensor([0.3, 0.55]))
    x = torch.randn(2, 13, D, dtype=torch.float64, requires_grad=True)
    out, _ = attn(x, None, 0)
    q = attn.split_heads(attn.q_proj(x))
    k, v = attn.keys_values(x, None, None)
    W, T = attn.window(), x.size(1)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # T x T
    allowed = (distance >= 0) & (distance < W)
    x_ = distance.clamp(0, W - 1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,ijd->bhij", q, attn.key_pe[x_])
    log_m = log_of(soft_span_mask(attn.spans(), torch.arange(W, dtype=torch.float64), attn.ramp))  # H x W
    scores = (scores * attn.scale + log_m[:, x_][None]).masked_fill(~allowed, float("-inf"))  # B x H x T x T
    if persistent:
        kp, vp = attn.persistent.keys_values(q.dtype)
        scores = torch.cat([torch.einsum("bhid,hnd->bhin", q, kp) * attn.scale, scores], dim=-1)
        v = torch.cat([vp.expand(2, -1, -1, -1), v], dim=2)
    ref = attn.out_proj(attn.merge_heads(scores.softmax(dim=-1) @ v))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    tensors = [x, *attn.parameters()]
    for g, g_ref in zip(gradients(out, tensors), gradients(ref, tensors)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def gradcheck_inputs(T: int, S: int, chunk: int, heads_in_table: int, colbias: bool, slots: int):
    """float64 inputs of the Functions (qc, qp, k, v, R, colbias, kp, vp; B 2, Dh 3), all requiring a gradient,
    and the distance of R's first row."""
    torch.manual_seed(0)
    B, Dh = 2, 3

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    top, rows = position_rows(S, T, chunk)
    qc, qp = rand(B, H, T, Dh), rand(B, H, T, Dh)
    k, v = rand(B, H, S, Dh), rand(B, H, S, Dh)
    R = rand(heads_in_table, rows, Dh)
    c = rand(H, rows) if colbias else None
    kp, vp = (rand(B, H, slots, Dh), rand(B, H, slots, Dh)) if slots else (None, None)
    return top, (qc, qp, k, v, R, c, kp, vp)


@pytest.mark.parametrize(
    "heads_in_table, colbias, window, slots, dropout",
    [(2, False, None, 0, 0.0), (1, True, 3, 0, 0.0), (2, True, None, 2, 0.0), (2, True, 4, 2, 0.3)],
)
def test_hand_written_backward_passes_gradcheck(heads_in_table, colbias, window, slots, dropout):
    """Finite differences of the output against the backward pass (with dropout: the same masks, redrawn
    from the RNG state saved by the forward)."""
    chunk = 2
    top, inputs = gradcheck_inputs(T=5, S=7, chunk=chunk, heads_in_table=heads_in_table, colbias=colbias, slots=slots)

    def f(*args):
        torch.manual_seed(1)  # the same dropout masks at every evaluation
        return DistanceBiasAttention.apply(*args, top, window, chunk, False, dropout)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "heads_in_table, colbias, window, slots, block",
    [(2, False, None, 0, 2), (1, True, 3, 0, 2), (2, True, None, 2, 3), (2, True, 4, 2, 2), (1, True, 5, 1, 4)],
)
def test_key_block_backward_passes_gradcheck(heads_in_table, colbias, window, slots, block):
    """The same for the key-blocked Function (chunks of 2 queries, blocks of 2 to 4 of the 9 keys): its backward
    starts from the saved log-sum-exp, not from weights recomputed by a softmax."""
    chunk = 2
    top, inputs = gradcheck_inputs(T=5, S=9, chunk=chunk, heads_in_table=heads_in_table, colbias=colbias, slots=slots)

    def f(*args):
        return KeyBlockAttention.apply(*args, top, window, chunk, False, block)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("window", [None, 4])
def test_key_blocks_equal_the_whole_key_range_with_usage(window):
    """Outputs, the attention each key received (most_used compression: a second pass with the final
    log-sum-exp) and every gradient of the key-blocked Function equal ``DistanceBiasAttention``'s (float64)."""
    torch.manual_seed(0)
    B, T, S, Dh, chunk, block = 2, 11, 23, 3, 3, 4
    top, rows = position_rows(S, T, chunk)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in [(B, H, T, Dh)] * 2 + [(B, H, S, Dh)] * 2 + [(H, rows, Dh), (H, rows)]]  # fmt: skip
    slots = [torch.randn(B, H, 2, Dh, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args = (*inputs, *slots, top, window, chunk, True)
    out, received = KeyBlockAttention.apply(*args, block)
    ref, ref_received = DistanceBiasAttention.apply(*args, 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(received, ref_received, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(gradients(out, inputs + slots), gradients(ref, inputs + slots)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        if self.ops[-1] in PRODUCTS:
            self.largest = max(getattr(self, "largest", 0), max(a.size(-1) for a in (*args, out) if torch.is_tensor(a)))
        return out


PRODUCTS = ("bmm", "matmul", "baddbmm", "baddbmm_")


def traced_layer_step(T: int, score_chunk_elements: int) -> "OpCounter":
    """The aten ops of one relative attention layer's forward + backward on the explicit route, with no
    gather, scatter or masked_fill among them (checked here)."""
    torch.manual_seed(0)
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=score_chunk_elements, relative_route="explicit")
    attn = build_attention("relative", D, H, 0.0, ns).train()
    q = torch.randn(1, H, T, D // H, requires_grad=True)
    k, v = (torch.randn(1, H, T, D // H, requires_grad=True) for _ in range(2))
    with OpCounter() as counter:
        out, _ = attn.relative_attention(q, k, v)
        out.square().sum().backward()
    assert not {"gather", "scatter", "scatter_add", "masked_fill", "masked_fill_"} & set(counter.ops)
    return counter


def test_key_blocks_bound_every_product_and_count_eleven_per_block(monkeypatch):
    """Chunks of 8 queries over 32 keys in blocks of 8 keys: chunk i sees i + 1 blocks (10 pairs), each with
    3 products forward and 8 backward (the same 11 as a whole chunk, now per block), and no operand or result
    of a product is wider than a block's C + Kb - 1 position columns (the former code multiplied a chunk's
    C x (L + C - 1) position scores over all its L keys: 39 columns for the last chunk)."""
    monkeypatch.setattr(distance_bias, "KEY_BLOCK", 8)
    counter = traced_layer_step(T=32, score_chunk_elements=H * 8 * 8)
    products = [op for op in counter.ops if op in PRODUCTS]
    assert len(products) == 11 * (1 + 2 + 3 + 4), counter.ops
    assert counter.largest <= 8 + 8 - 1


def test_the_route_uses_no_gather_mask_or_recomputed_chunk(monkeypatch):
    """Forward + backward of relative attention in 4 chunks, the whole key range of a chunk at once
    (``KEY_BLOCK`` 0, the path dropout takes): no gather/scatter/masked_fill over C x S, and the score matrix
    products: 3 per chunk forward (content, position, values), 8 backward (content and position recomputed,
    then dV, dP, dqc, dk, dqp, dR). The former route (checkpointed chunks through autograd) gathered the shift,
    masked a C x S tensor and recomputed whole chunks: 12 products per chunk."""
    monkeypatch.setattr(distance_bias, "KEY_BLOCK", 0)
    counter = traced_layer_step(T=32, score_chunk_elements=H * 8 * 32)
    chunks = 4
    products = [op for op in counter.ops if op in PRODUCTS]
    assert len(products) == 11 * chunks, counter.ops


def test_dropout_masks_the_weights_like_f_dropout():
    """With dropout, out = (W * mask / (1 - p)) V with F.dropout's arithmetic: the weights computed without
    dropout, the same Bernoulli draws (same seed, same shape) applied by hand, give the same output."""
    torch.manual_seed(0)
    B, T, S, Dh, chunk, p = 1, 6, 6, 4, 6, 0.4
    top, rows = position_rows(S, T, chunk)
    args = [torch.randn(*shape, dtype=torch.float64) for shape in [(B, H, T, Dh)] * 2 + [(B, H, S, Dh)] * 2]
    R = torch.randn(H, rows, Dh, dtype=torch.float64)
    weights, *_ = DistanceBiasAttention.chunk_weights(*args, R, None, None, None, top, None, 0, T)
    torch.manual_seed(3)
    out = DistanceBiasAttention.apply(*args, R, None, None, None, top, None, chunk, False, p)[0]
    torch.manual_seed(3)
    mask = torch.empty_like(weights).bernoulli_(1 - p)
    torch.testing.assert_close(out, (weights * mask / (1 - p)) @ args[3], rtol=1e-12, atol=1e-12)
    assert (mask == 0).any()


FORMER_ROUTE_CASES = {  # name: (attention, options, segment lengths, keep)
    "relative-memory-clamp": ("relative", dict(clamp_len=5), [9, 12], 10),
    "relative-same-length-slots": ("relative", dict(same_length=True, persistent_mem_size=3), [9, 12], 6),
    "adaptive-span": ("adaptive_span", dict(max_span=16, span_ramp=4, span_init=0.6), [12, 12], 16),
}


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("case", list(FORMER_ROUTE_CASES))
def test_the_route_equals_the_former_route_in_float32(case, blocks, monkeypatch):
    """The former route (a gather, a float mask, SDPA, checkpointed chunks: what bf16 and autocast still take)
    and this one give the same outputs and gradients to 1e-5 in float32, over segments with memory."""
    from plugins.attention import adaptive_span

    use_blocks(monkeypatch, blocks)
    from tests.test_long_context import run

    name, options, lengths, keep = FORMER_ROUTE_CASES[case]
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=2 * 4 * 30, relative_route="explicit", **options)
    torch.manual_seed(0)
    attn = build_attention(name, D, H, 0.0, ns).train()
    xs = [torch.randn(2, T, D, requires_grad=True) for T in lengths]
    new = run(attn, xs, keep)
    monkeypatch.setattr(relative, "distance_bias_applies", lambda *args: False)
    monkeypatch.setattr(adaptive_span, "distance_bias_applies", lambda *args: False)
    former = run(attn, xs, keep)
    for a, b in zip(new[0] + new[3], former[0] + former[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ["distance_bias", "former", "fused"])
def test_same_length_without_memory_is_causal_attention_on_every_route(route, monkeypatch):
    """``--same-length`` with ``--mem-len 0`` (window 0): every query sees the keys up to itself. The distance
    route once read window 0 as "no key at all" and returned NaN."""
    if route == "former":
        monkeypatch.setattr(relative, "distance_bias_applies", lambda *args: False)
    torch.manual_seed(0)
    ns = SimpleNamespace(pos_emb="relative", same_length=True, relative_route="fused" if route == "fused" else "auto")
    attn = build_attention("relative", D, H, 0.0, ns).double().eval()
    x = torch.randn(1, 24, D, dtype=torch.float64)
    q = attn.split_heads(attn.q_proj(x))  # B x H x T x Dh
    k, v = attn.keys_values(x, None, None)  # B x H x T x Dh
    out, _ = attn.relative_attention(q, k, v, window=0)
    torch.testing.assert_close(out, relative_reference(attn, q, k, v, None), rtol=1e-12, atol=1e-12)

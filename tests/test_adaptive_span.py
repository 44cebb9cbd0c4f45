"""Adaptive attention span (arXiv 1905.07799) and persistent memory / all-attention (arXiv 1907.01470);
issue 5. The registry suite (test_attention.py) already checks adaptive_span for causality, memory ==
one long pass, keep, step-by-step decoding and the no-gradient K/V cache.

References written here, not taken from the plugin:
- ``reference_adaptive_attention``: the paper's Eq. 3-4 the way the official code computes it: softmax
  over the window, times the soft mask, divided by the sum (no epsilon), float64;
- ``reference_persistent_attention``: one softmax over [persistent slots; causal keys] with the official
  scaling (keys x sqrt(Dh), values x sqrt(N)).

Shapes: B = batch, T = queries, S_k = keys, W = window, H = heads, D = model dim, Dh = head dim.
"""

import argparse
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from plugins.attention import ATTENTION_REGISTRY, build_attention, register_attention
from plugins.attention.adaptive_span import AdaptiveSpanAttention, soft_span_mask, window_size
from plugins.attention.base import Attention
from plugins.errors import UserError
from plugins.models.efficient_lm import EfficientLMConfig, validate_config
from plugins.optim.adagrad_clip import ClippedAdagrad
from plugins.tasks.segment_lm import SegmentLMTask
from recipes.adaptive_span.plot_spans import load_checkpoint, load_spans, main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared" / "data"
V = 24  # conftest's dictionary: 4 specials + 20 words
B, D, H = 2, 16, 2
EXACT64 = dict(rtol=0, atol=1e-10)
ADAPTIVE = dict(attention="adaptive_span", pos_emb="relative")


def span_attention(max_span=256, ramp=8, spans=None, persistent=0, seed=0) -> AdaptiveSpanAttention:
    torch.manual_seed(seed)
    options = SimpleNamespace(max_span=max_span, span_ramp=ramp, span_init=0.0, span_loss_weight=1e-3,
                              persistent_mem_size=persistent, pos_emb="relative")  # fmt: skip
    attn = build_attention("adaptive_span", D, H, dropout=0.0, options=options).to(torch.float64).eval()
    if spans is not None:  # in positions
        attn.span_fraction.data = torch.tensor(spans, dtype=torch.float64) / max_span
    return attn


def reference_adaptive_attention(attn: AdaptiveSpanAttention, x: torch.Tensor) -> torch.Tensor:
    """One pass, no memory: a_tr = m_z(t-r) softmax_r(s_tr) / sum_q m_z(t-q) softmax_q(s_tq) over the
    keys r with 0 <= t - r < S, s_tr = (q_t.k_r + q_t.p_(t-r)) / sqrt(Dh)."""
    T, Dh = x.size(1), D // H
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # B x H x T x Dh
    k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in attn.kv_proj(x).chunk(2, dim=-1))
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # T x T
    allowed = (distance >= 0) & (distance < attn.max_span)
    position = torch.einsum("bhtd,tsd->bhts", q, attn.key_pe[distance.clamp(0, attn.max_span - 1)])
    scores = (q @ k.transpose(-1, -2) + position) / math.sqrt(Dh)  # B x H x T x T
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    z = attn.span_fraction * attn.max_span  # H
    mask = ((attn.ramp + z[:, None, None] - distance.double()) / attn.ramp).clamp(0, 1)  # H x T x T
    weights = weights * mask
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(B, T, D)
    return attn.out_proj(out)


# ---- the mask and the spans ----------------------------------------------------------------------
def test_soft_mask_is_the_formula():
    spans = torch.tensor([0.0, 10.0, 100.5])
    x = torch.arange(120.0)
    mask = soft_span_mask(spans, x, ramp=8)
    for h, z in enumerate(spans.tolist()):
        for d in range(120):
            assert mask[h, d] == pytest.approx(min(1.0, max(0.0, (8 + z - d) / 8)))
    assert mask[1, 10] == 1 and mask[1, 14] == 0.5 and mask[1, 18] == 0  # z=10, R=8: ramp from x=10 to 18


def test_attention_is_the_papers_equation():
    attn = span_attention(max_span=16, ramp=4, spans=[3.5, 9.0])
    x = torch.randn(B, 20, D, dtype=torch.float64)  # longer than S: the hard window matters too
    out, _ = attn(x, None, keep=0)
    torch.testing.assert_close(out, reference_adaptive_attention(attn, x), **EXACT64)


def test_window_covers_every_nonzero_mask_value():
    assert window_size(0.0, 8192, 32) == 64
    assert window_size(32.0, 8192, 32) == 64  # distances < 64
    assert window_size(32.5, 8192, 32) == 128
    assert window_size(8192.0, 8192, 32) == 8192
    assert window_size(10.0, 16, 4) == 16  # capped at S


def test_span_loss_gradient_shrinks_the_spans(lm):
    model = lm(**ADAPTIVE, max_span=64, span_loss_weight=0.5)
    tokens = torch.randint(4, V, (2, 12))
    aux = model.aux_losses(model(tokens))
    assert set(aux) == {"span"} and aux["span"].weight == 0.5
    layers = [layer.attn for layer in model.decoder.layers]
    expected = sum(float(a.span_fraction.detach().mean()) * 64 for a in layers)
    assert float(aux["span"].value.detach()) == pytest.approx(expected)
    (aux["span"].weight * aux["span"].value).backward()
    for a in layers:  # d/ds_h of weight * S * mean_h s_h: positive, so gradient descent shortens every span
        torch.testing.assert_close(a.span_fraction.grad, torch.full((2,), 0.5 * 64 / 2))


def test_spans_stay_in_range_after_optimizer_steps(lm):
    """segment_lm's optimizer_step (the one fairseq's trainer calls) clamps s_h to [0, 1] after each step."""
    model = lm(**ADAPTIVE, max_span=64, span_init=0.5)
    task = SegmentLMTask.__new__(SegmentLMTask)  # optimizer_step uses no task state
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    spans = [layer.attn.span_fraction for layer in model.decoder.layers]
    for direction in (+1, -1, +1):  # losses that push the spans far out of [0, 1], both ways
        optimizer.zero_grad()
        (-direction * sum(s.sum() for s in spans)).backward()
        task.optimizer_step(optimizer, model, update_num=0)
        for s in spans:
            assert torch.equal(s.data, torch.full_like(s, 1.0 if direction > 0 else 0.0))


def test_spans_are_reported_per_layer(lm):
    model = lm(**ADAPTIVE, max_span=64)
    model.decoder.layers[1].attn.span_fraction.data = torch.tensor([0.25, 0.5])
    metrics = model.metrics()
    assert float(metrics["span_l1"]) == pytest.approx(24.0) and float(metrics["span_max_l1"]) == pytest.approx(32.0)
    assert float(metrics["span_l0"]) == 0.0


def test_clipped_adagrad_is_the_official_update():
    """Without clipping: torch's Adagrad. With clipping: each tensor's step scaled by min(1, c / ||g||),
    the squares accumulated unclipped (official adagrad_with_grad_clip.py)."""
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ours, ref, clipped = ([x.clone().requires_grad_() for x in (a, b)] for _ in range(3))
    opt_ours, opt_ref = ClippedAdagrad(ours, lr=0.1), torch.optim.Adagrad(ref, lr=0.1)
    opt_clip = ClippedAdagrad(clipped, lr=0.1, grad_clip=0.5)
    total = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    expected = [a.clone(), b.clone()]
    for _ in range(3):
        grads = [torch.randn(5, dtype=torch.float64) * 3, torch.randn(3, dtype=torch.float64) * 0.01]
        for params, opt in ((ours, opt_ours), (ref, opt_ref), (clipped, opt_clip)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for i, g in enumerate(grads):
            total[i] += g * g
            scale = min(1.0, 0.5 / float(g.norm()))
            expected[i] -= 0.1 * scale * g / (total[i].sqrt() + 1e-10)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p, r, **EXACT64)
        for p, e in zip(clipped, expected):
            torch.testing.assert_close(p.detach(), e, **EXACT64)
    assert not torch.allclose(clipped[0], ours[0])  # the large gradient was clipped


# ---- compute follows the span ----------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_trimmed_cache_equals_full_cache(grad):
    """Spans forced short: the trimmed window and cache give the outputs of the full window S (the
    positions cut off had a zero mask), and the cache really is shorter."""
    trimmed = span_attention(max_span=256, ramp=8, spans=[12.0, 40.0])
    full = span_attention(max_span=256, ramp=8, spans=[12.0, 40.0])
    full.trim_to_span = False
    assert trimmed.window() == 64 and full.window() == 256  # 40 + 8 = 48 distances -> 64
    segments = torch.randn(B, 320, D, dtype=torch.float64).split(32, dim=1)
    mem_t = mem_f = None
    with torch.set_grad_enabled(grad):
        for x in segments:
            out_t, mem_t = trimmed(x, mem_t, keep=None)
            out_f, mem_f = full(x, mem_f, keep=None)
            torch.testing.assert_close(out_t, out_f, **EXACT64)
            mem_t, mem_f = mem_t.detach(), mem_f.detach()
    assert mem_f.length == 256
    assert mem_t.length == (128 if grad else 64)  # + 64 while training: the next step may lengthen the spans


def test_memory_len_bounds_the_cache():
    attn = span_attention(max_span=256, ramp=8, spans=[200.0, 10.0])
    with torch.no_grad():
        _, mem = attn(torch.randn(B, 300, D, dtype=torch.float64), None, keep=100)
    assert mem.length == 100  # --mem-len caps the cache even when the window (256) is longer


@pytest.mark.parametrize("window", ["inclusive", "official"])
def test_segments_with_memory_equal_one_long_pass(lm, window):
    """The decoder (segment_lm path: stream_offset, --mem-len = S) over segments shorter and longer than
    the window == one pass over the whole sequence, where the window is the only mask."""
    model = lm(**ADAPTIVE, max_span=64, mem_len=64, persistent_mem_size=3, span_window=window).eval()
    for layer in model.decoder.layers:
        layer.attn.span_fraction.data = torch.tensor([0.1, 0.6])
    tokens = torch.randint(4, V, (2, 150))
    with torch.no_grad():
        whole, _ = model(tokens)
        parts, start = [], 0
        for length in (20, 80, 1, 49):
            out, _ = model(tokens[:, start : start + length], stream_offset=start)
            parts.append(out)
            start += length
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", ["inclusive", "official"])
def test_step_by_step_generation_equals_full_forward(lm, window):
    model = lm(**ADAPTIVE, max_span=64, mem_len=64, persistent_mem_size=2, span_window=window).eval()
    tokens = torch.randint(4, V, (2, 40))
    with torch.no_grad():
        whole, _ = model(tokens)
        state, steps = {}, []
        for t in range(tokens.size(1)):
            out, _ = model(tokens[:, : t + 1], incremental_state=state)
            steps.append(out[:, -1:])
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-5)


# ---- the official window (--span-window official) ------------------------------------------------
def _skew(X, pad_value):
    """facebookresearch/adaptive-span models.py, verbatim: shift every row 1 step to the right."""
    B, M, L = X.size()  # X = B x M x L
    X = F.pad(X, (0, M + 1), value=pad_value)  # B x M x (L+M+1)
    X = X.view(B, -1)  # B x ML+MM+M
    X = X[:, :-M]  # B x ML+MM
    X = X.view(B, M, M + L)  # B x M x L+M
    return X


def _unskew(X):
    """facebookresearch/adaptive-span models.py, verbatim: the reverse of ``_skew``."""
    B, M, L = X.size()  # X = B x M x L+M
    L -= M
    X = X.view(B, -1)  # B x ML+MM
    X = F.pad(X, (0, M))  # B x ML+MM+M
    X = X.view(B, M, M + L + 1)  # B x M x L+M+1
    X = X[:, :, :L]  # B x M x L
    return X


def official_reference(attn: AdaptiveSpanAttention, blocks, eps: float = 1e-8):
    """The official computation over consecutive blocks (B x M x D each) of one stream batch, written
    from models.py / adaptive_span.py / persistent_memory.py / train.py:

    - the cache h_cache starts as S zero vectors (train.py) and is [h_cache; h][-S:], detached;
    - h_all = cat([h_cache, h]); scores = _unskew(q k^T) + q key_pe: query i sees h_all[i : i + S], the S
      positions BEFORE it (not itself); key_pe column l is distance S - l (ours: row S - 1 - l);
    - softmax over the S keys (jointly with the persistent slots, if any), times the AdaptiveMask
      (template linspace(1 - S, 0, S) + z, / R + 1, clamped), renormalized: / (sum + eps), eps = 1e-8;
    - out = _skew(attn, 0) @ V (+ the persistent values), then the output projection.
    With the official trimming (``get_trim_len`` / ``trim_memory``): the oldest keys whose mask is 0 for
    every head are dropped in multiples of 64, which changes the softmax's denominator, hence the effect of
    eps. Returns the outputs of every block."""
    S, R, Dh, Hh = attn.max_span, attn.ramp, D // H, H
    current = max(0, min(S, math.ceil(float(attn.span_fraction.detach().max()) * S) + R))  # get_current_max_size
    trim = math.floor(min(S - 1, S - current) / 64) * 64  # get_trim_len
    key_pe = attn.key_pe.flip(0).t()[None][:, :, trim:]  # 1 x Dh x (S - trim), official layout, trimmed
    template = torch.linspace(1 - S, 0, steps=S, dtype=torch.float64)
    mask = ((template + attn.span_fraction.view(Hh, 1, 1) * S) / R + 1).clamp(0, 1)[:, :, trim:]  # H x 1 x L
    L = S - trim
    h_cache = torch.zeros(B, S, D, dtype=torch.float64)
    outs = []
    for h in blocks:
        M = h.size(1)
        h_all = torch.cat([h_cache, h], dim=1)  # B x (S+M) x D
        q = attn.q_proj(h).view(B, M, Hh, Dh).transpose(1, 2).reshape(B * Hh, M, Dh)
        k, v = attn.kv_proj(h_all[:, trim:]).chunk(2, dim=-1)  # trim_memory
        k, v = (t.view(B, L + M, Hh, Dh).transpose(1, 2).reshape(B * Hh, L + M, Dh) for t in (k, v))
        scores = _unskew(q @ k.transpose(-1, -2)) + q @ key_pe  # BH x M x L
        scores = scores / math.sqrt(Dh)
        if attn.persistent is None:
            weights = scores.softmax(-1).view(B, Hh, M, L) * mask
            weights = (weights / (weights.sum(-1, keepdim=True) + eps)).view(B * Hh, M, L)
            out = _skew(weights, 0) @ v  # BH x M x Dh
        else:
            N = attn.persistent.size
            k_pers = attn.persistent.key * math.sqrt(Dh)  # H x N x Dh
            v_pers = attn.persistent.value * math.sqrt(N)
            pers = torch.einsum("bhmd,hnd->bhmn", q.view(B, Hh, M, Dh), k_pers) / math.sqrt(Dh)
            joint = torch.cat([scores.view(B, Hh, M, L), pers], dim=-1).softmax(-1)  # B x H x M x (L+N)
            joint = torch.cat([joint[..., :L] * mask, joint[..., L:]], dim=-1)  # the span masks the context
            joint = joint / (joint.sum(-1, keepdim=True) + eps)
            out = _skew(joint[..., :L].reshape(B * Hh, M, L), 0) @ v
            out = out + torch.einsum("bhmn,hnd->bhmd", joint[..., L:], v_pers).reshape(B * Hh, M, Dh)
        outs.append(attn.out_proj(out.view(B, Hh, M, Dh).transpose(1, 2).reshape(B, M, D)))
        h_cache = h_all[:, -S:].detach()
    return outs


def official_attention(max_span, ramp, spans, persistent=0):
    attn = span_attention(max_span=max_span, ramp=ramp, spans=spans, persistent=persistent)
    attn.cfg.span_window = "official"
    with torch.no_grad():
        attn.kv_proj.bias.normal_()  # a zero state's key and value are then not zero: the cache must be there
    return attn


OFFICIAL_CASES = {  # name: (max_span S, ramp R, spans, persistent slots, block lengths)
    "spans-inside": (16, 4, [3.5, 9.0], 0, [6, 6, 6, 6]),  # blocks shorter than S: the zero cache lasts
    "full-span": (16, 4, [16.0, 12.0], 0, [20, 5, 9]),  # blocks longer than S
    "trimmed": (256, 8, [12.0, 40.0], 0, [32, 32, 32, 32, 32]),  # window 64 < S: trimmed keys and cache
    "all-attention": (16, 4, [5.0, 14.0], 3, [7, 7, 7]),
}


@pytest.mark.parametrize("case", sorted(OFFICIAL_CASES))
def test_official_window_is_the_official_computation(case):
    """--span-window official == the official code's computation, block by block with the cache, values
    and gradients (every parameter, the spans included, and the inputs). Before issue 16 the window was
    x_t .. x_(t-S+1) without a zero start cache: 100% of the outputs differed."""
    S, R, spans, persistent, lengths = OFFICIAL_CASES[case]
    attn = official_attention(S, R, spans, persistent)
    blocks = [torch.randn(B, n, D, dtype=torch.float64, requires_grad=True) for n in lengths]
    outs, mem = [], None
    for x in blocks:
        out, mem = attn(x, mem, keep=S)
        outs.append(out)
        mem = mem.detach()
    reference = official_reference(attn, blocks)
    for a, b in zip(outs, reference):
        torch.testing.assert_close(a, b, **EXACT64)
    probes = [torch.randn_like(o) for o in outs]
    wrt = [*attn.parameters(), *blocks]
    ours = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes)), wrt, allow_unused=True)
    ref = torch.autograd.grad(sum((o * p).sum() for o, p in zip(reference, probes)), wrt, allow_unused=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **EXACT64)
    names = [name for name, _ in attn.named_parameters()]
    assert ours[names.index("span_fraction")].abs().sum() > 0  # the spans get their gradient


def test_official_window_starts_from_zero_states():
    """The first query sees only zero states, not itself: its output is the zero state's value (V of a zero
    vector: the bias) whatever its input; later inputs change only later outputs."""
    attn = official_attention(16, 4, [16.0, 16.0])
    x = torch.randn(B, 5, D, dtype=torch.float64)
    with torch.no_grad():
        out, _ = attn(x, None, keep=0)
        changed = x.clone()
        changed[:, 3] += 1.0  # position 3: only queries 3 (its query) and 4 may change
        out2, _ = attn(changed, None, keep=0)
        value_of_zero = attn.kv_proj.bias.chunk(2)[1]  # V of a zero state: the bias
        first = attn.out_proj(value_of_zero)  # every weight on a zero state: out = W_o v_0 + b_o
    torch.testing.assert_close(out[:, 0], first.expand(B, D), rtol=0, atol=1e-7)  # weights sum to 1 / (1 + 1e-8)
    torch.testing.assert_close(out2[:, :3], out[:, :3], **EXACT64)
    assert not torch.allclose(out2[:, 4], out[:, 4])


def test_official_window_step_by_step_equals_parallel():
    attn = official_attention(16, 4, [6.0, 11.0], persistent=2)
    x = torch.randn(B, 23, D, dtype=torch.float64)
    with torch.no_grad():
        parallel, _ = attn(x, None, keep=0)
        steps, mem = [], None
        for t in range(x.size(1)):
            out, mem = attn(x[:, t : t + 1], mem, keep=None)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, **EXACT64)


@pytest.mark.parametrize("grad", [False, True], ids=["eval: cached K/V", "train: recomputed"])
def test_official_window_with_a_short_memory_pads_zeros(grad):
    """--mem-len k shorter than the window: the official trim_memory pads the cache with zeros, so each
    segment == one pass over [the last k positions; segment] from a zero cache; the no-gradient path pads
    its cached keys/values with those of the zero state."""
    attn = official_attention(16, 4, [9.0, 14.0])
    segments = [torch.randn(B, n, D, dtype=torch.float64) for n in (5, 1, 4, 2)]
    seen, start, mem = torch.cat(segments, dim=1), 0, None
    with torch.set_grad_enabled(grad):
        for x in segments:
            out, mem = attn(x, mem, keep=3)
            past = seen[:, max(start - 3, 0) : start]
            reference, _ = attn(torch.cat([past, x], dim=1), None, keep=0)
            torch.testing.assert_close(out, reference[:, past.size(1) :], **EXACT64)
            assert mem.length == 3
            start += x.size(1)


def test_the_two_windows_differ(lm):
    """Same weights, --span-window official vs inclusive: different models (not a re-indexing)."""
    model = lm(**ADAPTIVE, max_span=16, span_ramp=4, mem_len=16).eval()
    official = lm(**ADAPTIVE, max_span=16, span_ramp=4, mem_len=16, span_window="official").eval()
    official.load_state_dict(model.state_dict())
    tokens = torch.randint(4, V, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[0], official(tokens)[0], atol=1e-3)


# ---- persistent memory / all-attention -------------------------------------------------------------
def reference_persistent_attention(attn, x):
    """softmax over [K_pers * sqrt(Dh); causal keys] of q.k / sqrt(Dh), values [V_pers * sqrt(N); V]."""
    T, Dh, N = x.size(1), D // H, attn.persistent.size
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
    k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in attn.kv_proj(x).chunk(2, dim=-1))
    k = torch.cat([attn.persistent.key.expand(B, H, N, Dh) * math.sqrt(Dh), k], dim=2)
    v = torch.cat([attn.persistent.value.expand(B, H, N, Dh) * math.sqrt(N), v], dim=2)
    allowed = torch.cat([torch.ones(T, N, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~allowed, float("-inf")).softmax(-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("name", ["full", "naive"])
def test_persistent_memory_is_the_formula(name):
    torch.manual_seed(0)
    options = SimpleNamespace(persistent_mem_size=5)
    attn = build_attention(name, D, H, dropout=0.0, options=options).to(torch.float64)
    x = torch.randn(B, 7, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x, None, keep=0)[0], reference_persistent_attention(attn, x), **EXACT64)


@pytest.mark.parametrize("name", ["full", "relative", "adaptive_span"])
def test_persistent_memory_changes_outputs_and_learns(name):
    def make(n):
        torch.manual_seed(0)
        options = SimpleNamespace(persistent_mem_size=n, pos_emb="relative" if name != "full" else "none")
        return build_attention(name, D, H, dropout=0.0, options=options).to(torch.float64)

    plain, with_slots = make(0), make(4)
    with_slots.load_state_dict(plain.state_dict(), strict=False)  # same weights but the slots
    assert plain.persistent is None and with_slots.persistent.key.shape == (H, 4, D // H)
    x = torch.randn(B, 6, D, dtype=torch.float64)
    _, mem = with_slots(x, None, keep=6)
    out, _ = with_slots(torch.randn(B, 3, D, dtype=torch.float64), mem, keep=6)
    assert not torch.allclose(with_slots(x, None, keep=0)[0], plain(x, None, keep=0)[0])
    out.square().sum().backward()
    for p in (with_slots.persistent.key, with_slots.persistent.value):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_all_attention_layers_have_no_feed_forward(lm):
    model = lm(**ADAPTIVE, max_span=64, persistent_mem_size=8, decoder_ffn_embed_dim=0)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if ".ffn" in n or "fc1" in n or "fc2" in n], names
    assert sum("persistent.key" in n for n in names) == 2  # one set per layer
    assert all(layer.ffn is None and layer.ffn_norm is None for layer in model.decoder.layers)
    with_ffn = lm(**ADAPTIVE, max_span=64, persistent_mem_size=8)
    assert any("ffn.fc1" in n for n, _ in with_ffn.named_parameters())


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(**ADAPTIVE, max_span=64, span_ramp=100), "--span-ramp 100 must be between 1 and --max-span 64"),
        (dict(**ADAPTIVE, span_init=1.5), "--span-init"),
        (dict(**ADAPTIVE, span_loss_weight=-1.0), "--span-loss-weight"),
        (
            dict(**ADAPTIVE, span_window="exclusive"),
            "unknown --span-window 'exclusive': choose one of inclusive, official",
        ),
        (dict(attention="adaptive_span", pos_emb="sinusoidal"), "encodes positions itself: use --pos-emb relative"),
        (dict(attention="adaptive_span", pos_emb="learned"), "encodes positions itself: use --pos-emb relative"),
        (dict(persistent_mem_size=-3), "--persistent-mem-size must be >= 0"),
    ],
)
def test_bad_options_are_user_errors(lm_config, overrides, message):
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        validate_config(lm_config(**overrides))


def test_persistent_memory_is_refused_where_the_attention_has_none(lm_config):
    @register_attention("no_slots_probe")
    class NoSlots(Attention):
        pass

    try:
        with pytest.raises(UserError, match="has no persistent memory: use one of adaptive_span, "):
            validate_config(lm_config(attention="no_slots_probe", persistent_mem_size=4))
    finally:
        ATTENTION_REGISTRY.pop("no_slots_probe")


# ---- end to end: fairseq-train + fairseq-eval-lm on PTB characters, the plot --------------------------
@pytest.fixture(scope="module")
def ptb_chars(tmp_path_factory):
    if not (SHARED / "ptb" / "ptb.train.txt.xz").exists():
        pytest.skip(f"{SHARED} (the shared PTB data) is not available")
    tmp = tmp_path_factory.mktemp("ptb_chars")
    splits = []
    for split, lines in (("train", 600), ("valid", 60), ("test", 60)):
        with lzma.open(SHARED / "ptb" / f"ptb.{split}.txt.xz", "rt") as f:
            text = "".join(line for _, line in zip(range(lines), f))
        (tmp / f"{split}.txt").write_text(text)
        splits += [f"--{split}", tmp / f"{split}.txt"]
    subprocess.run([sys.executable, "-m", "preprocess.text", *splits, "--level", "char", "--out", tmp / "bin"],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    return tmp / "bin"


@pytest.mark.cli
def test_recipe_trains_evaluates_and_plots_on_ptb_chars(ptb_chars, tmp_path):
    """recipes/adaptive_span/run.sh ptb_chars_all_attention (adaptive span + persistent memory, no FFN,
    Adagrad), a strong span
    penalty so the spans hit 0 and must be clamped; eval-lm reproduces the validation loss; spans logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DATA": str(ptb_chars),
           "SAVE": str(tmp_path), "FAIRSEQ_TRAIN": str(BIN / "fairseq-train"),
           "FAIRSEQ_EVAL_LM": str(BIN / "fairseq-eval-lm")}  # fmt: skip
    recipe = str(ROOT / "recipes" / "adaptive_span" / "run.sh")
    small = ["--max-update", "12", "--batch-size", "4", "--tokens-per-sample", "48", "--span-loss-weight", "0.01",
             "--log-interval", "4", "--num-workers", "0", "--warmup-updates", "2", "--seed", "1"]  # fmt: skip
    train = subprocess.run(["bash", recipe, "ptb_chars_all_attention", "train", *small], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "span_l0" in train.stdout and "span_max_l1" in train.stdout and "aux_span" in train.stdout
    valid = [line for line in train.stdout.splitlines() if "valid on 'valid' subset" in line][-1]
    valid_bpc = float(valid.split(" bpc ")[1].split()[0])

    state = load_checkpoint(tmp_path / "checkpoint_last.pt")
    spans = [v for k, v in state["model"].items() if k.endswith("span_fraction")]
    assert len(spans) == 2 and all(((s >= 0) & (s <= 1)).all() for s in spans)
    assert any((s == 0).any() for s in spans)  # the penalty drove spans below 0: they were clamped
    assert not any("ffn" in k for k in state["model"])

    evaluated = subprocess.run(["bash", recipe, "ptb_chars_all_attention", "eval", "--cpu", "--gen-subset", "valid",
                                "--batch-size", "4", "--tokens-per-sample", "48"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    output = evaluated.stdout + evaluated.stderr
    assert evaluated.returncode == 0, output[-2000:]
    loss = float(output.split("Loss (base 2): ")[1].split(",")[0])
    assert abs(loss - valid_bpc) < 6e-4, (loss, valid_bpc)

    layers, max_span = load_spans(tmp_path / "checkpoint_last.pt")
    assert max_span == 256 and len(layers) == 2 and all(len(h) == 4 for h in layers)
    main([str(tmp_path / "checkpoint_last.pt"), "--out", str(tmp_path / "spans.png")])
    assert (tmp_path / "spans.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_match_the_official_scripts():
    from fairseq.models import ARCH_CONFIG_REGISTRY

    def preset(name):
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[name](args)
        return args

    small = preset("adaptive_span_enwik8_small")
    assert (small.decoder_layers, small.decoder_embed_dim, small.decoder_ffn_embed_dim) == (12, 512, 2048)
    assert (small.max_span, small.mem_len, small.span_ramp, small.attention) == (8192, 8192, 32, "adaptive_span")
    large = preset("all_attention_enwik8_large")
    assert (large.decoder_layers, large.decoder_ffn_embed_dim, large.persistent_mem_size) == (36, 0, 2048)
    wt103 = preset("all_attention_wt103")
    assert (wt103.max_span, wt103.persistent_mem_size, wt103.adaptive_input) == (2048, 2048, True)
    for name in ("adaptive_span_tiny", "adaptive_span_enwik8_large", "adaptive_span_text8_small",
                 "adaptive_span_text8_large", "all_attention_tiny", "all_attention_enwik8_small"):  # fmt: skip
        args = preset(name)
        assert args.attention == "adaptive_span" and args.pos_emb == "relative"
    # the official window in the presets copied from the official scripts, the project's elsewhere
    official = [name for name in ARCH_CONFIG_REGISTRY if name.startswith(("adaptive_span_", "all_attention_"))]
    for name in official:
        expected = "inclusive" if name.endswith("_tiny") else "official"
        assert getattr(preset(name), "span_window", "inclusive") == expected, name
    assert len(official) == 9
    cfg = EfficientLMConfig()
    assert cfg.span_window == "inclusive"  # the option's default


@pytest.mark.parametrize(
    "arch,published",
    [("adaptive_span_enwik8_small", 38e6), ("adaptive_span_enwik8_large", 209e6),
     ("all_attention_enwik8_small", 39e6), ("all_attention_enwik8_large", 114e6)],
)  # fmt: skip
def test_preset_sizes_match_the_papers(lm_config, task_stub, arch, published):
    """Parameters on a byte vocabulary (built on the meta device: shapes only) vs the papers' counts."""
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from plugins.models.efficient_lm import EfficientLM

    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    cfg = lm_config(**vars(args), tokens_per_sample=512, max_target_positions=512)
    bytes_dict = Dictionary()
    for byte in range(256):
        bytes_dict.add_symbol(str(byte))
    with torch.device("meta"):
        model = EfficientLM.build_model(cfg, task_stub(bytes_dict))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - published) / published < 0.03, params

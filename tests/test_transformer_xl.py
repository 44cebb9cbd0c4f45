"""Transformer-XL (Dai et al. 2019, arXiv 1901.02860; issue 3): relative positional attention, segment-level
recurrence keyed by ``stream_offset``, the memory in checkpoints, generation with memory, presets.

References written here, not taken from the plugin:
- ``reference_relative_attention``: Sec. 3.3 with explicit distances (no shift trick), float64:
  A_ij = (q_i + u)^T k_j + (q_i + v)^T W_R r_(i-j), scaled by 1/sqrt(Dh), softmax over the allowed keys;
- ``reference_forward``: the whole model in ONE pass over a long sequence, every query restricted to the
  window that segment-level recurrence gives it (an explicit T x S band mask), so "segments with memory ==
  one pass" is checked for tokens_per_sample <, =, > mem_len (kimiyoung/transformer-xl#59), clamp_len and
  same_length.

The last section runs the REAL fairseq-train (4 subprocesses, ~50 s of CPU; 25-100 s wall): resuming from a checkpoint continues
exactly as an uninterrupted run, and would not without the saved memory. Deselect it with ``-m "not cli"``.

Shapes: B = batch (streams), T = segment / queries, M = mem_len, S = keys (M + T), L = whole sequence,
D = model dim, H = heads, Dh = head dim.
"""

import argparse
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY
from fairseq_cli import preprocess

from plugins.attention import build_attention
from plugins.attention.relative import RelativeAttention, relative_shift, same_length_mask
from plugins.errors import UserError
from plugins.models.efficient_lm import EfficientLMConfig, validate_config

ROOT = Path(__file__).resolve().parents[1]
V = 24  # conftest's dictionary: 4 specials + 20 words
EXACT64 = dict(rtol=0, atol=1e-10)  # float64: only summation order differs
FP32 = dict(rtol=0, atol=1e-5)
XL = dict(attention="relative", pos_emb="relative")


def tokens(B: int, L: int) -> torch.Tensor:
    return torch.randint(4, V, (B, L))  # no special symbols


def xl_lm(lm, **overrides):
    """A tiny Transformer-XL (conftest sizes: 2 layers, D 16, H 2, dropout 0) built by build_model."""
    return lm(**{**XL, **overrides})


def preset_lm(lm, arch: str, **overrides):
    """``efficient_lm`` with the defaults of preset ``arch`` (what ``--arch`` does), ``overrides`` winning."""
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return lm(**vars(args))


def run_segments(model, toks: torch.Tensor, T: int) -> torch.Tensor:
    """Feed ``toks`` (B x L) as consecutive segments of T with their stream offsets (as segment_lm does)."""
    return torch.cat([model(toks[:, s : s + T], stream_offset=s)[0] for s in range(0, toks.size(1), T)], dim=1)


# ---- references ---------------------------------------------------------------------------------------
def sinusoid_formula(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """r_d (Vaswani et al. 2017 Sec. 3.5) in Transformer-XL's [sin | cos] layout, float64: L x D."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    angles = distances.double()[:, None] / 10000 ** (2 * i / dim)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def reference_relative_attention(attn: RelativeAttention, x, mem, allowed: torch.Tensor) -> torch.Tensor:
    """Dai et al. Sec. 3.3 for T queries (the last T of the S = M + T keys) over ``[mem; x]``, with the T x S
    boolean mask ``allowed``. Uses the attention's weights (W_q, W_k, W_v, W_R, u, v, W_o) and its
    sinusoid table (checked against the formula in test_sinusoid_table_is_the_formula)."""
    ctx = x if mem is None else torch.cat([mem, x], dim=1)  # B x S x D
    B, T, D = x.shape
    S, H, Dh = ctx.size(1), attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, Dh)
    k, v = (t.view(B, S, H, Dh) for t in attn.kv_proj(ctx).chunk(2, dim=-1))  # B x S x H x Dh
    distance = (S - T + torch.arange(T))[:, None] - torch.arange(S)[None, :]  # T x S: i - j (query i at S-T+i)
    distance = distance.clamp(min=0)  # future keys are masked anyway
    if attn.cfg.clamp_len > 0:
        distance = distance.clamp(max=attn.cfg.clamp_len)
    w_r = attn.r_proj(attn.sinusoid(torch.arange(S), x.dtype)).view(S, H, Dh)  # W_R r_d, d = 0..S-1
    content = torch.einsum("bthd,bshd->bhts", q + attn.u, k)  # (a) + (c)
    position = torch.einsum("bthd,tshd->bhts", q + attn.v, w_r[distance])  # (b) + (d)
    scores = (content + position) / math.sqrt(Dh)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # B x H x T x S
    return attn.out_proj(torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, D))


def causal(T: int, S: int) -> torch.Tensor:
    return torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]


def same_length_window(T: int, S: int, window: int) -> torch.Tensor:
    """Query i (key position S-T+i) sees exactly the ``window`` keys ending at itself."""
    query = (S - T + torch.arange(T))[:, None]
    key = torch.arange(S)[None, :]
    return (key <= query) & (key > query - window)


def recurrence_window(L: int, T: int, M: int, same_length: bool = False) -> torch.Tensor:
    """L x L: the keys position p sees when the sequence runs in segments of T with memory M: the M
    positions before its segment and its segment up to itself (same_length: the M keys ending at p)."""
    p, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    if same_length:
        return (j <= p) & (j > p - M)
    return (j <= p) & (j >= (p // T) * T - M)


def reference_forward(model, toks: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The decoder in one pass over ``toks`` (B x L) with every attention restricted to ``allowed`` (L x L):
    embeddings (relative positions add nothing at the input), pre/post-norm layers, final norm, logits."""
    dec = model.decoder
    assert dec.positions is None and all(layer.ffn is not None for layer in dec.layers)
    x = dec.embed_scale * dec.embed_tokens(toks)
    for i in range(dec.num_layers):
        layer = dec.layers[i % len(dec.layers)]

        def attn(h, layer=layer):
            return reference_relative_attention(layer.attn, h, None, allowed)

        if layer.normalize_before:
            x = x + attn(layer.attn_norm(x))
            x = x + layer.ffn(layer.ffn_norm(x))
        else:
            x = layer.attn_norm(x + attn(x))
            x = layer.ffn_norm(x + layer.ffn(x))
    if dec.final_norm is not None:
        x = dec.final_norm(x)
    return dec.output_layer(x)


# ---- relative attention: the formula --------------------------------------------------------------------
def make_attention(clamp_len=0, same_length=False, untie_r=False, D=16, H=2) -> RelativeAttention:
    options_ = SimpleNamespace(clamp_len=clamp_len, same_length=same_length, untie_r=untie_r, pos_emb="relative")
    attn = build_attention("relative", D, H, dropout=0.0, options=options_).double().eval()
    with torch.no_grad():  # u, v far from 0 (their init is N(0, 0.02)) so that a wrong bias term shows
        attn.u.normal_()
        attn.v.normal_()
    return attn


def test_sinusoid_table_is_the_formula():
    attn = make_attention()
    d = torch.arange(80)
    torch.testing.assert_close(attn.sinusoid(d).double(), sinusoid_formula(d, 16), rtol=0, atol=2e-5)  # float32
    torch.testing.assert_close(attn.sinusoid(d, torch.float64), sinusoid_formula(d, 16), rtol=0, atol=1e-13)


@pytest.mark.parametrize("T, S", [(1, 1), (4, 4), (3, 7), (5, 6), (1, 9)])
def test_relative_shift_is_the_direct_realignment(T, S):
    """Column s of the input is distance S-1-s; output[t, j] must be the column of distance S-T+t-j (query
    t sits at key position S-T+t), and distance 0's column for future keys (masked later)."""
    scores = torch.randn(2, 3, T, S, dtype=torch.float64)
    shifted = relative_shift(scores)
    assert shifted.shape == scores.shape
    for t in range(T):
        for j in range(S):
            distance = S - T + t - j
            column = S - 1 - distance if distance >= 0 else S - 1
            assert torch.equal(shifted[..., t, j], scores[..., t, column]), (t, j)


ATTENTION_CASES = {  # name: (options, len(x1), len(x2), keep)
    "no-memory": (dict(), 6, 0, 0),
    "memory": (dict(), 7, 4, 7),
    "memory-longer-than-segment": (dict(), 3, 2, 8),
    "memory-shorter-than-segment": (dict(), 7, 5, 3),
    "clamp-len": (dict(clamp_len=2), 7, 4, 6),
    "same-length": (dict(same_length=True), 7, 4, 5),
    "same-length-short-memory": (dict(same_length=True), 3, 6, 4),
    "same-length-clamp": (dict(same_length=True, clamp_len=3), 6, 3, 6),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_relative_attention_is_the_formula_of_the_paper(case):
    """Both calls of a segment pair (x1 without memory, x2 with x1's memory) against the reference,
    float64; same_length: every query sees exactly ``keep`` keys (fewer only where there are fewer)."""
    opts, T1, T2, keep = ATTENTION_CASES[case]
    attn = make_attention(**opts)
    x1, x2 = torch.randn(2, T1, 16, dtype=torch.float64), torch.randn(2, T2, 16, dtype=torch.float64)
    window = opts.get("same_length") and keep
    with torch.no_grad():
        out1, mem = attn(x1, None, keep=keep)
        mask1 = same_length_window(T1, T1, keep) if window else causal(T1, T1)
        torch.testing.assert_close(out1, reference_relative_attention(attn, x1, None, mask1), **EXACT64)
        if not T2:
            return
        assert mem.length == min(T1, keep)
        torch.testing.assert_close(mem.hidden, x1[:, -keep:], rtol=0, atol=0)
        out2, _ = attn(x2, mem, keep=keep)
        S = mem.length + T2
        mask2 = same_length_window(T2, S, keep) if window else causal(T2, S)
        torch.testing.assert_close(out2, reference_relative_attention(attn, x2, mem.hidden, mask2), **EXACT64)
        if window:  # every query sees exactly `keep` keys (all it has, if fewer), and that is not causal
            assert mask2.sum(-1).tolist() == [min(keep, S - T2 + t + 1) for t in range(T2)]
            assert not torch.allclose(out2, reference_relative_attention(attn, x2, mem.hidden, causal(T2, S)))


@pytest.mark.parametrize("T, S, window", [(4, 9, 5), (4, 9, 2), (6, 6, 3), (3, 5, 8)])
def test_same_length_mask_is_the_window_ending_at_each_query(T, S, window):
    mask = same_length_mask(T, S, window)
    for t in range(T):
        query = S - T + t
        assert mask[t].nonzero().flatten().tolist() == list(range(max(query - window + 1, 0), query + 1))


def test_every_term_of_the_score_matters():
    """Zeroing u, v, or W_R changes the output: the reference comparison is not vacuous."""
    attn = make_attention(clamp_len=0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        out, _ = attn(x, None, keep=0)
        for p in (attn.u, attn.v, attn.r_proj.weight):
            saved = p.clone()
            p.zero_()
            assert not torch.allclose(attn(x, None, keep=0)[0], out, atol=1e-6)
            p.copy_(saved)


# ---- the model: segments with memory == one pass with the equivalent window ------------------------------
MODEL_CASES = {  # name: (tokens_per_sample T, mem_len M, sequence L, options)
    "T<M": (4, 6, 19, dict()),
    "T>M": (6, 4, 19, dict()),
    "T=M": (5, 5, 20, dict()),
    "M>2T": (3, 8, 17, dict(decoder_normalize_before=True)),
    "T>2M": (8, 3, 21, dict(decoder_normalize_before=True)),
    "clamp-len": (4, 6, 19, dict(clamp_len=3)),
    "same-length-T<M": (4, 6, 19, dict(same_length=True)),
    "same-length-T>M": (6, 4, 19, dict(same_length=True, clamp_len=2)),
    "untie-r": (5, 3, 14, dict(untie_r=True, decoder_layers=3)),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_segments_with_memory_equal_one_pass_with_the_window(lm, case):
    """kimiyoung/transformer-xl#59: tokens_per_sample != mem_len must still give every position the M
    keys before its segment. float64, dropout 0; the reference never splits the sequence."""
    T, M, L, opts = MODEL_CASES[case]
    model = xl_lm(lm, mem_len=M, **opts).double().eval()
    with torch.no_grad():
        for layer in model.decoder.layers:  # biases far from 0 so that they matter
            layer.attn.u.normal_()
            layer.attn.v.normal_()
        toks = tokens(2, L)
        segmented = run_segments(model, toks, T)
        window = recurrence_window(L, T, M, opts.get("same_length", False))
        reference = reference_forward(model, toks, window)
        torch.testing.assert_close(segmented, reference, **EXACT64)
        # the window is what the segments saw: the plain causal pass (all the past) differs
        assert not torch.allclose(segmented, reference_forward(model, toks, causal(L, L)), atol=1e-6)


@pytest.mark.parametrize("T", [8, 5])
def test_xl_tiny_segments_equal_one_call_when_memory_covers_everything(lm, T):
    """float32 xl_tiny: with mem_len >= L, segments of T == one call over the whole sequence (to 1e-5)."""
    model = preset_lm(lm, "xl_tiny", mem_len=48).eval()
    toks = tokens(3, 24)
    with torch.no_grad():
        whole, _ = model(toks)  # no stream_offset: one pass, no memory
        torch.testing.assert_close(run_segments(model, toks, T), whole, **FP32)


def test_segment_lm_batches_equal_one_pass(xl_task):
    """The task's own batches (stream_offset from SegmentStreamDataset) through an xl_tiny model built by
    fairseq from --arch xl_tiny: segment by segment == one pass over each stream (mem_len covers it)."""
    task, model = xl_task
    ds = task.dataset("valid")
    batches = [ds[i] for i in range(3)]
    with torch.no_grad():
        task.begin_valid_epoch(1, model)
        segmented = torch.cat([model(**b["net_input"])[0] for b in batches], dim=1)
        whole = torch.cat([b["net_input"]["src_tokens"] for b in batches], dim=1)
        model.reset_memory()
        reference, _ = model(whole)
    assert [b["net_input"]["stream_offset"] for b in batches] == [0, 16, 32]
    torch.testing.assert_close(segmented, reference, **FP32)


# ---- position biases u, v -------------------------------------------------------------------------------
def _biases(model):
    return [(layer.attn.u, layer.attn.v) for layer in model.decoder.layers]


@pytest.mark.parametrize("untie_r", [False, True], ids=["shared", "untied"])
def test_position_biases_shared_across_layers_unless_untied(lm, untie_r):
    model = xl_lm(lm, decoder_layers=3, untie_r=untie_r)
    (u0, v0), *rest = _biases(model)
    names = [n for n, _ in model.named_parameters() if n.endswith((".u", ".v"))]
    if untie_r:
        assert all(u is not u0 and v is not v0 for u, v in rest)
        assert len(names) == 6
    else:  # one Parameter object, listed once (what the optimizer and DDP see)
        assert all(u is u0 and v is v0 for u, v in rest)
        assert names == ["decoder.layers.0.attn.u", "decoder.layers.0.attn.v"]
        assert sum(p is u0 for p in model.parameters()) == 1
    extra = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in xl_lm(lm, decoder_layers=3, untie_r=False).parameters()
    )
    assert extra == (2 * 2 * 16 if untie_r else 0)  # 2 more layers x (u, v) x H x Dh

    # every layer's use of the shared bias reaches its gradient
    model.train()(tokens(2, 5))[0].logsumexp(-1).sum().backward()
    assert u0.grad is not None and u0.grad.abs().sum() > 0 and v0.grad.abs().sum() > 0


@pytest.mark.parametrize("untie_r", [False, True], ids=["shared", "untied"])
def test_state_dict_roundtrip_keeps_the_biases(lm, untie_r):
    model = xl_lm(lm, decoder_layers=3, untie_r=untie_r, seed=0).eval()
    with torch.no_grad():
        for u, v in _biases(model):
            u.normal_()
            v.normal_()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    other = xl_lm(lm, decoder_layers=3, untie_r=untie_r, seed=1).eval()
    other.load_state_dict(state)  # strict
    for (u, v), (u2, v2) in zip(_biases(model), _biases(other)):
        assert torch.equal(u, u2) and torch.equal(v, v2)
    if not untie_r:
        (u0, v0), *rest = _biases(other)
        assert all(u is u0 and v is v0 for u, v in rest)  # still one Parameter after loading
    x = tokens(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(other(x)[0], model(x)[0], rtol=0, atol=0)


# ---- memory: no gradient, resets, streams ---------------------------------------------------------------
def test_no_gradient_flows_into_memory(lm):
    model = xl_lm(lm, mem_len=6).double().train()  # dropout 0
    embedded = []
    model.decoder.embed_tokens.register_forward_hook(lambda module, args, out: embedded.append(out))
    seg1, seg2 = tokens(2, 5), tokens(2, 4)

    model(seg1, stream_offset=0)
    for layer in model.decoder.stream_memory["train"].layers:
        assert not layer.hidden.requires_grad and layer.hidden.grad_fn is None
    out2, _ = model(seg2, stream_offset=5)
    assert model.decoder.stream_memory["train"].position == 9  # segment 2 did continue segment 1
    (grad,) = torch.autograd.grad(out2.logsumexp(-1).sum(), embedded[0], allow_unused=True)
    assert grad is None or torch.all(grad == 0)

    # control: in one pass over both segments the same loss does reach segment 1's inputs
    out, _ = model(torch.cat([seg1, seg2], dim=1))
    (grad,) = torch.autograd.grad(out[:, 5:].logsumexp(-1).sum(), embedded[-1])
    assert grad[:, :5].abs().sum() > 0


def test_memory_is_reset_at_validation_start_and_at_offset_zero(xl_task):
    task, model = xl_task
    ds = task.dataset("valid")
    b0, b1 = ds[0]["net_input"], ds[1]["net_input"]
    with torch.no_grad():
        model.reset_memory()
        alone, _ = model.eval()(**{**b1, "stream_offset": None})  # b1 with no memory at all
        model.train()(**b0)  # training memory (dropout 0 in xl_tiny)
        task.begin_valid_epoch(1, model)
        model.eval()
        first0, _ = model(**b0)
        first1, _ = model(**b1)
        assert not torch.allclose(first1, alone, atol=1e-4)  # b1 used b0's memory
        assert model.decoder.stream_memory["eval"].position == 32
        train_memory = model.decoder.stream_memory["train"]

        task.begin_valid_epoch(2, model)  # validation start: the eval memory is gone, training's is kept
        assert set(model.decoder.stream_memory) == {"train"}
        assert model.decoder.stream_memory["train"] is train_memory
        torch.testing.assert_close(model(**b1)[0], alone, rtol=0, atol=0)  # nothing left to continue

        model(**b0)
        model(**b1)  # memory ends at 32
        again0, _ = model(**b0)  # offset 0 (a new pass / epoch): fresh, not continuing from 32
        torch.testing.assert_close(again0, first0, rtol=0, atol=0)
        torch.testing.assert_close(model(**b1)[0], first1, rtol=0, atol=0)  # a second pass == the first


def test_two_streams_never_see_each_other(lm):
    model = xl_lm(lm, mem_len=6).double().eval()
    seg1, seg2 = tokens(2, 5), tokens(2, 4)
    perturbed = seg1.clone()
    perturbed[0] = tokens(1, 5)[0]
    assert not torch.equal(perturbed[0], seg1[0])
    with torch.no_grad():
        out1, out2 = model(seg1, stream_offset=0)[0], model(seg2, stream_offset=5)[0]
        p1, p2 = model(perturbed, stream_offset=0)[0], model(seg2, stream_offset=5)[0]
    torch.testing.assert_close(p1[1], out1[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(p2[1], out2[1], rtol=0, atol=1e-12)  # row 1 never saw row 0's memory
    assert not torch.allclose(p2[0], out2[0], atol=1e-6)  # row 0 did see its own


# ---- memory in checkpoints ------------------------------------------------------------------------------
def _saved(model) -> dict:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_holds_and_restores_the_training_memory(lm):
    model = xl_lm(lm, mem_len=6, seed=0).train()
    seg1, seg2 = tokens(2, 5), tokens(2, 4)
    model(seg1, stream_offset=0)
    live = model.decoder.stream_memory["train"]
    state = _saved(model)
    extra = state["decoder._extra_state"]
    assert extra["rank"] == [0, 1]  # [rank, world size] of the saving process
    assert extra["train_memory"]["position"] == 5
    assert len(extra["train_memory"]["layers"]) == 2
    for saved, layer in zip(extra["train_memory"]["layers"], live.layers):
        assert torch.equal(saved["hidden"], layer.hidden)

    fresh = xl_lm(lm, mem_len=6, seed=1).train()
    fresh.load_state_dict(state)
    restored = fresh.decoder.stream_memory["train"]
    assert restored.position == 5
    for a, b in zip(restored.layers, live.layers):
        assert torch.equal(a.hidden, b.hidden)
    expected, _ = model(seg2, stream_offset=5)
    torch.testing.assert_close(fresh(seg2, stream_offset=5)[0], expected, rtol=0, atol=0)  # continues exactly
    without = dict(state, **{"decoder._extra_state": dict(state["decoder._extra_state"], train_memory=None)})
    no_memory = xl_lm(lm, mem_len=6, seed=1).train()
    no_memory.load_state_dict(without)
    assert no_memory.decoder.stream_memory == {}
    assert not torch.allclose(no_memory(seg2, stream_offset=5)[0], expected, atol=1e-4)  # the memory mattered


def test_eval_memory_is_not_saved(lm):
    model = xl_lm(lm, mem_len=6).eval()
    with torch.no_grad():
        model(tokens(2, 5), stream_offset=0)
    assert set(model.decoder.stream_memory) == {"eval"}
    state = _saved(model)
    assert state["decoder._extra_state"]["train_memory"] is None
    target = xl_lm(lm, mem_len=6).train()
    target(tokens(2, 5), stream_offset=0)
    target.load_state_dict(state)
    assert target.decoder.stream_memory == {}  # loading a checkpoint replaces the memory, never mixes


def test_memory_of_another_worker_is_not_restored(lm, caplog):
    model = xl_lm(lm, mem_len=6).train()
    model(tokens(2, 5), stream_offset=0)
    state = _saved(model)
    state["decoder._extra_state"]["rank"] = [1, 2]  # saved by rank 1 of 2
    fresh = xl_lm(lm, mem_len=6)
    with caplog.at_level("INFO"):
        fresh.load_state_dict(state)  # here: one process
    assert fresh.decoder.stream_memory == {}
    assert any("saved by 2 process(es), this run has 1" in r.getMessage() for r in caplog.records)


# ---- generation ---------------------------------------------------------------------------------------
def step_by_step(model, toks: torch.Tensor, state=None, start: int = 1) -> torch.Tensor:
    """Growing prefixes with one incremental_state (as SequenceGenerator feeds them): B x (L-start+1) x V."""
    state = {} if state is None else state
    return torch.cat([model(toks[:, :t], incremental_state=state)[0] for t in range(start, toks.size(1) + 1)], 1)


def test_step_by_step_logits_equal_the_full_forward(lm):
    model = preset_lm(lm, "xl_tiny").eval()  # mem_len 64 >= 12
    toks = tokens(3, 12)
    with torch.no_grad():
        full, _ = model(toks)
        torch.testing.assert_close(step_by_step(model, toks), full, **FP32)


def test_step_by_step_with_a_bounded_memory_sees_mem_len_past_tokens(lm):
    """mem_len 3 < L: token by token is segments of 1, so position p sees keys p-3..p (float64 reference)."""
    model = xl_lm(lm, mem_len=3, clamp_len=2).double().eval()
    toks = tokens(2, 9)
    with torch.no_grad():
        steps = step_by_step(model, toks)
        torch.testing.assert_close(steps, reference_forward(model, toks, recurrence_window(9, 1, 3)), **EXACT64)


def test_beam_reorder_reorders_the_memory(lm):
    model = preset_lm(lm, "xl_tiny").eval()
    toks = tokens(3, 7)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = {}
        step_by_step(model, toks[:, :4], state)
        before = model.decoder.get_incremental_state(state, "state")
        model.decoder.reorder_incremental_state_scripting(state, order)  # what SequenceGenerator calls
        after = model.decoder.get_incremental_state(state, "state")
        assert after.position == before.position == 4
        for a, b in zip(after.layers, before.layers):
            assert torch.equal(a.hidden, b.hidden[order])
        continued = step_by_step(model, toks[order], state, start=5)
        reference = step_by_step(model, toks[order])[:, 4:]
    torch.testing.assert_close(continued, reference, **FP32)


# ---- bad input ----------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "negative mem_len": (dict(XL, mem_len=-1), "--mem-len must be >= 0"),
    "memory with sinusoidal positions": (dict(attention="full", pos_emb="sinusoidal", mem_len=4), "absolute"),
    "memory with learned positions": (dict(attention="full", pos_emb="learned", mem_len=4), "absolute"),
    "same_length without memory": (dict(XL, same_length=True, mem_len=0), "--same-length"),
    "negative clamp_len": (dict(XL, clamp_len=-1, mem_len=4), "--clamp-len must be >= 0"),
    "relative attention with sinusoidal positions": (dict(attention="relative", pos_emb="sinusoidal"), "--pos-emb relative"),
    "relative positions with full attention": (dict(attention="full", pos_emb="relative"), "computed inside attention"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_input_is_a_user_error(lm, lm_config, case):
    overrides, message = BAD_CONFIGS[case]
    with pytest.raises(UserError, match=message):
        validate_config(lm_config(**overrides))
    with pytest.raises(UserError, match=message):
        lm(**overrides)  # build_model validates before building any weight


def test_good_xl_configs_are_accepted(lm_config):
    validate_config(lm_config(**XL))  # no memory: relative attention alone is fine
    validate_config(lm_config(**XL, mem_len=16, same_length=True, clamp_len=8, untie_r=True))


# ---- presets ------------------------------------------------------------------------------------------
XL_PRESETS = {  # arch: layers, dim, heads, ffn, mem_len (issue 3; the paper's tables / official run_*.sh)
    "xl_tiny": (2, 64, 4, 256, 64),
    "xl_small": (4, 128, 4, 512, 256),
    "xl_ptb": (4, 256, 4, 1024, 128),
    "xl_enwik8_base": (12, 512, 8, 2048, 512),
    "xl_enwik8_large": (24, 1024, 16, 3072, 768),
    "xl_text8_large": (24, 1024, 16, 3072, 768),
    "xl_wt103_base": (16, 410, 10, 2100, 150),
    "xl_wt103_large": (18, 1024, 16, 4096, 384),
}
XL_ARCHS = sorted(a for a in ARCH_MODEL_INV_REGISTRY["efficient_lm"] if a.startswith("xl_"))
BUILT = ("xl_tiny", "xl_small", "xl_ptb")  # small enough to build weights in a test


def test_the_issue_presets_are_registered():
    required = {"xl_tiny", "xl_enwik8_base", "xl_enwik8_large", "xl_text8_large", "xl_wt103_base",
                "xl_wt103_large", "xl_ptb"}  # fmt: skip
    assert required <= set(XL_ARCHS)


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_xl_preset_resolves_to_a_valid_config(arch):
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    assert (args.attention, args.pos_emb) == ("relative", "relative") and args.mem_len > 0
    if arch in XL_PRESETS:
        resolved = (args.decoder_layers, args.decoder_embed_dim, args.decoder_attention_heads,
                    args.decoder_ffn_embed_dim, args.mem_len)  # fmt: skip
        assert resolved == XL_PRESETS[arch]
    if arch.startswith("xl_wt103"):  # adaptive input and softmax, tied (official run_wt103_*.sh)
        assert args.adaptive_input and args.tie_adaptive_weights and args.tie_adaptive_proj
        assert args.adaptive_input_cutoff == args.adaptive_softmax_cutoff == "20000,40000,200000"
        assert args.adaptive_input_factor == args.adaptive_softmax_factor == (1 if arch == "xl_wt103_base" else 4)
    cfg = EfficientLMConfig()
    for name, value in vars(args).items():
        setattr(cfg, name, value)
    validate_config(cfg)
    overridden = argparse.Namespace(mem_len=1600, decoder_layers=3)
    ARCH_CONFIG_REGISTRY[arch](overridden)
    assert (overridden.mem_len, overridden.decoder_layers) == (1600, 3)  # the command line wins


@pytest.mark.parametrize("arch", BUILT)
def test_small_xl_presets_build_and_run_with_memory(lm, arch):
    model = preset_lm(lm, arch).eval()
    assert isinstance(model.decoder.layers[0].attn, RelativeAttention)
    layers, dim = XL_PRESETS[arch][:2]
    assert len(model.decoder.layers) == layers and model.decoder.embed_tokens.embedding_dim == dim
    with torch.no_grad():
        out = run_segments(model, tokens(2, 12), 6)
    assert out.shape == (2, 12, V) and torch.isfinite(out).all()
    assert model.decoder.stream_memory["eval"].position == 12


# ---- a small byte corpus, binarized as preprocess/ does (shared by the task tests and the CLI test) ----
def _binarize(raw: Path, out: Path) -> None:
    (raw / "bytes.dict").write_text("".join(f"{i} 1\n" for i in range(256)))
    for split in ("train", "valid"):
        lines = (raw / f"{split}.txt").read_bytes().decode().splitlines()
        (raw / f"{split}.bytes").write_text("".join(" ".join(str(b) for b in line.encode()) + "\n" for line in lines))
    args = options.get_preprocessing_parser().parse_args(
        ["--only-source", "--srcdict", str(raw / "bytes.dict"), "--trainpref", str(raw / "train.bytes"),
         "--validpref", str(raw / "valid.bytes"), "--destdir", str(out), "--workers", "1"]
    )  # fmt: skip
    handlers = list(preprocess.logger.handlers)
    preprocess.main(args)
    for handler in preprocess.logger.handlers[len(handlers) :]:  # preprocess adds a FileHandler per call
        preprocess.logger.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="module")
def corpus_bin(tmp_path_factory) -> Path:
    """recipes/corpus.py at scale 0.02 (40 kB of train bytes), one token per byte, </s> per line."""
    tmp = tmp_path_factory.mktemp("xl_corpus")
    raw, out = tmp / "raw", tmp / "bin"
    subprocess.run([sys.executable, "-m", "recipes.corpus", "--out", raw, "--scale", "0.02"], check=True, cwd=ROOT)
    _binarize(raw, out)
    return out


@pytest.fixture
def xl_task(corpus_bin):
    """The segment_lm task and an xl_tiny model, both built by fairseq from a training command line."""
    argv = [str(corpus_bin), "--task", "segment_lm", "--arch", "xl_tiny", "--tokens-per-sample", "16",
            "--batch-size", "2", "--mem-len", "48", "--cpu"]  # fmt: skip
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    assert model.decoder.mem_len == 48 and isinstance(model.decoder.layers[0].attn, RelativeAttention)
    return task, model


# =========================================================================================================
# CLI: resume exactness through the REAL fairseq-train (4 subprocesses, 2 at a time). -m "not cli" skips.
# =========================================================================================================
N = 8  # updates before the interruption; both runs end at 2N
TRAIN_XL = [
    "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm", "--arch", "xl_tiny",
    "--criterion", "aux_cross_entropy", "--tokens-per-sample", "32", "--mem-len", "48", "--batch-size", "4",
    "--optimizer", "adam", "--lr", "0.003", "--dropout", "0.1", "--seed", "7", "--cpu", "--num-workers", "0",
    "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _start(data: Path, save_dir: Path, max_update: int) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "fairseq-train"), str(data), *TRAIN_XL,
               "--max-update", str(max_update), "--save-dir", str(save_dir)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)


def _finish(*procs: subprocess.Popen) -> list:
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs


def _per_update(output: str) -> dict:
    """num_updates -> (loss, bpb, gnorm) as fairseq printed them (json log, one line per update)."""
    stats = {}
    for line in output.splitlines():
        if "| train_inner | {" in line:
            record = json.loads(line.split("| train_inner | ", 1)[1])
            stats[int(record["num_updates"])] = (record["loss"], record["bpb"], record["gnorm"])
    return stats


@pytest.mark.cli
def test_cli_resume_continues_exactly_because_the_memory_is_saved(corpus_bin, tmp_path):
    """fairseq-train 2N updates in one run == N updates, then the same command resumed to 2N (dropout on).
    Control: the same resume from a checkpoint whose memory was deleted gives other losses."""
    whole, first, dropped = tmp_path / "whole", tmp_path / "resumed", tmp_path / "memory-dropped"
    out_whole, out_first = _finish(_start(corpus_bin, whole, 2 * N), _start(corpus_bin, first, N))

    checkpoint = torch.load(first / "checkpoint_last.pt", weights_only=False)
    memory = checkpoint["model"]["decoder._extra_state"]
    assert memory["rank"] == [0, 1] and memory["train_memory"]["position"] == N * 32
    assert [m["hidden"].shape for m in memory["train_memory"]["layers"]] == [(4, 48, 64)] * 2
    checkpoint["model"]["decoder._extra_state"]["train_memory"] = None
    dropped.mkdir()
    torch.save(checkpoint, dropped / "checkpoint_last.pt")

    out_resumed, out_dropped = _finish(_start(corpus_bin, first, 2 * N), _start(corpus_bin, dropped, 2 * N))
    assert "Loaded checkpoint" in out_resumed and "another worker" not in out_resumed
    reference, resumed, control = _per_update(out_whole), _per_update(out_resumed), _per_update(out_dropped)
    assert sorted(reference) == list(range(1, 2 * N + 1))
    assert sorted(resumed) == sorted(control) == list(range(N + 1, 2 * N + 1))
    assert _per_update(out_first) == {u: reference[u] for u in range(1, N + 1)}
    # exact to the printed precision (loss and gnorm 3 decimals, bpb 4): no tolerance at all
    assert resumed == {u: reference[u] for u in range(N + 1, 2 * N + 1)}, (resumed, reference)
    assert control[N + 1] != reference[N + 1], "the control must differ: the memory is what made it exact"
    print("\nupdate: uninterrupted | resumed | resumed without memory (loss, bpb, gnorm)")
    for u in range(N + 1, 2 * N + 1):
        print(u, reference[u], resumed[u], control[u])

    # the final models are identical too (parameters and the memory they end with)
    end_whole = torch.load(whole / "checkpoint_last.pt", weights_only=False)["model"]
    end_resumed = torch.load(first / "checkpoint_last.pt", weights_only=False)["model"]
    for name, value in end_whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, end_resumed[name]), name
    for a, b in zip(end_whole["decoder._extra_state"]["train_memory"]["layers"],
                    end_resumed["decoder._extra_state"]["train_memory"]["layers"]):  # fmt: skip
        assert torch.equal(a["hidden"], b["hidden"])


def test_resume_test_data_is_long_enough(corpus_bin):
    """2N updates of 4 x 32 stay inside the first epoch (a resume mid-epoch is the case that needs memory)."""
    n_train = os.path.getsize(corpus_bin / "train.bin") // 2  # uint16 tokens
    assert n_train // 4 > 2 * N * 32


def test_cli_marker_is_registered(pytestconfig):
    assert any(m.startswith("cli:") for m in pytestconfig.getini("markers"))


# ---- regressions of /tmp/xl_fixes.diff -------------------------------------------------------------------
def test_a_checkpoint_saved_before_the_memory_was_saved_still_loads(lm):
    """Checkpoints of the foundation commit have no ``decoder._extra_state``: they load (strict, as fairseq
    loads them) with no memory instead of failing with 'Missing key(s)'."""
    state = {k: v for k, v in xl_lm(lm, mem_len=6).state_dict().items() if k != "decoder._extra_state"}
    fresh = xl_lm(lm, mem_len=6, seed=1)
    fresh.load_state_dict(state)
    assert fresh.decoder.stream_memory == {}

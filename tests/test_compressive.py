"""Compressive Transformer (Rae et al. 2020, arXiv 1911.05507; issue 4): compression functions, the two-level
memory's bookkeeping, the stop-gradients of each compression loss, equality with Transformer-XL at
``--cmem-len 0``, checkpointed memory, generation, presets, bad input, and the real fairseq-train /
fairseq-eval-lm on PTB characters.

References written here, not taken from the plugin:
- ``hand_relative_attention``: Dai et al. Sec. 3.3 with explicit distances over ``[compressed; memory; x]``
  (a compressed slot counts as one position, as in the paper);
- ``reference_forward``: the whole decoder in one pass, each query p attending to the compression of the
  positions evicted before its segment started and to the uncompressed positions after them (the window
  that segment-wise processing, or generation one token at a time, gives it).

Shapes: B = batch, T = segment, M = mem_len, N = cmem_len, c = compression rate, L = sequence, D = model dim.
"""

import argparse
import io
import json
import lzma
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY

from plugins.attention import build_attention
from plugins.attention.compressive import CompressiveAttention, CompressiveMemory
from plugins.errors import UserError
from plugins.memory import DecoderState
from plugins.models.efficient_lm import EfficientLMConfig, validate_config
from plugins.modules.compression import COMPRESSION_REGISTRY, build_compression

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
V = 24  # conftest's dictionary: 4 specials + 20 words
D, H = 16, 2
EXACT64 = dict(rtol=0, atol=1e-10)
FP32 = dict(rtol=0, atol=1e-5)
CT = dict(attention="compressive", pos_emb="relative")
BLOCK_LOCAL = [n for n in sorted(COMPRESSION_REGISTRY) if n != "most_used"]


def tokens(B: int, L: int) -> torch.Tensor:
    return torch.randint(4, V, (B, L))


def make_attention(seed=0, **options) -> CompressiveAttention:
    torch.manual_seed(seed)
    opts = dict(clamp_len=0, same_length=False, untie_r=False, pos_emb="relative", cmem_len=0, compression_rate=3,
                compression_fn="mean_pool", compression_loss="attention_reconstruction", compression_loss_weight=1.0)  # fmt: skip
    opts.update(options)
    attn = build_attention("compressive", D, H, dropout=0.0, options=SimpleNamespace(**opts)).double().eval()
    with torch.no_grad():  # position biases far from 0, so that a wrong term shows
        attn.u.normal_()
        attn.v.normal_()
    return attn


def run_segments(model, toks: torch.Tensor, T: int) -> torch.Tensor:
    """Consecutive segments of T with their stream offsets (as segment_lm feeds them)."""
    return torch.cat([model(toks[:, s : s + T], stream_offset=s)[0] for s in range(0, toks.size(1), T)], dim=1)


def evicted_before(start: int, M: int, c: int) -> int:
    """Positions compressed before a segment starting at ``start``: the overflow beyond M, in whole blocks."""
    return c * (max(start - M, 0) // c)


# ---- compression functions ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMPRESSION_REGISTRY))
@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_compression_output_length_and_order(name, c):
    f = build_compression(name, D, c).double()
    x = torch.randn(2, 5 * c, D, dtype=torch.float64)
    usage = torch.rand(2, 5 * c, dtype=torch.float64)
    out = f(x, usage)
    assert out.shape == (2, 5, D)
    if name == "most_used":
        return  # order: test_most_used_keeps_the_most_attended_in_time_order
    # block-local: compressing block by block == all at once, and reversing the blocks reverses the slots
    blocks = x.split(c, dim=1)
    torch.testing.assert_close(torch.cat([f(b) for b in blocks], dim=1), out, **EXACT64)
    torch.testing.assert_close(f(torch.cat(blocks[::-1], dim=1)), out.flip(1), **EXACT64)


def test_max_and_mean_pool_by_hand():
    x = torch.tensor([[[1.0, -1.0], [3.0, 0.0], [2.0, 5.0], [0.0, 1.0], [-4.0, 2.0], [6.0, 3.0]]])  # 1 x 6 x 2
    assert torch.equal(build_compression("max_pool", 2, 3)(x), torch.tensor([[[3.0, 5.0], [6.0, 3.0]]]))
    assert torch.equal(build_compression("mean_pool", 2, 3)(x), torch.tensor([[[2.0, 4 / 3], [2 / 3, 2.0]]]))
    assert torch.equal(build_compression("max_pool", 2, 2)(x), torch.tensor([[[3.0, 0.0], [2.0, 5.0], [6.0, 3.0]]]))


def test_most_used_keeps_the_most_attended_in_time_order():
    x = torch.arange(8.0)[None, :, None].expand(2, 8, 3)  # state t holds the value t
    usage = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.3, 0.7, 0.05], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.6]])
    out = build_compression("most_used", 3, 4)(x, usage)  # keep 8 / 4 = 2 per stream
    assert out[..., 0].tolist() == [[1.0, 3.0], [0.0, 7.0]]  # the two highest, oldest first


def test_compression_needs_whole_blocks():
    with pytest.raises(ValueError, match="not a multiple"):
        build_compression("conv", D, 3)(torch.randn(1, 7, D))


def test_dilated_conv_output_sees_exactly_its_block():
    f = build_compression("dilated_conv", D, 4).double()
    x = torch.randn(1, 12, D, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(x)[0, 1].sum(), x)
    seen = grad.abs().sum(-1)[0] > 0
    assert seen.tolist() == [False] * 4 + [True] * 4 + [False] * 4


# ---- the layer: memory bookkeeping and the attention formula --------------------------------------------
def hand_weights(attn, x, context):
    """Dai et al. Sec. 3.3, float64, with explicit distances: the attention weights (B x H x T x S) of the T
    queries x (the last T of the S positions [context; x])."""
    ctx = torch.cat([context, x], dim=1)  # B x S x D
    B, T, _ = x.shape
    S, Dh = ctx.size(1), attn.head_dim
    q = attn.q_proj(x).view(B, T, H, Dh)
    k = attn.kv_proj(ctx).chunk(2, dim=-1)[0].view(B, S, H, Dh)
    distance = ((S - T + torch.arange(T))[:, None] - torch.arange(S)[None, :]).clamp(min=0)  # T x S
    w_r = attn.r_proj(attn.sinusoid(torch.arange(S), x.dtype)).view(S, H, Dh)  # W_R r_d
    content = torch.einsum("bthd,bshd->bhts", q + attn.u, k)  # (a) + (c)
    position = torch.einsum("bthd,tshd->bhts", q + attn.v, w_r[distance])  # (b) + (d)
    allowed = torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]
    return ((content + position) / math.sqrt(Dh)).masked_fill(~allowed, float("-inf")).softmax(-1)


def hand_relative_attention(attn, x, context):
    ctx = torch.cat([context, x], dim=1)
    B, T, _ = x.shape
    v = attn.kv_proj(ctx).chunk(2, dim=-1)[1].view(B, ctx.size(1), H, attn.head_dim)
    out = torch.einsum("bhts,bshd->bthd", hand_weights(attn, x, context), v)
    return attn.out_proj(out.reshape(B, T, -1))


@pytest.mark.parametrize("fn", ["max_pool", "mean_pool"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_memory_bookkeeping_segment_by_segment(fn, grad):
    """M 5, N 3, c 2, segments of varied length: after each, the memory holds the positions after the last
    whole block of overflow (a remainder < c included), the compressed memory is f_c of exactly the evicted
    positions (the last N slots: FIFO), and the output is the formula over [compressed; memory; segment]."""
    M, N, c = 5, 3, 2
    attn = make_attention(cmem_len=N, compression_rate=c, compression_fn=fn)
    f = build_compression(fn, D, c)
    lengths = [4, 3, 1, 5, 2, 7, 3]
    seen = torch.randn(2, sum(lengths), D, dtype=torch.float64)
    mem, start = None, 0
    with torch.set_grad_enabled(grad):
        for T in lengths:
            x = seen[:, start : start + T]
            out, mem = attn(x, mem, keep=M)
            evicted = evicted_before(start, M, c)
            context = torch.cat([f(seen[:, :evicted])[:, -N:], seen[:, evicted:start]], dim=1)
            torch.testing.assert_close(out, hand_relative_attention(attn, x, context), **EXACT64)
            start += T
            done = evicted_before(start, M, c)
            assert isinstance(mem, CompressiveMemory)
            assert torch.equal(mem.hidden, seen[:, done:start])
            assert M <= mem.length < M + c or start < M
            assert mem.compressed_length == min(done // c, N)
            torch.testing.assert_close(mem.compressed, f(seen[:, :done])[:, -N:], **EXACT64)
            assert (mem.keys is None) == grad  # K/V cached only without gradients
            if not grad:
                assert mem.keys.size(2) == mem.length
    assert start - done == mem.length and done > 2 * N * c  # slots were dropped (FIFO) along the way


def test_keep_none_compresses_nothing_and_keep_zero_keeps_nothing():
    attn = make_attention(cmem_len=4, compression_rate=2)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    _, mem = attn(x, None, keep=None)
    assert mem.length == 9 and mem.compressed_length == 0
    _, mem = attn(x, mem, keep=0)
    assert mem is None


def test_most_used_compresses_the_states_that_received_most_attention():
    """The usage the memory accumulates is the average attention each state received over all queries that
    saw it; most_used keeps the top E / c of the evicted states by that average (exact, float64)."""
    M, c = 4, 2
    attn = make_attention(cmem_len=8, compression_rate=c, compression_fn="most_used")
    seen = torch.randn(1, 12, D, dtype=torch.float64)
    with torch.no_grad():
        _, mem = attn(seen[:, :6], None, keep=M)  # evicts 2
        _, mem = attn(seen[:, 6:], mem, keep=M)  # evicts 6 more
    # the attention every state received from every query that saw it (the explicit weights of each call;
    # in the second, the compressed slot, state 0 or 1, is one more key that is not a memory state)
    received, views = torch.zeros(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    w1 = hand_weights(attn, seen[:, :6], seen[:, :0]).mean(1)[0]  # T x S, averaged over heads
    kept_first = [int((w1.sum(0) / torch.arange(6, 0, -1))[:2].argmax())]  # 1 of the 2 evicted first
    w2 = hand_weights(attn, seen[:, 6:], torch.cat([seen[:, kept_first], seen[:, 2:6]], dim=1)).mean(1)[0][:, 1:]
    received[:6] += w1.sum(0)
    views[:6] += torch.arange(6, 0, -1)
    received[2:] += w2.sum(0)
    views[2:] += torch.cat([torch.full((4,), 6), torch.arange(6, 0, -1)])
    average = received / views
    second = sorted((2 + average[2:8].topk(3).indices).tolist())
    torch.testing.assert_close(mem.compressed, seen[:, kept_first + second], **EXACT64)


def test_explicit_weights_path_equals_the_fused_kernel():
    """most_used computes the softmax explicitly (it needs the weights); the result is the same attention."""
    fused = make_attention(cmem_len=4, compression_rate=2, compression_fn="mean_pool")
    explicit = make_attention(cmem_len=4, compression_rate=2, compression_fn="most_used")
    explicit.load_state_dict(fused.state_dict())
    x1, x2 = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 3, D, dtype=torch.float64)
    with torch.no_grad():
        a1, mem_a = fused(x1, None, keep=4)
        b1, mem_b = explicit(x1, None, keep=4)
        torch.testing.assert_close(b1, a1, **EXACT64)
        mem_b.compressed = mem_a.compressed  # same compressed memory: the attention must agree
        torch.testing.assert_close(explicit(x2, mem_b, keep=4)[0], fused(x2, mem_a, keep=4)[0], **EXACT64)


# ---- gradients: the stop-gradients of Algorithm 2, and bptt ---------------------------------------------
def _grads(module, loss):
    module.zero_grad()
    loss.backward(retain_graph=True)
    compression = [p for n, p in module.named_parameters() if n.startswith(("compress.", "reconstruct."))]
    attention = [p for n, p in module.named_parameters() if not n.startswith(("compress.", "reconstruct."))]
    total = lambda ps: sum(0.0 if p.grad is None else float(p.grad.abs().sum()) for p in ps)  # noqa: E731
    return total(compression), total(attention)


@pytest.mark.parametrize("loss_name", ["attention_reconstruction", "autoencoding"])
@pytest.mark.parametrize("fn", ["conv", "dilated_conv"])
def test_compression_loss_trains_only_compression_and_lm_loss_never_does(loss_name, fn):
    attn = make_attention(cmem_len=4, compression_rate=2, compression_fn=fn, compression_loss=loss_name).train()
    x1, x2, x3 = (torch.randn(2, 5, D, dtype=torch.float64) for _ in range(3))
    _, mem = attn(x1, None, keep=4)
    _, mem = attn(x2, mem.detach(), keep=4)  # evicts: the compressed memory is not empty from here on
    assert mem.compressed_length > 0 and mem.loss.shape == (2,)
    out, new_mem = attn(x3, mem, keep=4)  # attends to compressed slots and compresses new ones
    lm_compression, lm_attention = _grads(attn, out.square().sum())
    aux_compression, aux_attention = _grads(attn, attn.aux_losses(new_mem)["compression"].value)
    assert lm_compression == 0 and lm_attention > 0
    assert aux_compression > 0 and aux_attention == 0
    assert float(new_mem.loss.detach().mean()) > 0


def test_attention_reconstruction_is_the_mse_of_algorithm_2():
    attn = make_attention(cmem_len=4, compression_rate=2, compression_fn="conv")
    x1, x2 = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, 3, D, dtype=torch.float64)
    with torch.no_grad():
        _, mem = attn(x1, None, keep=4)
        _, mem2 = attn(x2, mem, keep=4)
        old = torch.cat([mem.hidden, x2], dim=1)[:, :2]  # 4 + 3 positions, keep 4: one block of 2 leaves
        new = attn.compress(old)

        def content(m):
            q = attn.q_proj(x2).view(2, 3, H, D // H).transpose(1, 2)
            k, v = (t.view(2, -1, H, D // H).transpose(1, 2) for t in attn.kv_proj(m).chunk(2, dim=-1))
            return (q @ k.transpose(-1, -2) / math.sqrt(D // H)).softmax(-1) @ v

        expected = (content(old) - content(new)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mem2.loss, expected, **EXACT64)
    assert attn.aux_losses(mem2)["compression"].weight == 1.0


def test_bptt_lm_loss_reaches_the_compression_through_the_next_segment():
    attn = make_attention(cmem_len=4, compression_rate=2, compression_fn="conv", compression_loss="bptt").train()
    x1, x2, x3 = (torch.randn(2, 5, D, dtype=torch.float64) for _ in range(3))
    out1, mem = attn(x1, None, keep=4)
    assert mem.pending.size(1) == 0 and attn.aux_losses(mem) == {}
    assert _grads(attn, out1.sum())[0] == 0  # nothing compressed yet (the parameters are touched, with 0)
    _, mem = attn(x2, mem.detach(), keep=4)  # 10 positions, keep 4: 6 leave, pending for the next forward
    assert mem.pending.size(1) == 6 and mem.compressed_length == 0
    out3, mem3 = attn(x3, mem.detach(), keep=4)
    assert mem3.compressed_length == 3
    lm_compression, _ = _grads(attn, out3.square().sum())
    assert lm_compression > 0
    with torch.no_grad():  # the compressed memory is f_c of exactly the pending states
        torch.testing.assert_close(mem3.compressed, attn.compress(mem.pending), **EXACT64)


@pytest.mark.parametrize("loss_name", ["attention_reconstruction", "autoencoding", "bptt"])
def test_every_parameter_is_in_the_graph_at_every_step(loss_name):
    """DDP without --find-unused-parameters: even a step that compresses nothing reaches every parameter."""
    attn = make_attention(cmem_len=4, compression_rate=2, compression_fn="conv", compression_loss=loss_name).train()
    out, mem = attn(torch.randn(2, 3, D, dtype=torch.float64), None, keep=4)  # nothing evicted yet
    loss = out.sum() + sum(t.value for t in attn.aux_losses(mem).values())
    loss.backward()
    assert all(p.grad is not None for p in attn.parameters())


# ---- the model: Transformer-XL at cmem 0, the one-pass reference, checkpoints, generation ----------------
def test_cmem_zero_is_transformer_xl_exactly(lm):
    xl = lm(attention="relative", pos_emb="relative", mem_len=5).double().eval()
    ct = lm(**CT, mem_len=5, cmem_len=0).double().eval()
    assert set(ct.state_dict()) == set(xl.state_dict())
    ct.load_state_dict(xl.state_dict())
    toks = tokens(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(run_segments(ct, toks, 4), run_segments(xl, toks, 4), rtol=0, atol=0)
    assert ct.decoder.stream_memory["eval"].layers[0].compressed is None


def test_before_anything_is_evicted_it_is_transformer_xl(lm):
    xl = lm(attention="relative", pos_emb="relative", mem_len=8).double().eval()
    ct = lm(**CT, mem_len=8, cmem_len=4, compression_rate=4).double().eval()
    missing, unexpected = ct.load_state_dict(xl.state_dict(), strict=False)
    assert all(".compress." in k for k in missing) and not unexpected
    toks = tokens(2, 16)  # segments of 4: the first eviction is at the end of segment 3 (12 > 8 + 4 - 1)
    with torch.no_grad():
        a, b = run_segments(ct, toks, 4), run_segments(xl, toks, 4)
    torch.testing.assert_close(a[:, :12], b[:, :12], **EXACT64)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-6)  # then the compressed memory matters


def reference_forward(model, toks, segment_starts):
    """The decoder over ``toks`` (B x L) in one pass of single queries: query p, in the segment starting at
    s = segment_starts[p], attends to f_c(h[:e])[-N:] and h[e:p+1] with e = evicted_before(s), at each layer.
    h are the layer's raw inputs: f_c compresses them; a pre-norm layer applies its LayerNorm to the whole
    attended context [f_c(h[:e]); h[e:p+1]] (issue 16: not f_c of LayerNorm outputs)."""
    dec = model.decoder
    attn0 = dec.layers[0].attn
    M, N, c = dec.mem_len, attn0.cfg.cmem_len, attn0.cfg.compression_rate
    x = dec.embed_scale * dec.embed_tokens(toks)
    for i in range(dec.num_layers):
        layer = dec.layers[i % len(dec.layers)]

        def attn(h, layer=layer, norm=lambda t: t):
            rows = []
            for p, s in enumerate(segment_starts):
                e = evicted_before(s, M, c)
                compressed = layer.attn.compress(h[:, :e])[:, -N:] if e else h[:, :0]
                context = norm(torch.cat([compressed, h[:, e:p]], dim=1))
                rows.append(hand_relative_attention(layer.attn, norm(h[:, p : p + 1]), context))
            return torch.cat(rows, dim=1)

        if layer.normalize_before:
            x = x + attn(x, norm=layer.attn_norm)
            x = x + layer.ffn(layer.ffn_norm(x))
        else:
            x = layer.attn_norm(x + attn(x))
            x = layer.ffn_norm(x + layer.ffn(x))
    if dec.final_norm is not None:
        x = dec.final_norm(x)
    return dec.output_layer(x)


def ct_model(lm, **overrides):
    values = dict(CT, mem_len=5, cmem_len=3, compression_rate=2, compression_fn="conv")
    model = lm(**{**values, **overrides}).double().eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.u.normal_()
            layer.attn.v.normal_()
    return model


@pytest.mark.parametrize("T", [4, 3, 7])
@pytest.mark.parametrize("norm", [False, True], ids=["post-norm", "pre-norm"])
def test_segments_equal_one_pass_with_the_compressive_window(lm, T, norm):
    model = ct_model(lm, decoder_normalize_before=norm)
    L = 23
    toks = tokens(2, L)
    with torch.no_grad():
        segmented = run_segments(model, toks, T)
        reference = reference_forward(model, toks, [T * (p // T) for p in range(L)])
    torch.testing.assert_close(segmented, reference, **EXACT64)


def step_by_step(model, toks, state=None, start=1):
    state = {} if state is None else state
    return torch.cat([model(toks[:, :t], incremental_state=state)[0] for t in range(start, toks.size(1) + 1)], 1)


def test_generation_step_by_step_is_the_compressive_window_of_segments_of_one(lm):
    """Token by token (fairseq's incremental_state) == one pass where query p's segment starts at p; the first
    mem_len + c - 1 positions see everything (as the full forward)."""
    model = ct_model(lm)
    toks = tokens(2, 17)
    with torch.no_grad():
        steps = step_by_step(model, toks)
        torch.testing.assert_close(steps, reference_forward(model, toks, list(range(17))), **EXACT64)
        full, _ = model(toks)
        torch.testing.assert_close(steps[:, :7], full[:, :7], **EXACT64)  # until 5 + 2 positions, nothing leaves
        assert not torch.allclose(steps[:, 7:], full[:, 7:], atol=1e-6)


def test_beam_reorder_reorders_every_field(lm):
    model = ct_model(lm, compression_fn="most_used")
    toks = tokens(3, 14)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = {}
        step_by_step(model, toks[:, :10], state)
        model.decoder.reorder_incremental_state_scripting(state, order)
        continued = step_by_step(model, toks[order], state, start=11)
        reference = step_by_step(model, toks[order])[:, 10:]
    torch.testing.assert_close(continued, reference, **EXACT64)


def _roundtrip(model) -> dict:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # tensors and plain numbers only


@pytest.mark.parametrize("fn, loss_name", [("most_used", "attention_reconstruction"), ("conv", "bptt")])
def test_checkpoint_restores_the_memory_exactly(lm, fn, loss_name):
    """The training memory (compressed slots, pending evictions, usage) survives a save/load: the resumed
    model continues the stream exactly as the uninterrupted one."""
    model = ct_model(lm, compression_fn=fn, compression_loss=loss_name).train()
    toks = tokens(2, 20)
    for s in (0, 5, 10):
        model(toks[:, s : s + 5], stream_offset=s)
    layer0 = model.decoder.stream_memory["train"].layers[0]
    assert layer0.compressed_length > 0
    assert (layer0.pending is not None) == (loss_name == "bptt") and (layer0.usage is not None) == (fn == "most_used")
    resumed = ct_model(lm, seed=1, compression_fn=fn, compression_loss=loss_name).train()
    resumed.load_state_dict(_roundtrip(model))
    torch.testing.assert_close(resumed(toks[:, 15:], stream_offset=15)[0], model(toks[:, 15:], stream_offset=15)[0],
                               rtol=0, atol=0)  # fmt: skip
    state = DecoderState.from_dict(model.decoder.get_extra_state()["train_memory"])
    assert isinstance(state.layers[0], CompressiveMemory)


def test_memory_sizes_and_reset_at_validation_start(lm):
    """Sizes after each segment through the decoder (segment_lm's stream memory), validation memory apart
    from training's, and a validation pass (begin_valid_epoch -> reset_memory("eval")) that starts afresh."""
    model = ct_model(lm, mem_len=6, cmem_len=4, compression_rate=3)
    toks = tokens(2, 30)
    with torch.no_grad():
        for s in range(0, 30, 5):
            model(toks[:, s : s + 5], stream_offset=s)
            layer = model.decoder.stream_memory["eval"].layers[1]
            done = evicted_before(s + 5, 6, 3)
            assert (layer.length, layer.compressed_length) == (s + 5 - done, min(done // 3, 4))
        first, _ = model(toks[:, :5], stream_offset=0)  # offset 0: a new pass, no memory
        model(toks[:, 5:10], stream_offset=5)
        model.reset_memory("eval")  # what segment_lm's begin_valid_epoch does
        assert "eval" not in model.decoder.stream_memory
        alone, _ = model(toks[:, 5:10], stream_offset=5)
        model.reset_memory()
        reference, _ = model(toks[:, 5:10])
        torch.testing.assert_close(alone, reference, rtol=0, atol=0)
        torch.testing.assert_close(first, model(toks[:, :5])[0], rtol=0, atol=0)


def test_aux_loss_reaches_the_criterion(lm):
    from plugins.criterions.aux_cross_entropy import AuxCrossEntropyCriterion

    model = ct_model(lm).float().train()
    crit = AuxCrossEntropyCriterion(SimpleNamespace(target_dictionary=model.decoder.dictionary, token_unit="char"),
                                    sentence_avg=False)  # fmt: skip
    toks = tokens(2, 20)
    for s in (0, 5, 10):
        sample = {"net_input": {"src_tokens": toks[:, s : s + 5], "stream_offset": s}, "target": toks[:, s + 1 : s + 6],
                  "ntokens": 10}  # fmt: skip
        loss, _, log = crit(model, sample)
    assert "aux_compression" in log and float(log["aux_compression"]) > 0
    assert float(loss.detach()) > float(log["nll_loss"])


# ---- bad input and presets --------------------------------------------------------------------------------
BAD = {
    "rate below 1": (dict(CT, mem_len=4, cmem_len=4, compression_rate=0), "--compression-rate must be >= 1"),
    "compressed memory without memory": (dict(CT, mem_len=0, cmem_len=4), "needs --mem-len > 0"),
    "negative cmem": (dict(CT, mem_len=4, cmem_len=-1), "--cmem-len must be >= 0"),
    "rate longer than the memory": (dict(CT, mem_len=4, cmem_len=4, compression_rate=6), "larger than --mem-len"),
    "same length": (dict(CT, mem_len=4, cmem_len=4, compression_rate=2, same_length=True), "--same-length"),
    "unknown function": (dict(CT, mem_len=4, cmem_len=4, compression_fn="zip"), "unknown --compression-fn"),
    "cmem with another attention": (dict(attention="relative", pos_emb="relative", mem_len=4, cmem_len=4),
                                    "--cmem-len 4 is an option of --attention compressive"),
    "most_used with another attention": (dict(attention="full", pos_emb="none", compression_fn="most_used"),
                                         "--compression-fn most_used is an option of --attention compressive"),
    "absolute positions": (dict(CT, pos_emb="sinusoidal"), "--pos-emb relative"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_user_error(lm_config, case):
    overrides, message = BAD[case]
    with pytest.raises(UserError, match=re.escape(message)):
        validate_config(lm_config(**overrides))


PRESETS = {  # arch: layers, dim, heads, mem, cmem, c
    "compressive_tiny": (2, 64, 4, 32, 16, 4),
    "compressive_small": (4, 128, 4, 128, 32, 4),
    "compressive_enwik8": (8, 512, 8, 512, 512, 4),
    "compressive_enwik8_large": (24, 1024, 16, 768, 1152, 3),
    "compressive_wt103": (18, 1024, 16, 500, 1500, 4),
}


@pytest.mark.parametrize("arch", list(PRESETS))
def test_presets_resolve_to_valid_configs(arch):
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    resolved = (args.decoder_layers, args.decoder_embed_dim, args.decoder_attention_heads, args.mem_len,
                args.cmem_len, args.compression_rate)  # fmt: skip
    assert resolved == PRESETS[arch]
    assert (args.attention, args.compression_fn, args.compression_loss) == ("compressive", "conv",
                                                                             "attention_reconstruction")  # fmt: skip
    cfg = EfficientLMConfig()
    for name, value in vars(args).items():
        setattr(cfg, name, value)
    validate_config(cfg)


def test_compressive_tiny_builds_and_runs(lm):
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY["compressive_tiny"](args)
    model = lm(**vars(args)).eval()
    with torch.no_grad():
        out = run_segments(model, tokens(2, 96), 32)
    assert out.shape == (2, 96, V) and torch.isfinite(out).all()
    assert model.decoder.stream_memory["eval"].layers[0].compressed_length == 16


# ---- end to end on real PTB characters ----------------------------------------------------------------------
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ptb_chars(tmp_path_factory):
    if not (SHARED / "ptb").is_dir():
        pytest.skip(f"no {SHARED}/ptb (the shared data directory)")
    tmp = tmp_path_factory.mktemp("ptb_chars")
    sizes = {"train": 30_000, "valid": 4_000}  # the first lines of each split (bytes)
    for split, size in sizes.items():
        text = lzma.open(SHARED / "ptb" / f"ptb.{split}.txt.xz", "rt").read(size)
        (tmp / f"{split}.txt").write_text(text[: text.rfind("\n") + 1])
    subprocess.run([sys.executable, "-m", "preprocess.text", "--train", tmp / "train.txt", "--valid",
                    tmp / "valid.txt", "--test", tmp / "valid.txt", "--level", "char", "--binarizer", "fast",
                    "--out", tmp / "bin"], check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    return tmp / "bin"


@pytest.mark.cli
def test_recipe_trains_and_evaluates_on_ptb_chars(ptb_chars, tmp_path):
    """recipes/compressive/run.sh ptb_chars_cpu (the real fairseq-train and fairseq-eval-lm), shrunk to
    compressive_tiny and 12 updates: the compression loss is logged on its own, and eval-lm scores the
    validation streams exactly as validation did (the same memory: compressed slots included)."""
    recipe = str(ROOT / "recipes" / "compressive" / "run.sh")
    env = {**ENV, "DATA": str(ptb_chars), "SAVE": str(tmp_path), "FAIRSEQ_TRAIN": str(BIN / "fairseq-train"),
           "FAIRSEQ_EVAL_LM": str(BIN / "fairseq-eval-lm")}  # fmt: skip
    small = ["--tokens-per-sample", "32", "--batch-size", "4"]
    train = subprocess.run(
        ["bash", recipe, "ptb_chars_cpu", "train", *small, "--arch", "compressive_tiny", "--lr", "0.003",
         "--warmup-updates", "0", "--max-update", "12", "--log-interval", "4", "--num-workers", "0", "--seed", "1",
         "--no-epoch-checkpoints"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "aux_compression=" in train.stdout and "bpc=" in train.stdout
    valid = float(re.findall(r"valid on 'valid' subset \|.* bpc ([\d.]+)", train.stdout)[-1])
    evaluated = subprocess.run(
        ["bash", recipe, "ptb_chars_cpu", "eval", *small, "--gen-subset", "valid", "--cpu"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    output = evaluated.stdout + evaluated.stderr
    assert evaluated.returncode == 0, output[-3000:]
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", output).group(1))
    assert abs(loss - valid) < 6e-4 and loss < 5.0, (loss, valid)  # log2(50 symbols) = 5.6 bits: it learned

    # the attention analysis on this checkpoint: a PNG and the shares of attention mass per span
    png = tmp_path / "attention.png"
    analysis = subprocess.run(
        [sys.executable, "-m", "recipes.compressive.attention_analysis", "--path", str(tmp_path / "checkpoint_best.pt"),
         "--data", str(ptb_chars), "--segments", "8", "--bins", "4", "--out", str(png)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    result = json.loads(png.with_suffix(".json").read_text())
    assert result["segments_counted"] == 8 - 3  # 32 + 16 x 4 past positions: full after 3 segments of 32
    assert len(result["mass"]) == 2 and all(abs(sum(layer) - 1) < 1e-6 for layer in result["mass"])
    assert all(min(layer) > 0 for layer in result["mass"])  # every span is attended to
    assert png.stat().st_size > 10_000


@pytest.mark.cli
def test_bad_compression_option_stops_fairseq_train_with_one_line(ptb_chars, tmp_path):
    proc = subprocess.run(
        [str(BIN / "fairseq-train"), str(ptb_chars), "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm",
         "--arch", "compressive_tiny", "--mem-len", "0", "--tokens-per-sample", "32", "--batch-size", "4",
         "--optimizer", "adam", "--lr", "0.001", "--max-update", "2", "--cpu", "--save-dir", str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lines[-1] == "error: --cmem-len holds states compressed as they leave the memory: it needs --mem-len > 0"
    assert not list(tmp_path.glob("*.pt"))

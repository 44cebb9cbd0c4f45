"""One suite for every registered attention: the registry drives the parametrization, so a mechanism
is tested by registering it, with no new test code.

Checked for each mechanism: shapes; causality (exact); one long pass == segments with the memory the
first call returned; memory trimming (``keep``); step-by-step == parallel; agreement with the naive
reference when the parameters match; user errors. Capability flags (``supports_memory``,
``supports_incremental``) decide what is skipped, never the mechanism's name.

Shapes: B = batch, T = segment length, D = model dim, H = heads.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from plugins.attention import ATTENTION_REGISTRY, Attention, build_attention, register_attention
from plugins.attention.base import causal_mask
from plugins.errors import UserError
from plugins.memory import DecoderState, HiddenMemory

NAMES = sorted(ATTENTION_REGISTRY)
B, D, H = 2, 16, 2
EXACT64 = dict(rtol=0, atol=1e-10)  # float64: only summation order differs between the two sides
FP32 = dict(rtol=0, atol=1e-5)


def make(name: str, dtype=torch.float64, dropout: float = 0.0, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return build_attention(name, D, H, dropout=dropout, options=SimpleNamespace()).to(dtype).eval()


def inputs(T: int, dtype=torch.float64, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, T, D, dtype=dtype)  # B x T x D


def require_memory(attn) -> None:
    cls = attn if isinstance(attn, type) else type(attn)
    if not cls.supports_memory:
        pytest.skip(f"{cls.registry_name}: supports_memory = False")


def require_incremental(attn) -> None:
    cls = attn if isinstance(attn, type) else type(attn)
    if not cls.supports_incremental:
        pytest.skip(f"{cls.registry_name}: supports_incremental = False")


def run_segments(attn, segments, keep):
    """Feed the segments one after the other, each with the memory the previous call returned."""
    outs, mem = [], None
    for x in segments:
        out, mem = attn(x, mem, keep=keep)
        outs.append(out)
    return torch.cat(outs, dim=1), mem


# ---- registry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_well_formed(name):
    entry = ATTENTION_REGISTRY[name]
    assert issubclass(entry.cls, Attention)
    assert entry.cls.registry_name == name
    assert dataclasses.is_dataclass(entry.config)
    for f in dataclasses.fields(entry.config):
        assert f.metadata.get("help"), f"option '{f.name}' of '{name}' has no help text"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_attention("full")(type("Again", (Attention,), {}))
    assert ATTENTION_REGISTRY["full"].cls.__name__ == "FullAttention"


def test_unknown_attention_is_a_user_error():
    with pytest.raises(UserError, match="unknown --attention"):
        build_attention("no_such_attention", D, H, dropout=0.0, options=SimpleNamespace())


@pytest.mark.parametrize("name", NAMES)
def test_heads_must_divide_dim(name):
    with pytest.raises(UserError, match="must divide"):
        build_attention(name, 10, 3, dropout=0.0, options=SimpleNamespace())


def test_memory_tests_are_skipped_by_the_capability_flag():
    class NoMemory(Attention):
        registry_name = "no_memory_probe"
        supports_memory = False

    class WithMemory(Attention):
        registry_name = "memory_probe"

    with pytest.raises(pytest.skip.Exception, match="supports_memory = False"):
        require_memory(NoMemory)
    require_memory(WithMemory)  # does not skip


def test_causal_mask():
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)  # 2 queries after 3 memory positions
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


# ---- forward: shapes, causality, determinism --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 5])
def test_output_shape(name, T):
    attn = make(name)
    out, mem = attn(inputs(T), None, keep=0)
    assert out.shape == (B, T, D)
    assert out.dtype == torch.float64
    assert mem is None
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_causal_perturbation(name):
    """Changing token t changes no output before t (exactly), and does change the output at t."""
    attn = make(name)
    T = 6
    x = inputs(T)
    with torch.no_grad():
        out, _ = attn(x, None, keep=0)
        for t in range(T):
            x2 = x.clone()
            x2[:, t] += torch.randn(B, D, dtype=x.dtype)
            out2, _ = attn(x2, None, keep=0)
            assert torch.equal(out2[:, :t], out[:, :t]), f"position < {t} sees token {t}"
            if t == 1 and not attn.attends_to_self:
                continue  # position 1 attends to position 0 only: its output cannot depend on itself
            assert not torch.allclose(out2[:, t], out[:, t]), f"position {t} does not see itself"


@pytest.mark.parametrize("name", NAMES)
def test_causal_gradient_with_memory(name):
    """With a memory, output s depends on every memory position and on segment positions <= s only."""
    attn = make(name)
    require_memory(attn)
    T, M = 5, 3
    _, mem = attn(inputs(M), None, keep=M)
    x = inputs(T).requires_grad_()
    mem = HiddenMemory(mem.hidden.detach().requires_grad_()) if isinstance(mem, HiddenMemory) else mem
    out, _ = attn(x, mem, keep=M)
    wrt = [x] + ([mem.hidden] if isinstance(mem, HiddenMemory) else [])
    for s in range(T):
        grads = torch.autograd.grad(out[:, s].sum(), wrt, retain_graph=True)
        gx = grads[0].abs().sum(dim=(0, 2))  # T
        assert torch.all(gx[s + 1 :] == 0), f"output {s} depends on later positions"
        assert torch.all(gx[: s + 1] > 0), f"output {s} ignores an earlier position"
        if len(grads) > 1:
            assert torch.all(grads[1].abs().sum(dim=(0, 2)) > 0), f"output {s} ignores a memory position"


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_are_independent(name):
    attn = make(name)
    x = inputs(5)
    x2 = x.clone()
    x2[1] = torch.randn(5, D, dtype=x.dtype)
    out, _ = attn(x, None, keep=0)
    out2, _ = attn(x2, None, keep=0)
    torch.testing.assert_close(out2[0], out[0], **EXACT64)
    assert not torch.allclose(out2[1], out[1])


@pytest.mark.parametrize("name", NAMES)
def test_dropout_is_off_in_eval_mode(name):
    x = inputs(5)
    out, _ = make(name)(x, None, keep=0)
    out_dropout, _ = make(name, dropout=0.5)(x, None, keep=0)  # same seed: same weights
    torch.testing.assert_close(out_dropout, out, **EXACT64)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    """Unused parameters break DDP; with a memory, the key/value projections also learn from it."""
    attn = make(name).train()
    _, mem = attn(inputs(3), None, keep=3) if type(attn).supports_memory else (None, None)
    out, _ = attn(inputs(4), mem, keep=3)
    out.square().sum().backward()
    for pname, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_naive_is_the_formula_of_its_docstring():
    """softmax(Q K^T / sqrt(Dh), masked causally) V, written out by hand, with a memory."""
    attn = make("naive")
    mem_x, x = inputs(3), inputs(4)
    _, mem = attn(mem_x, None, keep=3)
    out, _ = attn(x, mem, keep=3)

    ctx = torch.cat([mem_x, x], dim=1)  # B x S x D
    q = attn.q_proj(x).view(B, 4, H, D // H).transpose(1, 2)  # B x H x T x Dh
    k, v = (t.view(B, 7, H, D // H).transpose(1, 2) for t in attn.kv_proj(ctx).chunk(2, dim=-1))  # B x H x S x Dh
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)  # B x H x T x S
    allowed = torch.arange(7)[None, :] <= torch.arange(4)[:, None] + 3  # query t sits at key position 3 + t
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    expected = attn.out_proj(expected.transpose(1, 2).reshape(B, 4, D))
    torch.testing.assert_close(out, expected, **EXACT64)


# ---- memory -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [0, 4], ids=["keep=len(x1)", "keep>len(x1)"])
def test_memory_equals_one_long_pass(name, extra):
    attn = make(name)
    require_memory(attn)
    x1, x2 = inputs(5), inputs(4)
    with torch.no_grad():
        full, _ = attn(torch.cat([x1, x2], dim=1), None, keep=0)
        out1, mem = attn(x1, None, keep=5 + extra)
        out2, _ = attn(x2, mem, keep=5 + extra)
    torch.testing.assert_close(out1, full[:, :5], **EXACT64)
    torch.testing.assert_close(out2, full[:, 5:], **EXACT64)


@pytest.mark.parametrize("name", NAMES)
def test_memory_spans_several_segments(name):
    """keep=None keeps everything: three segments == one pass; a big enough keep does the same."""
    attn = make(name)
    require_memory(attn)
    segments = [inputs(3), inputs(1), inputs(4)]
    with torch.no_grad():
        full, _ = attn(torch.cat(segments, dim=1), None, keep=0)
        for keep in (None, 8):
            out, mem = run_segments(attn, segments, keep)
            torch.testing.assert_close(out, full, **EXACT64)
    if isinstance(mem, HiddenMemory):
        assert mem.length == 8


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_memory_keeps_the_last_k_positions(name, keep):
    """With keep=k, every segment sees exactly the last k positions before it: the same as one pass
    over [those k positions; segment]. Segments shorter than k check that older memory survives."""
    attn = make(name)
    require_memory(attn)
    if not attn.windowed_memory:
        pytest.skip(f"{name}: windowed_memory = False (the memory summarizes all the past)")
    segments = [inputs(5), inputs(1), inputs(4), inputs(2)]
    seen = torch.cat(segments, dim=1)
    mem, start = None, 0
    with torch.no_grad():
        for x in segments:
            out, mem = attn(x, mem, keep=keep)
            past = seen[:, max(start - keep, 0) : start]
            reference, _ = attn(torch.cat([past, x], dim=1), None, keep=0)
            torch.testing.assert_close(out, reference[:, past.size(1) :], **EXACT64)
            start += x.size(1)
            if isinstance(mem, HiddenMemory):
                assert torch.equal(mem.hidden, seen[:, max(start - keep, 0) : start])


@pytest.mark.parametrize("name", NAMES)
def test_keep_zero_returns_no_memory(name):
    attn = make(name)
    out, mem = attn(inputs(4), None, keep=0)
    assert mem is None
    if type(attn).supports_memory:
        _, mem = attn(inputs(4), None, keep=2)
        _, mem = attn(inputs(3), mem, keep=0)
        assert mem is None


@pytest.mark.parametrize("name", NAMES)
def test_memory_is_detachable_and_reorderable(name):
    attn = make(name)
    require_memory(attn)
    x = inputs(4, batch=3).requires_grad_()
    _, mem = attn(x, None, keep=None)
    order = torch.tensor([2, 0, 0])
    reordered = mem.index_select(order)
    assert reordered.batch_size == 3
    detached = mem.detach()
    fields = [getattr(detached, f.name) for f in dataclasses.fields(detached)]
    assert not any(t.requires_grad for t in fields if isinstance(t, torch.Tensor))
    # the reordered memory continues the reordered rows
    x2 = inputs(2, batch=3)
    out, _ = attn(x2, reordered, keep=None)
    _, mem_ref = attn(x.detach()[order], None, keep=None)
    ref, _ = attn(x2, mem_ref, keep=None)
    torch.testing.assert_close(out, ref, **EXACT64)


# ---- step-by-step decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_step_by_step_equals_parallel(name):
    attn = make(name)
    require_incremental(attn)
    x = inputs(7)
    with torch.no_grad():
        parallel, _ = attn(x, None, keep=0)
        steps, _ = run_segments(attn, x.split(1, dim=1), keep=None)
    torch.testing.assert_close(steps, parallel, **EXACT64)


# ---- agreement with the naive reference -------------------------------------------------------------
def _load_naive_weights(name, dtype):
    if not ATTENTION_REGISTRY[name].cls.exact_softmax:
        pytest.skip(f"{name}: exact_softmax = False (not softmax attention)")
    naive = make("naive", dtype=dtype, seed=0)
    attn = make(name, dtype=dtype, seed=1)
    shapes = {k: v.shape for k, v in attn.state_dict().items()}
    if shapes != {k: v.shape for k, v in naive.state_dict().items()}:
        pytest.skip(f"{name} has other parameters than naive")
    attn.load_state_dict(naive.state_dict())
    return naive, attn


@pytest.mark.parametrize("name", [n for n in NAMES if n != "naive"])
def test_matches_naive_fp32(name):
    naive, attn = _load_naive_weights(name, torch.float32)
    x1, x2 = inputs(6, torch.float32), inputs(5, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x1, None, keep=0)[0], naive(x1, None, keep=0)[0], **FP32)
        if type(attn).supports_memory:
            for keep in (3, None):
                out, _ = run_segments(attn, [x1, x2], keep)
                ref, _ = run_segments(naive, [x1, x2], keep)
                torch.testing.assert_close(out, ref, **FP32)
        if type(attn).supports_incremental:
            out, _ = run_segments(attn, x1.split(1, dim=1), keep=None)
            torch.testing.assert_close(out, naive(x1, None, keep=0)[0], **FP32)


# ---- typed memory state -----------------------------------------------------------------------------
def test_hidden_memory_extend():
    x1, x2 = inputs(3), inputs(2)
    assert HiddenMemory.extend(None, x1, 0) is None
    assert torch.equal(HiddenMemory.extend(None, x1, None).hidden, x1)
    assert torch.equal(HiddenMemory.extend(None, x1, 2).hidden, x1[:, 1:])
    mem = HiddenMemory.extend(HiddenMemory(x1), x2, 4)
    assert torch.equal(mem.hidden, torch.cat([x1, x2], dim=1)[:, -4:])
    assert mem.length == 4
    assert torch.equal(HiddenMemory.extend(HiddenMemory(x1), x2, 10).hidden, torch.cat([x1, x2], dim=1))


def test_decoder_state_maps_over_layers():
    h = torch.randn(3, 2, D, requires_grad=True)
    state = DecoderState([HiddenMemory(h * 2), None], position=7)
    assert state.batch_size == 3
    picked = state.index_select(torch.tensor([1, 1]))
    assert picked.position == 7 and picked.layers[1] is None and picked.batch_size == 2
    assert torch.equal(picked.layers[0].hidden, (h * 2)[[1, 1]])
    detached = state.detach()
    assert detached.position == 7 and not detached.layers[0].hidden.requires_grad
    assert DecoderState([None, None]).batch_size is None


# ---- positions encoded inside attention, and the no-gradient K/V cache ------------------------------
POSITIONAL = [(n, p) for n in NAMES for p in ATTENTION_REGISTRY[n].cls.encodes_positions]


def make_with_positions(name: str, pos_emb: str, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    options = SimpleNamespace(pos_emb=pos_emb)
    return build_attention(name, D, H, dropout=0.0, options=options).to(torch.float64).eval()


@pytest.mark.parametrize("name,pos_emb", POSITIONAL)
def test_inner_positions_are_valid_across_segments(name, pos_emb):
    """Rotary/ALiBi/relative depend only on distances: segments with memory == one long pass."""
    attn = make_with_positions(name, pos_emb)
    require_memory(attn)
    x = inputs(9)
    whole, _ = attn(x, None, keep=None)
    parts, _ = run_segments(attn, [x[:, :4], x[:, 4:7], x[:, 7:]], keep=None)
    torch.testing.assert_close(parts, whole, **EXACT64)


@pytest.mark.parametrize("name,pos_emb", POSITIONAL)
def test_inner_positions_change_the_output(name, pos_emb):
    """The encoding is really applied: a position-free twin with the same weights differs."""
    attn = make_with_positions(name, pos_emb)
    if attn.requires_own_positions:
        pytest.skip("positions are part of the mechanism (no position-free twin)")
    plain = make_with_positions(name, "none")
    plain.load_state_dict(attn.state_dict())
    x = inputs(6)
    assert not torch.allclose(attn(x, None, keep=0)[0], plain(x, None, keep=0)[0])


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_memory_caches_keys_and_values_exactly(name):
    """Without gradients the memory keeps K/V and reuses them; the result equals recomputing them from the
    cached hidden states (the training path), segment after segment."""
    attn = make(name)
    require_memory(attn)
    x = inputs(10)
    with torch.no_grad():
        cached, mem = run_segments(attn, [x[:, :4], x[:, 4:7], x[:, 7:]], keep=5)
    recomputed, mem_grad = run_segments(attn, [x[:, :4], x[:, 4:7], x[:, 7:]], keep=5)
    if isinstance(mem, HiddenMemory):
        assert mem.keys is not None and mem.keys.size(2) == 5  # the cache is there and trimmed
        assert mem_grad.keys is None  # never cached when gradients flow (Transformer-XL recomputes)
    torch.testing.assert_close(cached, recomputed.detach(), **EXACT64)

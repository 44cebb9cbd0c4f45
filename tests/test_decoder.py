"""``efficient_lm`` built the real way (``EfficientLM.build_model(cfg, task)``) and its criterion.

Equivalences proved here: cached (incremental) decoding == one full forward, for every registered
attention and every option that touches the forward; beam reorder then step == step on the reordered
batch; fairseq's own SequenceGenerator scores == a full forward's; stream memory (segment 1 then
segment 2, consecutive ``stream_offset``) == one pass over both segments, and the memory is used only
where it continues (``stream_offset`` given and equal to where it ended, same batch size). Plus
``validate_config``'s user errors, layer sharing, the bf16 autocast, and ``aux_cross_entropy``'s loss,
auxiliary terms and metrics.

Shapes: B = batch (streams), T = tokens, V = vocabulary (24 = 4 specials + 20 words).
"""

import argparse
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fairseq.logging import metrics
from fairseq.sequence_generator import SequenceGenerator

from plugins.attention import ATTENTION_REGISTRY, Attention, AuxLoss, build_attention
from plugins.attention.base import RegistryEntry
from plugins.criterions.aux_cross_entropy import AuxCrossEntropyCriterion
from plugins.errors import UserError
from plugins.memory import HiddenMemory
from plugins.models.decoder import UNBOUNDED_POSITIONS
from plugins.models.efficient_lm import EfficientLMConfig, validate_config
from plugins.models.presets.full import full_tiny
from plugins.modules.decoder_layer import DecoderLayer
from plugins.modules.feedforward import FeedForward

V = 24
FP32 = dict(rtol=0, atol=1e-5)  # float32 logits of a 2-layer, 16-dim model: only summation order differs
INCREMENTAL_ATTENTIONS = sorted(n for n, e in ATTENTION_REGISTRY.items() if e.cls.supports_incremental)
MEMORY_ATTENTIONS = sorted(n for n, e in ATTENTION_REGISTRY.items() if e.cls.supports_memory)

# every option that changes the forward pass; cutoffs are small because V is 24
DECODER_VARIANTS = {
    "sinusoidal-postnorm": {},
    "learned-prenorm": dict(pos_emb="learned", decoder_normalize_before=True),
    "none-prenorm": dict(pos_emb="none", decoder_normalize_before=True),
    "none-postnorm-no-scale": dict(pos_emb="none", no_scale_embedding=True),
    "share-layers": dict(share_layers=True, decoder_layers=3),
    "no-ffn": dict(decoder_ffn_embed_dim=0),
    "tied-embeddings": dict(share_decoder_input_output_embed=True),
    "adaptive-softmax": dict(adaptive_softmax_cutoff="8,16"),
    "adaptive-input-softmax-tied": dict(
        adaptive_input=True,
        adaptive_input_cutoff="8,16",
        adaptive_softmax_cutoff="8,16",
        tie_adaptive_weights=True,
        tie_adaptive_proj=True,
    ),
    "mem-len-covers-all": dict(pos_emb="none", mem_len=16),  # keep >= length: nothing is forgotten
}


def pos_emb_for(attention: str, preferred: str) -> str:
    """``preferred`` if ``attention`` accepts it, else the positions the attention encodes itself (e.g.
    ``relative`` for Transformer-XL attention, which rejects sinusoidal / none)."""
    cfg = EfficientLMConfig()
    cfg.attention, cfg.pos_emb = attention, preferred
    try:
        validate_config(cfg)
        return preferred
    except UserError:
        return ATTENTION_REGISTRY[attention].cls.encodes_positions[0]


def tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(4, V, (B, T))  # no special symbols


def log_probs(model, tokens_, **kwargs) -> torch.Tensor:
    return model.get_normalized_probs(model(tokens_, **kwargs), log_probs=True)  # B x T x V


def decode_incrementally(model, toks: torch.Tensor, incremental_state=None, start: int = 1) -> torch.Tensor:
    """Feed growing prefixes as SequenceGenerator does; return the new position's log-probs of each step."""
    incremental_state = {} if incremental_state is None else incremental_state
    steps = [log_probs(model, toks[:, :t], incremental_state=incremental_state) for t in range(start, toks.size(1) + 1)]
    return torch.cat(steps, dim=1)


# ---- incremental decoding -----------------------------------------------------------------------------
# every variant with the default attention, and every attention that decodes step by step with the
# default variant (the attention itself is checked step by step in test_attention.py); an attention
# that encodes positions itself gets its own --pos-emb instead of the variant's
INCREMENTAL_CASES = [("full", v) for v in sorted(DECODER_VARIANTS)] + [
    (a, "sinusoidal-postnorm") for a in INCREMENTAL_ATTENTIONS if a != "full"
]


@pytest.mark.parametrize("attention, variant", INCREMENTAL_CASES)
def test_incremental_equals_full_forward(lm, attention, variant):
    options = dict(DECODER_VARIANTS[variant])
    options["pos_emb"] = pos_emb_for(attention, options.get("pos_emb", "sinusoidal"))
    model = lm(attention=attention, **options).eval()
    toks = tokens(3, 12)
    with torch.no_grad():
        full = log_probs(model, toks)
        model.reset_memory()
        steps = decode_incrementally(model, toks)
    assert steps.shape == full.shape == (3, 12, V)
    torch.testing.assert_close(steps, full, **FP32)


def test_incremental_decoding_consumes_only_new_tokens(lm):
    """After a prompt of 4, the next call with 5 tokens runs the decoder on one token."""
    model = lm().eval()
    toks = tokens(2, 5)
    state = {}
    with torch.no_grad():
        out, _ = model(toks[:, :4], incremental_state=state)
        assert out.shape == (2, 4, V)  # the prompt in one call
        out, _ = model(toks, incremental_state=state)
        assert out.shape == (2, 1, V)
        torch.testing.assert_close(out, model(toks)[0][:, -1:], **FP32)
    decoder_state = model.decoder.get_incremental_state(state, "state")
    assert decoder_state.position == 5
    for layer_state in decoder_state.layers:  # a full-context model keeps every past position
        if isinstance(layer_state, HiddenMemory):
            assert layer_state.length == 5


def test_incremental_with_bounded_memory_sees_mem_len_past_tokens(lm):
    """A model trained with --mem-len M decodes with M past positions: the first M+1 match a full pass."""
    model = lm(pos_emb="none", mem_len=3).eval()
    toks = tokens(2, 8)
    with torch.no_grad():
        full = log_probs(model, toks)
        model.reset_memory()
        steps = decode_incrementally(model, toks)
    torch.testing.assert_close(steps[:, :4], full[:, :4], **FP32)
    assert not torch.allclose(steps[:, 4:], full[:, 4:], atol=1e-3)  # the window is really bounded


def test_reorder_then_step_equals_stepping_the_reordered_batch(lm):
    model = lm().eval()
    toks = tokens(3, 6)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = {}
        decode_incrementally(model, toks[:, :4], state)
        model.decoder.reorder_incremental_state_scripting(state, order)  # what SequenceGenerator calls
        after_reorder = decode_incrementally(model, toks[order], state, start=5)

        reference = decode_incrementally(model, toks[order], {}, start=1)[:, 4:]
    torch.testing.assert_close(after_reorder, reference, **FP32)
    assert not torch.allclose(after_reorder, decode_incrementally(model, toks, {})[:, 4:], atol=1e-3)


def test_identity_reorder_keeps_the_cached_state_without_copying_it(lm):
    """The generator reorders after every step, mostly with the identity: the cache is then kept as is."""
    model = lm().eval()
    with torch.no_grad():
        state = {}
        decode_incrementally(model, tokens(3, 4), state)
        before = model.decoder.get_incremental_state(state, "state")
        model.decoder.reorder_incremental_state_scripting(state, torch.arange(3))
        assert model.decoder.get_incremental_state(state, "state") is before
        model.decoder.reorder_incremental_state_scripting(state, torch.tensor([1, 0, 2]))
        assert model.decoder.get_incremental_state(state, "state") is not before


@pytest.mark.parametrize("variant", ["sinusoidal-postnorm", "adaptive-softmax"])
def test_sequence_generator_scores_equal_full_forward(lm, dictionary, variant):
    """fairseq's beam search (incremental state, beam reorders) scores every hypothesis as one full
    forward over it does."""
    model = lm(dictionary, **DECODER_VARIANTS[variant]).eval()
    generator = SequenceGenerator([model], dictionary, beam_size=3, max_len_b=6, min_len=6)
    prompt = tokens(2, 3)
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.tensor([3, 3])}}
    with torch.no_grad():
        hypos = generator.generate([model], sample, prefix_tokens=prompt)
        assert len(hypos) == 2 and all(len(h) == 3 for h in hypos)
        for row, beam in enumerate(hypos):
            for hypo in beam:
                out = hypo["tokens"]
                assert torch.equal(out[:3], prompt[row]) and out[-1] == dictionary.eos()
                inp = torch.cat([torch.tensor([dictionary.eos()]), out[:-1]])[None]  # 1 x T
                expected = log_probs(model, inp)[0].gather(-1, out[:, None]).squeeze(-1)
                torch.testing.assert_close(hypo["positional_scores"], expected, **FP32)


# ---- stream memory (segment_lm training and evaluation) ----------------------------------------------
# segment_lm batches carry ``stream_offset`` (segment index x tokens_per_sample); the decoder uses its
# stored memory only when the memory ended exactly at that offset, for the same number of streams.
@pytest.mark.parametrize("attention", MEMORY_ATTENTIONS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stream_memory_equals_one_long_pass(lm, attention, mode):
    """Segment 1 then segment 2 == one pass over both, when mem_len >= len(segment 1) (dropout 0)."""
    model = lm(attention=attention, pos_emb=pos_emb_for(attention, "none"), mem_len=6).train(mode == "train")
    seg1, seg2 = tokens(3, 5), tokens(3, 4)
    with torch.no_grad():
        full, _ = model(torch.cat([seg1, seg2], dim=1))
        model.reset_memory()
        out1, _ = model(seg1, stream_offset=0)
        out2, _ = model(seg2, stream_offset=5)
        model.reset_memory()
        alone, _ = model(seg2, stream_offset=5)
    torch.testing.assert_close(out1, full[:, :5], **FP32)
    torch.testing.assert_close(out2, full[:, 5:], **FP32)
    assert not torch.allclose(out2, alone, atol=1e-3)  # segment 2 really used the memory


def test_stream_memory_keeps_mem_len_positions(lm):
    """One layer: the memory is the embedded last M tokens, so segment 2 == a pass over [last M; seg2]."""
    model = lm(pos_emb="none", mem_len=2, decoder_layers=1).eval()
    seg1, seg2 = tokens(2, 5), tokens(2, 3)
    with torch.no_grad():
        model(seg1, stream_offset=0)
        out2, _ = model(seg2, stream_offset=5)
        memory = model.decoder.stream_memory["eval"]
        assert memory.position == 8 and all(m.length == 2 for m in memory.layers)
        model.reset_memory()
        ref, _ = model(torch.cat([seg1[:, -2:], seg2], dim=1))
    torch.testing.assert_close(out2, ref[:, 2:], **FP32)


def test_stream_memory_is_kept_per_mode(lm):
    model = lm(pos_emb="none", mem_len=8)
    seg1, seg2, other = tokens(3, 5), tokens(3, 4), tokens(3, 6)
    with torch.no_grad():
        full, _ = model.eval()(torch.cat([seg1, seg2], dim=1))
        model.reset_memory()
        model.eval()(seg1, stream_offset=0)
        model.train()(other, stream_offset=0)  # a training step in between (dropout 0) must not touch eval memory
        assert set(model.decoder.stream_memory) == {"train", "eval"}
        out2, _ = model.eval()(seg2, stream_offset=5)
    torch.testing.assert_close(out2, full[:, 5:], **FP32)


def test_stream_memory_is_detached(lm):
    model = lm(pos_emb="none", mem_len=4).train()
    model(tokens(2, 5), stream_offset=0)[0].sum().backward()
    out, _ = model(tokens(2, 5), stream_offset=5)
    out.sum().backward()  # would fail ("backward through the graph a second time") if not detached
    assert all(not m.hidden.requires_grad for m in model.decoder.stream_memory["train"].layers)


def test_reset_memory(lm):
    model = lm(pos_emb="none", mem_len=8).eval()
    seg1, seg2 = tokens(3, 5), tokens(3, 4)
    with torch.no_grad():
        alone, _ = model(seg2, stream_offset=5)  # nothing stored ends at 5: no memory
        model.reset_memory()
        model.train()(seg1, stream_offset=0)
        model.eval()(seg1, stream_offset=0)
        model.reset_memory("eval")
        assert set(model.decoder.stream_memory) == {"train"}
        torch.testing.assert_close(model(seg2, stream_offset=5)[0], alone, **FP32)
        model.reset_memory()
        assert model.decoder.stream_memory == {}


def test_a_new_batch_size_drops_the_memory(lm):
    model = lm(pos_emb="none", mem_len=8).eval()
    seg1, seg2 = tokens(3, 5), tokens(2, 4)
    with torch.no_grad():
        alone, _ = model(seg2, stream_offset=5)
        model.reset_memory()
        model(seg1, stream_offset=0)
        torch.testing.assert_close(model(seg2, stream_offset=5)[0], alone, **FP32)
        assert model.decoder.stream_memory["eval"].batch_size == 2


def test_memory_is_used_only_where_it_ended(lm):
    """A memory ending at 5 continues the batch at offset 5 only: another offset (a skipped segment,
    or 0: a new epoch or pass) starts afresh, and the new memory ends where that batch ends."""
    model = lm(pos_emb="none", mem_len=8).eval()
    seg1, seg2 = tokens(3, 5), tokens(3, 4)
    with torch.no_grad():
        fresh, _ = model(seg2, stream_offset=0)
        continued, _ = model(seg2, stream_offset=0)  # the memory ends at 4: offset 0 does not use it
        torch.testing.assert_close(continued, fresh, rtol=0, atol=0)
        model(seg1, stream_offset=0)
        skipped, _ = model(seg2, stream_offset=6)
        torch.testing.assert_close(skipped, fresh, rtol=0, atol=0)
        assert model.decoder.stream_memory["eval"].position == 10
        model(seg1, stream_offset=0)
        assert not torch.allclose(model(seg2, stream_offset=5)[0], fresh, atol=1e-3)


def test_without_stream_offset_batches_run_without_memory(lm, caplog):
    """A model with --mem-len outside segment_lm (no ``stream_offset``): every batch alone, one warning."""
    model = lm(pos_emb="none", mem_len=8).eval()
    seg1, seg2 = tokens(3, 5), tokens(3, 4)
    with torch.no_grad(), caplog.at_level("WARNING"):
        alone, _ = model(seg2)
        model(seg1)
        torch.testing.assert_close(model(seg2)[0], alone, rtol=0, atol=0)
    assert model.decoder.stream_memory == {}
    assert sum("--mem-len needs --task segment_lm" in r.getMessage() for r in caplog.records) == 1


def test_a_sequence_longer_than_a_segment_is_read_in_segments_with_memory(lm):
    """With ``read_in_segments`` (the hub's score), N > --tokens-per-sample tokens in one call give what
    segment_lm gives when it feeds the same tokens as consecutive segments of a stream; nothing is kept."""
    model = lm(attention="relative", pos_emb="relative", mem_len=6, tokens_per_sample=4).eval()
    x = tokens(2, 11)
    with torch.no_grad():
        alone, _ = model(x)  # by default: one pass over the 11 tokens
        model.decoder.read_in_segments = True
        at_once, _ = model(x)
        assert model.decoder.stream_memory == {}
        streamed = torch.cat([model(x[:, s : s + 4], stream_offset=s)[0] for s in range(0, 11, 4)], dim=1)
        model.reset_memory()
        torch.testing.assert_close(at_once, streamed, rtol=0, atol=1e-6)
        no_memory = torch.cat([model(x[:, s : s + 4])[0] for s in range(0, 11, 4)], dim=1)
    assert not torch.allclose(at_once[:, 4:], no_memory[:, 4:], atol=1e-3)  # the memory is used
    assert not torch.allclose(at_once[:, 4:], alone[:, 4:], atol=1e-3)


def test_no_memory_without_mem_len(lm):
    model = lm().eval()
    x = tokens(2, 4)
    with torch.no_grad():
        first, _ = model(x)
        model(tokens(2, 4))
        torch.testing.assert_close(model(x)[0], first, rtol=0, atol=0)
    assert model.decoder.stream_memory == {}


# ---- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(decoder_attention_heads=3), "does not divide"),
        (dict(decoder_layers=0), "must be positive"),
        (dict(mem_len=-1), "must be >= 0"),
        (dict(decoder_ffn_embed_dim=-1), "must be >= 0"),
        (dict(mem_len=4, pos_emb="sinusoidal"), "absolute"),
        (dict(mem_len=4, pos_emb="learned"), "absolute"),
        (dict(adaptive_input=True), "adaptive-input-cutoff"),
        (dict(tie_adaptive_weights=True, adaptive_softmax_cutoff="8,16"), "tie-adaptive-weights"),
        (dict(share_decoder_input_output_embed=True, adaptive_softmax_cutoff="8,16"), "tie-adaptive-weights"),
    ],
)
def test_validate_config_rejects(lm_config, overrides, message):
    with pytest.raises(UserError, match=message):
        validate_config(lm_config(**overrides))


def test_validate_config_accepts_the_defaults(lm_config):
    validate_config(lm_config())
    validate_config(lm_config(pos_emb="none", mem_len=16))


def test_unknown_attention_is_a_user_error(lm_config):
    with pytest.raises(UserError, match="attention"):
        validate_config(lm_config(attention="no_such_attention"))


def test_unknown_pos_emb_is_rejected_by_validate_config(lm_config):
    with pytest.raises(UserError, match="pos-emb"):
        validate_config(lm_config(pos_emb="no_such_positions"))


def test_unknown_pos_emb_fails_the_build(lm):
    with pytest.raises(UserError, match="pos-emb"):
        lm(pos_emb="no_such_positions")


def test_mem_len_needs_an_attention_that_supports_memory(monkeypatch, lm_config):
    class NoMemory(Attention):
        supports_memory = False

    monkeypatch.setitem(
        ATTENTION_REGISTRY, "no_memory_probe", RegistryEntry(NoMemory, ATTENTION_REGISTRY["full"].config)
    )
    validate_config(lm_config(attention="no_memory_probe", pos_emb="none"))
    with pytest.raises(UserError, match="cannot attend over a memory"):
        validate_config(lm_config(attention="no_memory_probe", pos_emb="none", mem_len=4))


def test_build_model_defaults_max_positions_to_tokens_per_sample(lm):
    model = lm(pos_emb="learned", tokens_per_sample=12, max_target_positions=None)
    assert model.decoder.max_positions() == 12
    assert model.decoder.positions.weight.shape == (12, 16)
    assert lm(pos_emb="none", max_target_positions=64).decoder.max_positions() == UNBOUNDED_POSITIONS


def test_learned_positions_past_the_table_are_a_user_error(lm):
    model = lm(pos_emb="learned", max_target_positions=4).eval()
    model(tokens(1, 4))
    with pytest.raises(UserError, match="max-target-positions"):
        model(tokens(1, 5))


def test_every_option_has_help():
    for f in dataclasses.fields(EfficientLMConfig):
        if f.name not in ("tokens_per_sample", "max_target_positions", "_name"):
            assert f.metadata.get("help"), f"--{f.name.replace('_', '-')} has no help text"


def test_presets_only_set_defaults():
    args = argparse.Namespace(decoder_layers=5)
    full_tiny(args)
    assert args.decoder_layers == 5  # the command line wins
    assert args.decoder_embed_dim == 64  # the preset fills the rest


# ---- structure ----------------------------------------------------------------------------------------
def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_share_layers_shares_the_weights(lm):
    shared = lm(share_layers=True, decoder_layers=4, seed=0).eval()
    single = lm(decoder_layers=1, seed=0).eval()  # same construction order: same initial weights
    assert _num_params(shared) == _num_params(single)
    assert _num_params(lm(decoder_layers=4)) > _num_params(single)
    assert len(shared.decoder.layers) == 1
    shared.load_state_dict(single.state_dict())  # strict: the same parameters
    x = tokens(2, 5)
    with torch.no_grad():
        assert not torch.allclose(shared(x)[0], single(x)[0], atol=1e-3)  # the layer is applied 4 times
        state = {}
        shared(x, incremental_state=state)
        layer_states = shared.decoder.get_incremental_state(state, "state").layers
    assert len(layer_states) == 4  # every application has its own memory
    assert not any(torch.equal(layer_states[0].hidden, s.hidden) for s in layer_states[1:])


@pytest.mark.parametrize("variant", ["sinusoidal-postnorm", "learned-prenorm", "adaptive-input-softmax-tied"])
def test_every_parameter_gets_a_gradient(lm, variant):
    """Every layer's own weights are used (DDP fails on unused parameters)."""
    model = lm(**DECODER_VARIANTS[variant], decoder_layers=3).train()
    x = tokens(2, 6)
    features, _ = model(x, features_only=True)
    if model.decoder.adaptive_softmax is not None:
        logits, targets = model.decoder.adaptive_softmax(features, x.reshape(-1))
        loss = sum(F.cross_entropy(lg, tg, reduction="sum") for lg, tg in zip(logits, targets) if lg is not None)
    else:
        loss = model.decoder.output_layer(features).logsumexp(-1).sum()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert unused == [], unused


@pytest.mark.parametrize("normalize_before", [True, False], ids=["pre-norm", "post-norm"])
def test_decoder_layer_is_the_formula_of_its_docstring(lm, normalize_before):
    attention = build_attention("naive", 16, 2, dropout=0.0, options=SimpleNamespace())
    layer = DecoderLayer(attention, FeedForward(16, 32, "relu", 0.0), 16, 0.0, normalize_before).double()
    for norm in (layer.attn_norm, layer.ffn_norm):  # non-trivial affine parameters
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, _ = layer(x, None, keep=0)

    def attn(h):
        return layer.attn(h, None, keep=0)[0]

    if normalize_before:  # x = x + Attn(LN(x)); x = x + FFN(LN(x))
        h = x + attn(layer.attn_norm(x))
        expected = h + layer.ffn(layer.ffn_norm(h))
    else:  # x = LN(x + Attn(x)); x = LN(x + FFN(x))
        h = layer.attn_norm(x + attn(x))
        expected = layer.ffn_norm(h + layer.ffn(h))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (lm(decoder_normalize_before=normalize_before).decoder.final_norm is not None) == normalize_before


def test_zero_ffn_dim_builds_layers_without_feedforward(lm):
    model = lm(decoder_ffn_embed_dim=0)
    for layer in model.decoder.layers:
        assert layer.ffn is None and layer.ffn_norm is None
    assert not any("ffn" in name or "fc1" in name for name, _ in model.named_parameters())
    out, _ = model(tokens(2, 4))
    assert out.shape == (2, 4, V)


def test_tied_embeddings_share_the_tensor(lm):
    model = lm(share_decoder_input_output_embed=True)
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight


# ---- precision ----------------------------------------------------------------------------------------
def test_autocast_bf16_on_cpu(lm):
    """bf16 autocast: logits stay float32 and within 0.05 of the fp32 model's (logits here are O(1);
    bf16 keeps 8 bits of mantissa, ~4e-3 relative per op), yet differ from them (autocast ran)."""
    x = tokens(3, 8)
    with torch.no_grad():
        ref, _ = lm(seed=0).eval()(x)
        out, _ = lm(seed=0, autocast_bf16=True).eval()(x)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05)
    assert not torch.equal(out, ref)


def test_autocast_bf16_with_stream_memory_and_backward(lm):
    model = lm(pos_emb="none", mem_len=4, autocast_bf16=True).train()
    for i in range(2):
        out, _ = model(tokens(2, 5), stream_offset=5 * i)
        assert out.dtype == torch.float32
        out.float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.decoder.stream_memory["train"].position == 10  # the second step continued the first


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pos_emb", ["sinusoidal", "none"])
def test_model_runs_in_its_own_dtype(lm, dtype, pos_emb):
    """``model.to(dtype)`` is what fairseq's --fp16 / --bf16 trainers do (and float64 is what precise
    tests need): the forward must run in that dtype and return logits of that dtype."""
    model = lm(pos_emb=pos_emb).to(dtype).eval()
    with torch.no_grad():
        out, _ = model(tokens(2, 5))
    assert out.dtype == dtype


# ---- criterion: aux_cross_entropy ---------------------------------------------------------------------
def make_sample(pad: int):
    """Targets are every word of the vocabulary once (4..23, so every adaptive-softmax cluster and
    every position inside a cluster is scored); the second stream ended: padding at its end only."""
    tgt = torch.full((2, 12), pad)
    tgt[0], tgt[1, :8] = torch.arange(4, 16), torch.arange(16, 24)
    src = tokens(2, 12).masked_fill(tgt == pad, pad)
    return {
        "id": torch.arange(2),
        "nsentences": 2,
        "ntokens": 20,
        "net_input": {"src_tokens": src, "src_lengths": torch.tensor([12, 8])},
        "target": tgt,
    }


def hand_nll(lprobs: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    picked = lprobs.gather(-1, target[..., None]).squeeze(-1)  # B x T
    return -(picked * (target != pad)).sum()


@pytest.mark.parametrize("variant", ["sinusoidal-postnorm", "tied-embeddings", "adaptive-softmax"])
def test_criterion_loss_is_the_summed_cross_entropy(lm, dictionary, task_stub, variant):
    """loss == -sum log p(target) over non-pad targets, with p what generation and eval-lm use
    (``get_normalized_probs``). With an adaptive softmax, the words cutoff[i] + pad of every tail (9 and
    17 here) must be scored too: they are class ``pad`` inside their tail, not padding."""
    model = lm(dictionary, **DECODER_VARIANTS[variant]).eval()
    criterion = AuxCrossEntropyCriterion(task_stub(dictionary, "byte"), sentence_avg=False)
    sample = make_sample(dictionary.pad())
    loss, sample_size, log = criterion(model, sample)
    with torch.no_grad():
        expected = hand_nll(log_probs(model, sample["net_input"]["src_tokens"]), sample["target"], dictionary.pad())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)
    assert sample_size == 20 and log["ntokens"] == 20 and log["byte_tokens"] == 20 and log["nsentences"] == 2
    torch.testing.assert_close(log["nll_loss"], expected, rtol=1e-5, atol=1e-4)
    assert not any(k.startswith("aux_") for k in log)


def _inject_aux(model, **terms):
    def hook(module, args, output):
        x, extra = output
        return x, dict(extra, aux_losses=terms)

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_criterion_adds_and_logs_aux_losses(lm, dictionary, task_stub, sentence_avg):
    """Training: loss = cross entropy + sample_size * sum_k w_k aux_k. Validation (eval mode): loss is the
    cross entropy alone, so fairseq's best checkpoint (by validation loss) is the best language model; the
    auxiliary terms are still logged."""
    model = lm(dictionary).train()  # dropout 0: train and eval compute the same cross entropy
    criterion = AuxCrossEntropyCriterion(task_stub(dictionary, "word"), sentence_avg=sentence_avg)
    sample = make_sample(dictionary.pad())
    plain, _, _ = criterion(model, sample)
    _inject_aux(model, span=AuxLoss(torch.tensor(0.25), 0.1), recon=AuxLoss(torch.tensor(2.0), 0.5))
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == (2 if sentence_avg else 20)
    expected = plain + (0.1 * 0.25 + 0.5 * 2.0) * sample_size
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(log["loss"], expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(log["nll_loss"], plain.detach(), rtol=1e-6, atol=1e-5)
    assert float(log["aux_span"]) == pytest.approx(0.25 * sample_size)
    assert float(log["aux_recon"]) == pytest.approx(2.0 * sample_size)
    model.eval()
    loss, _, log = criterion(model, sample)
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(log["loss"], plain.detach(), rtol=1e-6, atol=1e-5)
    assert float(log["aux_recon"]) == pytest.approx(2.0 * sample_size)


def test_model_reports_its_aux_losses(lm):
    model = lm()
    net_output = model(tokens(2, 3))
    assert model.aux_losses(net_output) == {}


@pytest.mark.parametrize("unit, metric", [("byte", "bpb"), ("char", "bpc"), ("word", "ppl"), ("subword", "ppl")])
def test_reduce_metrics(unit, metric):
    ln2 = math.log(2)
    logs = [  # two workers
        {"loss": 30.0, "nll_loss": 28.0, "ntokens": 10, f"{unit}_tokens": 10, "nsentences": 2, "sample_size": 10,
         "aux_span": 2.0},
        {"loss": 12.0, "nll_loss": 11.0, "ntokens": 6, f"{unit}_tokens": 6, "nsentences": 2, "sample_size": 6,
         "aux_span": 1.0},
    ]  # fmt: skip
    with metrics.aggregate(new_root=True) as agg:
        AuxCrossEntropyCriterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    nll_bits = 39.0 / 16 / ln2
    assert values["loss"] == pytest.approx(42.0 / 16 / ln2, abs=1e-3)
    assert values["nll_loss"] == pytest.approx(nll_bits, abs=1e-3)
    assert values["aux_span"] == pytest.approx(3.0 / 16, abs=1e-4)
    expected = 2**nll_bits if metric == "ppl" else nll_bits
    assert values[metric] == pytest.approx(expected, rel=1e-3)
    assert not ({"bpb", "bpc", "ppl"} - {metric}) & set(values)


def test_criterion_unit_comes_from_the_task(dictionary, task_stub):
    assert AuxCrossEntropyCriterion(task_stub(dictionary, "char"), sentence_avg=False).unit == "char"
    assert AuxCrossEntropyCriterion(argparse.Namespace(target_dictionary=dictionary), False).unit == "word"


def test_criterion_backward(lm, dictionary, task_stub):
    model = lm(dictionary).train()
    criterion = AuxCrossEntropyCriterion(task_stub(dictionary), sentence_avg=False)
    loss, _, _ = criterion(model, make_sample(dictionary.pad()))
    loss.backward()
    assert model.decoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0

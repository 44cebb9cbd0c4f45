"""Pre-norm layers with memory (issue 16, item 3): the memory holds the RAW layer inputs, and the attention
normalizes ``[memory; segment]`` with the current LayerNorm weights, as the official Transformer-XL's
``pre_lnorm`` (``mem_transformer.py``: ``w_heads = self.qkv_net(self.layer_norm(cat([mems, w])))``). So
the attention LayerNorm also learns from the memory positions.

References written here, not taken from the plugin:
- ``reference_full_prenorm``: a pre-norm full-attention decoder in one plain loop, LN applied to the
  concatenation of the stored raw inputs and the segment, float64;
- for every mechanism that recomputes keys/values from hidden states: one pass over [past; segment] where
  every layer's input is detached on the past positions (what the memory is: the past inputs, detached),
  loss on the segment only; segments with memory must give the same values AND gradients.

Shapes: B = batch, T = segment, M = memory, L = one-pass length, D = model dim, H = heads, Dh = head dim.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from plugins.attention import ATTENTION_REGISTRY
from plugins.memory import HiddenMemory
from plugins.modules.decoder_layer import DecoderLayer

V = 24
B, D, H = 2, 16, 2
EXACT64 = dict(rtol=0, atol=1e-10)


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(4, V, (batch, length))


def prenorm_lm(lm, **overrides):
    """A float64 pre-norm model whose LayerNorms have non-trivial affine parameters (so that a missing
    or stale normalization shows in the values and the gradients)."""
    model = lm(decoder_normalize_before=True, **overrides).double()
    with torch.no_grad():
        for layer in model.decoder.layers:
            for norm in (layer.attn_norm, layer.ffn_norm):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_(std=0.5)
    return model


def gradients(model, logits: torch.Tensor, probe: torch.Tensor) -> dict:
    """d(sum(logits * probe))/d(parameter) for every parameter (None where it gets none)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((logits * probe).sum(), list(params.values()), allow_unused=True)
    return dict(zip(params, grads))


def assert_same_gradients(ours: dict, reference: dict, **tol) -> None:
    assert ours.keys() == reference.keys()
    for name in ours:
        a, b = ours[name], reference[name]
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        assert a is not None, f"{name}: no gradient"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---- a plain reference: pre-norm full attention, LN over [stored raw inputs; segment] -------------------
def reference_full_prenorm(model, toks: torch.Tensor, mems):
    """Logits of a pre-norm full-attention decoder (no positions) over ``toks`` (B x T) with ``mems`` (one
    B x M x D tensor of raw layer inputs per layer, or None), and this segment's raw layer inputs."""
    dec = model.decoder
    T = toks.size(1)
    Dh = D // H
    x = dec.embed_scale * dec.embed_tokens(toks)  # B x T x D
    inputs = []
    for layer, mem in zip(dec.layers, mems):
        inputs.append(x.detach())
        raw = x if mem is None else torch.cat([mem, x], dim=1)  # B x (M+T) x D: stored inputs, then segment
        M = raw.size(1) - T
        ln = layer.attn_norm
        h = F.layer_norm(raw, (D,), ln.weight, ln.bias, ln.eps)  # the CURRENT weights on memory and segment
        a = layer.attn
        q = F.linear(h[:, M:], a.q_proj.weight, a.q_proj.bias).view(B, T, H, Dh).transpose(1, 2)
        k, v = F.linear(h, a.kv_proj.weight, a.kv_proj.bias).chunk(2, dim=-1)
        k, v = (t.reshape(B, M + T, H, Dh).transpose(1, 2) for t in (k, v))  # B x H x (M+T) x Dh
        scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # B x H x T x (M+T)
        allowed = torch.arange(M + T)[None, :] <= torch.arange(T)[:, None] + M  # every memory key, causal segment
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(B, T, D)
        x = x + F.linear(out, a.out_proj.weight, a.out_proj.bias)
        f = layer.ffn_norm
        x = x + layer.ffn(F.layer_norm(x, (D,), f.weight, f.bias, f.eps))
    fn = dec.final_norm  # pre-norm models end with a LayerNorm (README: not in the official pre_lnorm)
    x = F.layer_norm(x, (D,), fn.weight, fn.bias, fn.eps)
    return F.linear(x, dec.output_projection.weight), inputs


def test_prenorm_memory_gradients_equal_the_plain_reference(lm):
    """Three segments (memory 4 < 2 segments of 3: old positions leave), gradients after the third: every
    parameter, the attention LayerNorms included, as the plain reference. Before issue 16 the memory held
    LN outputs of the segment that produced them: the LN gradient was off (relative ~0.9)."""
    M, T = 4, 3
    model = prenorm_lm(lm, attention="full", pos_emb="none", mem_len=M).eval()
    segs = tokens(B, 3 * T).split(T, dim=1)
    for i, seg in enumerate(segs[:2]):  # the model's memory: segment 1, then 2
        model(seg, stream_offset=i * T)
    memory = model.decoder.stream_memory["eval"].layers
    logits, _ = model(segs[2], stream_offset=2 * T)

    inputs = [None] * model.decoder.num_layers
    stored = [None] * model.decoder.num_layers
    for seg in segs[:2]:
        with torch.no_grad():
            _, raw = reference_full_prenorm(model, seg, stored)
        inputs = [r if s is None else torch.cat([s, r], dim=1) for s, r in zip(inputs, raw)]
        stored = [t[:, -M:] for t in inputs]
    reference, _ = reference_full_prenorm(model, segs[2], stored)
    torch.testing.assert_close(logits, reference, **EXACT64)
    for state, expected in zip(memory, stored):
        torch.testing.assert_close(state.hidden, expected, **EXACT64)  # the memory is the raw inputs

    probe = torch.randn_like(logits)
    ours, ref = gradients(model, logits, probe), gradients(model, reference, probe)
    assert ref["decoder.layers.0.attn_norm.weight"].abs().sum() > 0
    assert_same_gradients(ours, ref, **EXACT64)


# ---- every mechanism that recomputes keys/values from the stored hidden states -------------------------
def recomputing(name: str) -> bool:
    """Mechanisms whose memory is a ``HiddenMemory`` of past inputs, recomputed at every segment."""
    cls = ATTENTION_REGISTRY[name].cls
    return cls.supports_memory and cls.windowed_memory


MECHANISMS = {  # case: model options (float64, 2 layers, D 16)
    **{
        name: dict(attention=name, pos_emb=ATTENTION_REGISTRY[name].cls.encodes_positions[0])
        if ATTENTION_REGISTRY[name].cls.requires_own_positions
        else dict(attention=name, pos_emb="none")
        for name in sorted(ATTENTION_REGISTRY)
        if recomputing(name)
    },
    "full-rotary": dict(attention="full", pos_emb="rotary"),
    "full-alibi-persistent": dict(attention="full", pos_emb="alibi", persistent_mem_size=3),
    "relative-persistent": dict(attention="relative", pos_emb="relative", persistent_mem_size=2),
    "adaptive_span-official": dict(attention="adaptive_span", pos_emb="relative", span_window="official"),
    "all-attention": dict(
        attention="adaptive_span",
        pos_emb="relative",
        persistent_mem_size=4,
        decoder_ffn_embed_dim=0,
        span_window="official",
    ),  # fmt: skip
}
ADAPTIVE = dict(max_span=16, span_ramp=4)


@pytest.mark.parametrize("case", sorted(MECHANISMS))
def test_segments_with_memory_equal_one_pass_with_detached_past(lm, case):
    """Segment 2 with segment 1's memory == one pass over [segment 1; segment 2] whose every layer input
    is detached on segment 1 (the memory: past inputs, no gradient into the past), logits and every
    gradient, the LayerNorms' included. On the old code the LN gradients differed."""
    options = dict(MECHANISMS[case])
    if options["attention"] == "adaptive_span":
        options.update(ADAPTIVE)
    T1, T2 = 6, 5
    model = prenorm_lm(lm, mem_len=8, **options).eval()
    for layer in model.decoder.layers:
        attn = layer.attn
        if hasattr(attn, "span_fraction"):  # spans inside the window, not all equal
            attn.span_fraction.data = torch.tensor([0.3, 0.8], dtype=torch.float64)
        if hasattr(attn, "u"):  # Transformer-XL biases far from 0 (init N(0, 0.02))
            attn.u.data.normal_()
            attn.v.data.normal_()
    toks = tokens(B, T1 + T2)
    model.reset_memory()
    model(toks[:, :T1], stream_offset=0)
    logits, _ = model(toks[:, T1:], stream_offset=T1)

    def detach_past(layer, args):  # the layer's input on segment 1 positions carries no gradient
        x = args[0]
        return (torch.cat([x[:, :T1].detach(), x[:, T1:]], dim=1), *args[1:])

    handles = [layer.register_forward_pre_hook(detach_past) for layer in model.decoder.layers]
    try:
        whole, _ = model(toks)
    finally:
        for handle in handles:
            handle.remove()
    reference = whole[:, T1:]
    torch.testing.assert_close(logits, reference, **EXACT64)
    probe = torch.randn_like(logits)
    ours, ref = gradients(model, logits, probe), gradients(model, reference, probe)
    assert_same_gradients(ours, ref, **EXACT64)


def test_every_memory_mechanism_is_covered():
    """A newly registered mechanism that recomputes from its memory is in the check above automatically."""
    names = {n for n in ATTENTION_REGISTRY if recomputing(n)}
    assert names <= {options["attention"] for options in MECHANISMS.values()}
    assert {"full", "naive", "relative", "compressive", "adaptive_span"} <= names


# ---- compressive memory: f_c compresses raw inputs; LN applies to [compressed; memory; segment] --------
def test_compressed_memory_holds_compressed_raw_inputs(lm):
    """max_pool f_c: every compressed slot is the max over c RAW layer inputs (the memory's old states, as
    Rae et al. 2020 Algorithm 1), not over LayerNorm outputs."""
    c, M, N, T = 2, 4, 3, 3
    model = prenorm_lm(lm, attention="compressive", pos_emb="relative", mem_len=M, cmem_len=N,
                       compression_rate=c, compression_fn="max_pool", compression_loss="bptt").eval()  # fmt: skip
    toks = tokens(B, 4 * T)
    seen = {i: [] for i in range(model.decoder.num_layers)}

    def record(i):
        def hook(layer, args):
            seen[i].append(args[0].detach())

        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(model.decoder.layers)]
    with torch.no_grad():
        for s in range(4):
            model(toks[:, s * T : (s + 1) * T], stream_offset=s * T)
    for handle in handles:
        handle.remove()
    for i, state in enumerate(model.decoder.stream_memory["eval"].layers):
        raw = torch.cat(seen[i], dim=1)  # B x 12 x D, the layer's inputs
        # 12 positions, memory 4 (+ remainder < c): 8 evicted in blocks of 2 -> 4 slots, the last 3 kept
        expected = raw[:, :8].view(B, 4, c, D).amax(dim=2)[:, -N:]
        torch.testing.assert_close(state.compressed, expected, **EXACT64)
        torch.testing.assert_close(state.hidden, raw[:, 8:], **EXACT64)


def test_compressive_layer_normalizes_compressed_memory_and_segment_together():
    """One pre-norm compressive layer over a state (compressed slots cm, memory m, raw) == the same layer
    over [cm; m; x] in one pass with the past detached (relative distances count slots), values and
    gradients: the LayerNorm is applied to cm and m with the current weights."""
    from types import SimpleNamespace

    from plugins.attention import build_attention
    from plugins.attention.compressive import CompressiveMemory
    from plugins.modules.feedforward import FeedForward

    torch.manual_seed(0)
    options = SimpleNamespace(pos_emb="relative", cmem_len=3, compression_rate=2, compression_fn="max_pool",
                              compression_loss="bptt", mem_len=4)  # fmt: skip
    attn = build_attention("compressive", D, H, 0.0, options)
    layer = DecoderLayer(attn, FeedForward(D, 32, "relu", 0.0), D, 0.0, normalize_before=True).double()
    with torch.no_grad():
        layer.attn_norm.weight.uniform_(0.5, 1.5)
        layer.attn_norm.bias.normal_(std=0.5)
        attn.u.normal_()
        attn.v.normal_()
    cm, m, x = (torch.randn(B, n, D, dtype=torch.float64) for n in (3, 4, 5))
    out, _ = layer(x, CompressiveMemory(m, compressed=cm), keep=4)
    past = torch.cat([cm, m], dim=1)
    whole, _ = layer(torch.cat([past, x], dim=1), None, keep=0)
    reference = whole[:, past.size(1) :]
    torch.testing.assert_close(out, reference, **EXACT64)
    probe = torch.randn_like(out)
    ours, ref = gradients(layer, out, probe), gradients(layer, reference, probe)
    assert_same_gradients(ours, ref, **EXACT64)


def test_hidden_memory_is_the_raw_input_with_prenorm(lm):
    """What the README says: the memory holds the layer inputs (here: the embeddings, layer 0)."""
    model = prenorm_lm(lm, attention="relative", pos_emb="relative", mem_len=5, decoder_layers=1).eval()
    toks = tokens(B, 5)
    with torch.no_grad():
        model(toks, stream_offset=0)
        embedded = model.decoder.embed_scale * model.decoder.embed_tokens(toks)
    state = model.decoder.stream_memory["eval"].layers[0]
    assert isinstance(state, HiddenMemory)
    torch.testing.assert_close(state.hidden, embedded, **EXACT64)


def test_prenorm_attention_reconstruction_compares_what_the_layer_attends():
    """Rae et al. 2020 Algorithm 2 in a pre-norm layer: || attn(LN(x), LN(old)) - attn(LN(x), LN(f_c(old))) ||^2
    with f_c applied to the raw evicted states; the loss trains f_c only (no gradient into the LayerNorm)."""
    from types import SimpleNamespace

    from plugins.attention import build_attention

    torch.manual_seed(0)
    options = SimpleNamespace(pos_emb="relative", cmem_len=4, compression_rate=2, compression_fn="conv",
                              compression_loss="attention_reconstruction")  # fmt: skip
    attn = build_attention("compressive", D, H, 0.0, options).double()
    norm = torch.nn.LayerNorm(D).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(std=0.5)
    x1, x2 = torch.randn(B, 6, D, dtype=torch.float64), torch.randn(B, 3, D, dtype=torch.float64)
    _, mem = attn(x1, None, keep=4, norm=norm)
    _, mem2 = attn(x2, mem.detach(), keep=4, norm=norm)
    old = torch.cat([mem.hidden, x2], dim=1)[:, :2].detach()  # 4 + 3 raw positions, keep 4: a block of 2 leaves
    Dh = D // H
    with torch.no_grad():
        new = attn.compress(old)

        def content(m):
            q = attn.q_proj(norm(x2)).view(B, 3, H, Dh).transpose(1, 2)
            k, v = (t.view(B, -1, H, Dh).transpose(1, 2) for t in attn.kv_proj(norm(m)).chunk(2, dim=-1))
            return (q @ k.transpose(-1, -2) / math.sqrt(Dh)).softmax(-1) @ v

        expected = (content(old) - content(new)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mem2.loss, expected, **EXACT64)
    loss = attn.aux_losses(mem2)["compression"].value
    trained = torch.autograd.grad(loss, [*norm.parameters(), *attn.compress.parameters()], allow_unused=True)
    assert all(g is None for g in trained[:2]) and all(g is not None and g.abs().sum() > 0 for g in trained[2:])

"""Reformer (Kitaev et al. 2020): LSH attention, reversible layers, chunked feed-forward.

- LSH: exact shared-QK causal attention when one bucket/chunk covers the sequence; approaches it with
  more hashing rounds; with several rounds and buckets longer than two chunks, equals one softmax over the
  enumerated union of the pairs the rounds compared; never attends to a later position; self-attention only
  when alone.
- Reversible: gradients of every parameter and of the input equal the plain computation of the same
  coupled network (float32, 1e-5), with dropout on too; the activation memory held during training
  (measured with saved-tensor hooks, forward and backward) does not grow with depth.
- Chunked feed-forward == unchunked. Bad input. One real fairseq-train + fairseq-eval-lm run.

Shapes: B = batch, H = heads, S = positions, Dh = head dim, D = model dim.
"""

import argparse
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_cli import PLUGINS, TRAIN, data_bin, eval_lm_loss, eval_lm_on_valid, fairseq, last_valid  # noqa: F401 (fixture)

from plugins.attention import build_attention
from plugins.attention.lsh import SELF_SCORE, LSHAttention, LSHScoresSoftmax, WindowProduct, even_buckets
from plugins.errors import UserError
from plugins.models.efficient_lm import validate_config
from plugins.models.presets.reformer import reformer_enwik8, reformer_tiny
from plugins.modules.feedforward import FeedForward
from plugins.modules.reversible import coupled_layers, reversible_layers

B, H, Dh = 2, 2, 8


def lsh(n_hashes=1, bucket_size=8, chunk_size=0, dropout=0.0, dtype=torch.float64) -> LSHAttention:
    options = SimpleNamespace(lsh_n_hashes=n_hashes, lsh_bucket_size=bucket_size, lsh_chunk_size=chunk_size)
    return build_attention("lsh", H * Dh, H, dropout, options).to(dtype).eval()


def full_shared_qk(qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with keys = normalized queries, self masked unless alone (the reference)."""
    S = qk.size(2)
    scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / Dh**0.5  # B x H x S x S
    scores = scores.masked_fill(torch.eye(S, dtype=torch.bool), SELF_SCORE)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def qkv(S: int, dtype=torch.float64):
    return torch.randn(B, H, S, Dh, dtype=dtype), torch.randn(B, H, S, Dh, dtype=dtype)


# ---- LSH attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize(
    "S,bucket,chunk", [(16, 8, 16), (5, 4, 8), (32, 32, 16)], ids=["one-chunk", "short", "one-bucket-two-chunks"]
)
def test_one_bucket_is_exact_full_shared_qk_attention(S, bucket, chunk, n_hashes):
    """A sequence within one chunk, or one bucket whose two chunks cover every earlier key, is exact."""
    attn = lsh(n_hashes, bucket, chunk)
    qk, v = qkv(S)
    torch.testing.assert_close(attn.lsh_attend(qk, v), full_shared_qk(qk, v), rtol=0, atol=1e-10)


def test_exact_case_gradients_equal_the_reference():
    """Through the custom softmax + logsumexp backward (one chunk, padded to its full length)."""
    attn = lsh(n_hashes=3, bucket_size=8, chunk_size=16)
    qk, v = qkv(11)
    qk.requires_grad_(), v.requires_grad_()
    weights = torch.randn(B, H, 11, Dh, dtype=torch.float64)
    grads = torch.autograd.grad((attn.lsh_attend(qk, v) * weights).sum(), [qk, v])
    expected = torch.autograd.grad((full_shared_qk(qk, v) * weights).sum(), [qk, v])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_multi_round_chunked_gradient():
    """gradcheck of the whole chunked multi-round computation (fixed evaluation hashes), with padding."""
    attn = lsh(n_hashes=2, bucket_size=4, chunk_size=4)
    qk, v = (t[:1].clone().requires_grad_() for t in qkv(10))
    assert torch.autograd.gradcheck(attn.lsh_attend, (qk, v))


@pytest.mark.parametrize("with_counts", [False, True])
def test_scores_softmax_equals_the_masked_softmax_written_plainly(with_counts):
    """LSHScoresSoftmax (scores, masks, softmax and logsumexp in place, own backward) against the same steps
    as plain autograd ops: values and gradients of q and keys, with self, counts and masked entries."""
    g = torch.Generator().manual_seed(0)
    n, C, D, scale = 3, 4, 5, 0.7
    q = torch.randn(n, C, D, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(C + n * C, D, generator=g, dtype=torch.float64, requires_grad=True)  # chunk g: rows gC..gC+2C
    is_self = torch.zeros(n, C, 2 * C, dtype=torch.bool)
    is_self[:, torch.arange(C), C + torch.arange(C)] = True
    masked = torch.rand(n, C, 2 * C, generator=g) < 0.4
    masked &= ~is_self  # as in the layer: a row always keeps its self entry
    counts = torch.randint(0, 4, (n, C, 2 * C), generator=g, dtype=torch.uint8) if with_counts else None

    def plain(q, keys):
        keys_t = torch.stack([keys[k * C : k * C + 2 * C] for k in range(n)]).transpose(1, 2)  # n x D x 2C
        scores = (q @ keys_t * scale).masked_fill(is_self, SELF_SCORE)
        if counts is not None:
            scores = scores - counts.double().clamp(min=1).log()
        scores = scores.masked_fill(masked, float("-inf"))
        return scores.softmax(-1), scores.logsumexp(-1, keepdim=True)

    def fused(q, keys):
        return LSHScoresSoftmax.apply(q, keys, scale, is_self, counts, masked)

    grad_w, grad_lse = torch.randn(n, C, 2 * C, generator=g), torch.randn(n, C, 1, generator=g)
    results = []
    for fn in (fused, plain):
        weights, lse = fn(q, keys)
        loss = (weights * grad_w).sum() + (lse * grad_lse).sum()
        results.append((weights, lse, *torch.autograd.grad(loss, [q, keys])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (q, keys))


def test_window_product_equals_the_product_with_the_windows_copied():
    """WindowProduct: chunk g's weights times rows [gC, gC + 2C), values and gradients, against stacking the
    overlapping windows as copies (plain autograd)."""
    g = torch.Generator().manual_seed(0)
    n, C, D = 4, 3, 5
    weights = torch.randn(n, C, 2 * C, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(C + n * C, D, generator=g, dtype=torch.float64, requires_grad=True)
    plain = weights @ torch.stack([values[k * C : k * C + 2 * C] for k in range(n)])  # n x C x D
    grad_out = torch.randn(n, C, D, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad((plain * grad_out).sum(), [weights, values])
    out = WindowProduct.apply(weights, values)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad((out * grad_out).sum(), [weights, values]), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(WindowProduct.apply, (weights, values))


def test_many_hashes_approach_full_attention():
    """Buckets of 16 in 64 positions, chunks of 32: every same-bucket key is in the window, so the output is
    exact attention over the union of the query's buckets, which grows to everything with more rounds."""
    torch.manual_seed(0)
    qk, v = qkv(64)
    reference = full_shared_qk(qk, v)
    errors = [(lsh(n, 16, 32).lsh_attend(qk, v) - reference).abs().mean().item() for n in (1, 4, 32)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05 * errors[0], errors


def enumerate_compared_pairs(buckets, chunk: int) -> list:
    """Kitaev et al. 2020, Sec. 2 and Appendix A, written out: for every hashing round, sort the positions by
    (bucket, position), cut into chunks, and let each query meet the keys of its chunk and the previous one
    that are in its bucket and not later than itself. ``buckets``: R lists of S bucket ids (one batch row
    and head). Returns, per round, the set of compared (i, j)."""
    rounds = []
    for round_buckets in buckets:
        S = len(round_buckets)
        order = sorted(range(S), key=lambda p: (round_buckets[p], p))
        chunks = [order[start : start + chunk] for start in range(0, S, chunk)]
        compared = set()
        for k, own in enumerate(chunks):
            window = (chunks[k - 1] if k > 0 else []) + own
            for i in own:
                for j in window:
                    if round_buckets[j] == round_buckets[i] and j <= i:
                        compared.add((i, j))
        rounds.append(compared)
    return rounds


@pytest.mark.parametrize("n_hashes", [1, 2, 3, 4])
def test_multi_round_output_is_softmax_over_the_union_of_compared_pairs(n_hashes):
    """Buckets spanning more than two chunks: a pair can share a bucket in a round without being compared
    there. Each compared (i, j) must count once (Appendix A's N_ij = rounds in which j is *compared* with
    i), so the output is one softmax over the union of the rounds' compared pairs: values and gradients
    against that softmax, with the pairs enumerated in plain Python."""
    S, C = 32, 4
    attn = lsh(n_hashes, bucket_size=C, chunk_size=C)
    g = torch.Generator().manual_seed(n_hashes)
    # three clusters of 6, 10 and 16 positions (random places), each hashed as one bucket in most rounds:
    # buckets of up to four chunks whose chunk boundaries move from round to round
    cluster = torch.tensor([0] * 6 + [1] * 10 + [2] * 16)[torch.randperm(S, generator=g)]
    centers = torch.randn(B, H, 3, Dh, generator=g, dtype=torch.float64) * 3
    qk = centers[:, :, cluster] + 0.3 * torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64)
    qk.requires_grad_(), v.requires_grad_()

    buckets = attn.hash(qk.detach(), even_buckets(S, C))  # B x H x R x S: the module's own (fixed) hash
    allowed = torch.zeros(B, H, S, S, dtype=torch.bool)
    undercounted = 0  # pairs that share a bucket in more rounds than they are compared in
    for b in range(B):
        for h in range(H):
            rounds = enumerate_compared_pairs(buckets[b, h].tolist(), C)
            for i, j in set().union(*rounds):
                allowed[b, h, i, j] = True
                shared = sum(int(buckets[b, h, r, i] == buckets[b, h, r, j]) for r in range(n_hashes))
                undercounted += sum((i, j) in pairs for pairs in rounds) < shared
    assert undercounted > 0 or n_hashes == 1  # the regime where "share a bucket" and "compared" differ is exercised

    def union_softmax():
        scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / Dh**0.5  # B x H x S x S
        scores = scores.masked_fill(torch.eye(S, dtype=torch.bool), SELF_SCORE)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    weights = torch.randn(B, H, S, Dh, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda: attn.lsh_attend(qk, v), union_softmax):
        out = fn()
        results.append((out, *torch.autograd.grad((out * weights).sum(), [qk, v])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_lsh_is_causal_in_the_chunked_regime():
    """No output depends (in gradient) on a later position, with many buckets and chunks."""
    attn = lsh(n_hashes=2, bucket_size=4, chunk_size=4)
    qk, v = qkv(24)
    qk.requires_grad_(), v.requires_grad_()
    out = attn.lsh_attend(qk, v)
    for s in (0, 5, 11, 23):
        g_qk, g_v = torch.autograd.grad(out[:, :, s].sum(), [qk, v], retain_graph=True)
        assert g_qk[:, :, s + 1 :].abs().sum() == 0 and g_v[:, :, s + 1 :].abs().sum() == 0, s


def test_self_attention_only_when_nothing_else_is_available():
    attn = lsh(n_hashes=2, bucket_size=4, chunk_size=4)
    qk = torch.randn(1, H, 16, Dh, dtype=torch.float64)
    v = torch.zeros(1, H, 16, 16, dtype=torch.float64)
    v[..., torch.arange(16), torch.arange(16)] = 1  # value j = one-hot(j): outputs are the attention weights
    weights = attn.lsh_attend(qk, v)  # 1 x H x 16 x 16
    torch.testing.assert_close(weights[..., 0, 0], torch.ones(1, H, dtype=torch.float64))  # position 0: alone
    self_weight = weights.diagonal(dim1=-2, dim2=-1)[..., 1:]
    other_weight = weights.sum(-1)[..., 1:] - self_weight
    # every later position either found an earlier key (self weight ~0) or was alone (self weight 1)
    assert torch.all((self_weight < 1e-10) & (other_weight > 1 - 1e-10) | (self_weight > 1 - 1e-10))
    assert (self_weight < 1e-10).any()
    assert torch.all(weights.triu(1) == 0)  # never a later position


def test_hashing_is_deterministic_in_eval_and_fresh_in_training():
    attn = lsh(n_hashes=2, bucket_size=4, chunk_size=4)
    qk = torch.randn(B, H, 16, Dh, dtype=torch.float64)
    assert torch.equal(attn.hash(qk, 4), attn.hash(qk, 4))
    attn.train()
    torch.manual_seed(1)
    first = attn.hash(qk, 4)
    torch.manual_seed(1)
    assert torch.equal(attn.hash(qk, 4), first)  # replayable from the RNG state
    assert not torch.equal(attn.hash(qk, 4), first)  # a new draw otherwise


def test_bucket_counts():
    assert [even_buckets(n, 8) for n in (8, 9, 16, 24, 40)] == [1, 2, 2, 4, 6]


def test_generation_equals_parallel_over_the_same_prefix():
    """Step by step (the layer keeps its inputs) == one pass over the prefix, also when chunked."""
    attn = lsh(n_hashes=2, bucket_size=4, chunk_size=4)
    x = torch.randn(B, 13, H * Dh, dtype=torch.float64)
    mem = None
    with torch.no_grad():
        for t in range(13):
            out, mem = attn(x[:, t : t + 1], mem, keep=None)
            reference, _ = attn(x[:, : t + 1], None, keep=0)
            torch.testing.assert_close(out, reference[:, -1:], rtol=0, atol=1e-10)


def test_shared_qk_has_no_key_projection():
    names = {n for n, _ in lsh().named_parameters()}
    assert names == {f"{m}.{p}" for m in ("q_proj", "v_proj", "out_proj") for p in ("weight", "bias")}


# ---- reversible layers --------------------------------------------------------------------------------
def layer_grads(model, fn, x, seed):
    """Loss over the decoder layers run by ``fn``; gradients of every layer parameter and of x."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    layers = [model.decoder.layers[i % len(model.decoder.layers)] for i in range(model.decoder.num_layers)]
    torch.manual_seed(seed)
    out, _ = fn(layers, x, [None] * len(layers), 0)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.decoder.layers.named_parameters()}


REVERSIBLE_CASES = {
    "lsh": ("lsh", 0.0, {}),
    "lsh+dropout": ("lsh", 0.2, {}),
    "full+dropout": ("full", 0.2, {}),
    "lsh+dropout+ffn-chunks": ("lsh", 0.2, dict(ffn_chunks=3)),
    "no-ffn+shared-layers": ("lsh", 0.2, dict(decoder_ffn_embed_dim=0, share_layers=True)),
}


@pytest.mark.parametrize("attention,dropout,extra", REVERSIBLE_CASES.values(), ids=REVERSIBLE_CASES.keys())
def test_reversible_gradients_equal_the_plain_computation(lm, attention, dropout, extra):
    lsh = dict(lsh_bucket_size=4, lsh_chunk_size=4, lsh_n_hashes=2) if attention == "lsh" else {}
    model = lm(attention=attention, reversible=True, decoder_normalize_before=True, decoder_layers=3,
               dropout=dropout, attention_dropout=dropout, activation_dropout=dropout, tokens_per_sample=16,
               **lsh, **extra).train()  # fmt: skip
    x = torch.randn(2, 16, 16)
    out_rev, dx_rev, grads_rev = layer_grads(model, reversible_layers, x, seed=7)
    out, dx, grads = layer_grads(model, coupled_layers, x, seed=7)
    torch.testing.assert_close(out_rev, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_rev, dx, rtol=0, atol=1e-5)
    assert grads_rev.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_rev[name], grads[name], rtol=0, atol=1e-5, msg=name)
    if dropout:  # the same seed really matters: another seed gives other gradients
        _, _, other = layer_grads(model, coupled_layers, x, seed=8)
        assert not all(torch.allclose(other[n], grads[n], atol=1e-5) for n in grads)


def test_reversible_model_trains_and_decodes(lm):
    """Through the decoder: a training step's gradients reach every parameter; generation (plain path,
    with state) equals the parallel forward."""
    model = lm(attention="lsh", reversible=True, decoder_normalize_before=True).train()
    tokens = torch.randint(4, 24, (2, 12))
    model(tokens)[0].logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(tokens)[0]
        state = {}
        steps = torch.cat([model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(12)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)


class LiveSavedBytes:
    """Bytes of tensors autograd holds for backward, tracked over forward *and* backward (the recomputed
    layer's activations count too); ``peak`` is the maximum held at any time."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        return _Held(self, t)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, counter, tensor):
        self.counter, self.tensor, self.nbytes = counter, tensor, tensor.numel() * tensor.element_size()
        counter.live += self.nbytes
        counter.peak = max(counter.peak, counter.live)

    def __del__(self):
        self.counter.live -= self.nbytes


def peak_saved_bytes(lm, layers: int, reversible: bool, ffn_chunks: int = 1, ffn_dim: int = 64) -> int:
    model = lm(attention="lsh", decoder_layers=layers, decoder_normalize_before=True, reversible=reversible,
               lsh_bucket_size=8, lsh_chunk_size=8, tokens_per_sample=32, ffn_chunks=ffn_chunks,
               decoder_ffn_embed_dim=ffn_dim).train()  # fmt: skip
    tokens = torch.randint(4, 24, (2, 32))
    counter = LiveSavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        features, _ = model(tokens, features_only=True)
        features.square().sum().backward()
    return counter.peak


def test_reversible_activation_memory_does_not_grow_with_depth(lm):
    plain = {n: peak_saved_bytes(lm, n, reversible=False) for n in (2, 8)}
    rev = {n: peak_saved_bytes(lm, n, reversible=True) for n in (2, 8)}
    assert rev[8] == rev[2], rev  # constant in depth
    assert plain[8] > 3 * plain[2] - plain[2] // 2, plain  # the plain stack stores every layer
    assert rev[8] < plain[8] / 3, (rev, plain)
    # chunked feed-forward: the recomputed FFN activation exists for one piece at a time (a wide FFN, so
    # that it dominates the peak)
    one, four = (peak_saved_bytes(lm, 2, reversible=True, ffn_chunks=k, ffn_dim=2048) for k in (1, 4))
    assert four < 0.6 * one, (four, one)


# ---- chunked feed-forward -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [2, 3, 7, 40])
def test_chunked_feedforward_equals_unchunked(chunks):
    torch.manual_seed(0)
    ffn = FeedForward(16, 32, "relu", 0.0)
    chunked = FeedForward(16, 32, "relu", 0.0, chunks=chunks)
    chunked.load_state_dict(ffn.state_dict())
    x = torch.randn(2, 13, 16)
    torch.testing.assert_close(chunked(x), ffn(x), rtol=0, atol=1e-6)


def test_ffn_chunks_model_equals_unchunked(lm):
    x = torch.randint(4, 24, (2, 12))
    torch.testing.assert_close(lm(ffn_chunks=5).eval()(x)[0], lm().eval()(x)[0], rtol=0, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(attention="lsh", lsh_bucket_size=8, lsh_chunk_size=12), "must divide --lsh-chunk-size"),
        (dict(attention="lsh", lsh_bucket_size=8, lsh_chunk_size=0, tokens_per_sample=36), "must divide --tokens"),
        (dict(attention="lsh", lsh_n_hashes=0), "must be positive"),
        (dict(attention="lsh", pos_emb="none", mem_len=8), "cannot attend over a memory"),
        (dict(reversible=True, decoder_normalize_before=True, pos_emb="none", mem_len=8), "drop --mem-len"),
        (dict(reversible=True), "add --decoder-normalize-before"),
        (dict(ffn_chunks=0), "--ffn-chunks must be >= 1"),
    ],
)
def test_bad_input_is_rejected(lm_config, overrides, message):
    with pytest.raises(UserError, match=message):
        validate_config(lm_config(**overrides))


def test_reversible_needs_an_attention_that_recomputes_deterministically(monkeypatch, lm_config):
    monkeypatch.setattr(LSHAttention, "deterministic_recompute", False)
    validate_config(lm_config(attention="lsh"))
    with pytest.raises(UserError, match="cannot recompute its output exactly"):
        validate_config(lm_config(attention="lsh", reversible=True, decoder_normalize_before=True))


@pytest.mark.parametrize("preset,length", [(reformer_tiny, 32), (reformer_enwik8, 65536)])
def test_presets_are_valid_configurations(lm_config, preset, length):
    args = argparse.Namespace()
    preset(args)
    assert args.attention == "lsh" and args.reversible
    validate_config(lm_config(**vars(args), tokens_per_sample=length))


# ---- end to end ---------------------------------------------------------------------------------------
@pytest.mark.cli
def test_reformer_tiny_train_then_eval_lm(data_bin, tmp_path):  # noqa: F811
    args = [a if a != "full_tiny" else "reformer_tiny" for a in TRAIN]
    train = fairseq("fairseq-train", data_bin, *args, "--max-update", "12", "--save-dir", tmp_path)
    assert "| train_inner |" in train.stdout
    valid_bpb = last_valid(train.stdout, "bpb")
    assert abs(eval_lm_loss(eval_lm_on_valid(data_bin, tmp_path / "checkpoint_best.pt")) - valid_bpb) < 6e-4
    bad = fairseq("fairseq-train", data_bin, *args, "--tokens-per-sample", "36", "--save-dir", tmp_path, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --lsh-chunk-size 16")

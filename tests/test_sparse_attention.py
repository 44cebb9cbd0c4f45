"""Sparse Transformer attention (``plugins/attention/sparse.py``, Child et al. 2019, Sec. 4).

The registry suite (test_attention.py) already checks shapes, causality at short lengths and decoding
with the default options. Here, with strides much shorter than the sequence:

- the pattern's definition equals the paper's sets, written out in plain Python;
- the block layout puts every allowed (query, key) pair in exactly one key group, and nothing else;
- the block-sparse output and its gradients equal a dense masked reference (both patterns, every head
  layout, several block sizes, lengths that are not multiples of the stride or the block);
- an output depends on exactly the inputs its pattern names (gradient support), so causality too;
- step-by-step decoding over the cached past equals the parallel pass, in the attention and the model;
- ``--sparse-checkpoint`` changes nothing but memory; interleaving gets each layer's depth;
- bad options stop with one line; fairseq-train / fairseq-eval-lm / fairseq-interactive run sparse_tiny.

Shapes: B = batch, T = length, D = model dim, H = heads, L = stride, c = summary, Bk = block.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from plugins.attention import build_attention
from plugins.attention.sparse import FACTOR1, FACTOR2, UNION, pattern_mask
from plugins.errors import UserError
from plugins.models.efficient_lm import validate_config

B, D, H = 2, 16, 4
EXACT64 = dict(rtol=0, atol=1e-10)
FP32 = dict(rtol=0, atol=1e-5)
# (heads mode, layer index): the three layouts of the two factors, interleave at an even and an odd depth
LAYOUTS = [("merged", 0), ("split", 0), ("interleave", 0), ("interleave", 1)]


def make(pattern, heads="merged", layer=0, stride=8, block=4, summary=3, dropout=0.0, checkpoint=False, heads_n=H,
         chunk=None, summary_blocks=1):  # fmt: skip
    torch.manual_seed(0)
    options = SimpleNamespace(
        sparse_pattern=pattern, sparse_stride=stride, sparse_block=block, sparse_summary=summary,
        sparse_heads=heads, sparse_checkpoint=checkpoint, sparse_summary_blocks=summary_blocks,
    )  # fmt: skip
    attn = build_attention("sparse", D, heads_n, dropout, options).to(torch.float64).eval()
    attn.set_layer_index(layer)
    if chunk is not None:
        attn.query_chunk = chunk  # queries per chunk (whole stride blocks): several chunks in a short test
    return attn


def paper_set(pattern: str, factor: int, i: int, L: int, c: int) -> set:
    """Child et al. 2019, Sec. 4.3, causal: the keys query i attends, from the definitions of the paper."""
    if pattern == "strided":
        a1 = set(range(max(0, i - L), i + 1))
        a2 = {j for j in range(i + 1) if (i - j) % L == 0}
    else:
        a1 = {j for j in range(i + 1) if j // L == i // L}
        a2 = {j for j in range(i + 1) if j % L >= L - c} | {i}  # + i: no query attends nothing
    return {FACTOR1: a1, FACTOR2: a2, UNION: a1 | a2}[factor]


def openai_summary_sets(heads: int, factors: list, L: int, c: int, v: int) -> list:
    """Per head, the offsets (j mod L) of its summary positions, as OpenAI's ``get_blocksparse_obj`` builds
    them for ``num_verts`` = v (at position granularity): the offsets of a stride block from last to first,
    cut into rows of c; the k-th head that attends the summaries takes row k mod v (Child et al. 2019, Sec.
    4.3: distinct sub-blocks of length c per head). Heads that attend A1 only get none."""
    offsets = list(range(L - 1, -1, -1))
    rows = [offsets[n : n + c] for n in range(0, L, c)]
    sets, k = [], 0
    for h in range(heads):
        if factors[h] == FACTOR1:
            sets.append(set())
        else:
            sets.append(set(rows[k % v]))
            k += 1
    return sets


def dense_reference(attn, x):
    """The same projections, one dense T x T score matrix masked by the pattern (test reference only)."""
    q = attn.split_heads(attn.q_proj(x))  # B x H x T x Dh
    k, v = attn.keys_values(x, None)
    pos = torch.arange(x.size(1))
    scores = (q @ k.transpose(-1, -2)) * attn.scale  # B x H x T x T
    weights = scores.masked_fill(~attn.mask(pos, pos), float("-inf")).softmax(dim=-1)
    return attn.out_proj(attn.merge_heads(weights @ v))


# ---- the pattern ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("factor", [UNION, FACTOR1, FACTOR2])
@pytest.mark.parametrize("L,c", [(4, 1), (5, 2), (6, 6)])
def test_pattern_mask_is_the_papers_definition(pattern, factor, L, c):
    N = 23
    pos = torch.arange(N)
    mask = pattern_mask(pattern, L, c, torch.tensor(factor), pos[:, None], pos[None, :])  # N x N
    for i in range(N):
        assert set(mask[i].nonzero().flatten().tolist()) == paper_set(pattern, factor, i, L, c), i


@pytest.mark.parametrize("heads,layer", LAYOUTS)
@pytest.mark.parametrize("L,c,v", [(8, 2, 2), (8, 2, 4), (9, 3, 3), (8, 3, 2)])
def test_summary_blocks_per_head_are_openais_sub_blocks(heads, layer, L, c, v):
    """--sparse-summary-blocks v: the (query, key) pairs each head attends == the fixed pattern's sets with
    that head's sub-block of summaries, enumerated independently (8 heads, so split has 4 summary heads)."""
    heads_n, N = 8, 4 * L + 3
    attn = make("fixed", heads, layer, stride=L, block=1, summary=c, heads_n=heads_n, summary_blocks=v)
    factors = attn.head_factors()
    summaries = openai_summary_sets(heads_n, factors, L, c, v)
    pos = torch.arange(N)
    mask = attn.mask(pos, pos).expand(heads_n, N, N)
    for h in range(heads_n):
        expected = set()
        for i in range(N):
            a1 = {j for j in range(i + 1) if j // L == i // L}
            a2 = {j for j in range(i + 1) if j % L in summaries[h]} | {i}
            expected |= {(i, j) for j in {FACTOR1: a1, FACTOR2: a2, UNION: a1 | a2}[factors[h]]}
        assert set(map(tuple, mask[h].nonzero().tolist())) == expected, h
    if heads == "merged":  # the heads really differ: v distinct summary sets
        assert len({frozenset(s) for s in summaries}) == v


@pytest.mark.parametrize("heads,layer", LAYOUTS)
@pytest.mark.parametrize("block", [1, 4, 8])
def test_summary_blocks_block_sparse_equals_the_dense_reference(heads, layer, block):
    """With distinct summary blocks per head: every allowed pair in exactly one key group, the block-sparse
    output and all gradients equal the dense masked reference, decoding over the cached past == parallel."""
    attn = make("fixed", heads, layer, stride=8, block=block, summary=3, summary_blocks=2, chunk=16)
    for r0, r1 in ((0, 5), (2, 4)):
        local_pos, local_mask, far_pos, far_mask = attn.block_layout(r0, r1)
        counts = torch.zeros(local_mask.size(0), (r1 - r0) * 8, 41, dtype=torch.long)
        for pos, mask in ((local_pos, local_mask), (far_pos, far_mask)):
            counts.scatter_add_(2, torch.where(pos >= 0, pos, 40).expand(mask.shape), mask.long())
        expected = attn.mask(torch.arange(r0 * 8, r1 * 8), torch.arange(40)).long()
        assert torch.equal(counts[..., :40], expected.expand_as(counts[..., :40])) and counts[..., 40].sum() == 0
    x = torch.randn(B, 21, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, 21, D, dtype=torch.float64)
    results = []
    for fn in (lambda: attn(x, None, keep=0)[0], lambda: dense_reference(attn, x)):
        out = fn()
        results.append((out, *torch.autograd.grad((out * target).sum(), [x, *attn.parameters()])))
    for sparse, dense in zip(*results):
        torch.testing.assert_close(sparse, dense, **EXACT64)
    with torch.no_grad():
        out, mem = attn(x[:, :5], None, keep=None)  # a prompt, then one token at a time
        steps = [out]
        for t in range(5, 21):
            out, mem = attn(x[:, t : t + 1], mem, keep=None)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), results[0][0].detach(), **EXACT64)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("heads,layer", LAYOUTS)
@pytest.mark.parametrize("stride,block", [(8, 2), (8, 8), (6, 3)])
def test_block_layout_holds_every_allowed_pair_exactly_once(pattern, heads, layer, stride, block):
    attn = make(pattern, heads, layer, stride=stride, block=block)
    N = 5 * stride
    for r0, r1 in ((0, 5), (2, 4)):  # the whole sequence, and a chunk of it
        local_pos, local_mask, far_pos, far_mask = attn.block_layout(r0, r1)
        counts = torch.zeros(local_mask.size(0), (r1 - r0) * stride, N + 1, dtype=torch.long)  # last: padding
        for pos, mask in ((local_pos, local_mask), (far_pos, far_mask)):
            index = torch.where(pos >= 0, pos, N).expand(mask.shape)
            counts.scatter_add_(2, index, mask.long())
        expected = attn.mask(torch.arange(r0 * stride, r1 * stride), torch.arange(N)).long()
        assert torch.equal(counts[..., :N], expected.expand_as(counts[..., :N]))
        assert counts[..., N].sum() == 0  # no padding key is ever attended
        # the work per query: the window plus the far keys before the chunk's end, not the whole sequence
        far_keys = r1 if pattern == "strided" else r1 * attn.summary
        assert local_mask.size(-1) + far_mask.size(-1) == attn.window_blocks * block + far_keys


def test_the_scores_per_query_grow_like_sqrt_n():
    """Strided with L = sqrt(N): W Bk + N / L scores per query (about 3 sqrt(N)), not N."""
    for N in (1024, 4096, 16384):
        L = int(N**0.5)
        attn = make("strided", stride=L, block=L // 2)
        _, local_mask, _, far_mask = attn.block_layout(0, N // L)
        per_query = local_mask.size(-1) + far_mask.size(-1)
        assert per_query == int(1.5 * L) + L <= 2.5 * N**0.5


# ---- block-sparse == dense reference ------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("heads,layer", LAYOUTS)
@pytest.mark.parametrize("block", [2, 4, 8])
def test_block_sparse_equals_the_dense_masked_reference(pattern, heads, layer, block):
    for chunk in (None, 16):  # one chunk, or chunks of two stride blocks
        attn = make(pattern, heads, layer, stride=8, block=block, chunk=chunk)
        for T in (1, 7, 8, 21, 40):  # shorter than, equal to, and not a multiple of the stride or block
            x = torch.randn(B, T, D, dtype=torch.float64)
            out, mem = attn(x, None, keep=0)
            assert mem is None
            torch.testing.assert_close(out, dense_reference(attn, x), **EXACT64)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("heads,layer", LAYOUTS)
def test_gradients_equal_the_dense_reference(pattern, heads, layer):
    attn = make(pattern, heads, layer, stride=4, block=2, summary=2, chunk=8)
    x = torch.randn(B, 19, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, 19, D, dtype=torch.float64)
    grads = []
    for fn in (lambda: attn(x, None, keep=0)[0], lambda: dense_reference(attn, x)):
        loss = (fn() * target).sum()
        grads.append(torch.autograd.grad(loss, [x, *attn.parameters()]))
    for sparse_grad, dense_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, **EXACT64)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("heads,layer", [("merged", 0), ("interleave", 1)])
def test_each_output_depends_on_exactly_its_pattern(pattern, heads, layer):
    """d out_i / d x_j != 0 exactly for the j of query i's key set (all heads together): causal, and no
    allowed key is dropped or extra key added by the block computation."""
    L, c, T = 4, 1, 22
    attn = make(pattern, heads, layer, stride=L, block=2, summary=c)
    factor = attn.head_factors()[0]
    x = torch.randn(1, T, D, dtype=torch.float64, requires_grad=True)
    out, _ = attn(x, None, keep=0)
    for i in (0, 3, 4, 9, 13, 21):
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        depends = set(grad[0].abs().sum(-1).nonzero().flatten().tolist())
        assert depends == paper_set(pattern, factor, i, L, c), i


# ---- decoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("heads,layer", LAYOUTS)
def test_step_by_step_over_the_cached_past_equals_parallel(pattern, heads, layer):
    attn = make(pattern, heads, layer, stride=4, block=2, summary=1)
    x = torch.randn(B, 17, D, dtype=torch.float64)
    parallel, _ = attn(x, None, keep=0)
    for grad in (False, True):  # cached keys/values (generation) and recomputed ones
        with torch.set_grad_enabled(grad):
            out, mem = attn(x[:, :6], None, keep=None)  # a prompt in one call, then one token at a time
            outs = [out]
            for t in range(6, 17):
                out, mem = attn(x[:, t : t + 1], mem, keep=None)
                outs.append(out)
        assert mem.length == 17 and (mem.keys is None) == grad
        torch.testing.assert_close(torch.cat(outs, dim=1), parallel, **EXACT64)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_model_generation_equals_the_full_forward(lm, dictionary, pattern):
    """Through the decoder: step-by-step log-probs and fairseq's beam search scores equal one forward."""
    model = lm(dictionary, attention="sparse", sparse_pattern=pattern, sparse_stride=4, sparse_block=2,
               sparse_summary=1, sparse_heads="split").eval()  # fmt: skip
    toks = torch.randint(4, len(dictionary), (2, 14))
    with torch.no_grad():
        full = model.get_normalized_probs(model(toks), log_probs=True)
        state = {}
        steps = [model.get_normalized_probs(model(toks[:, :t], incremental_state=state), log_probs=True)
                 for t in range(1, 15)]  # fmt: skip
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32)

        generator = SequenceGenerator([model], dictionary, beam_size=2, max_len_b=10, min_len=10)
        prompt = toks[:, :3]
        sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.tensor([3, 3])}}
        for beam in generator.generate([model], sample, prefix_tokens=prompt):
            for hypo in beam:
                out = hypo["tokens"]
                inp = torch.cat([torch.tensor([dictionary.eos()]), out[:-1]])[None]  # 1 x T
                expected = model.get_normalized_probs(model(inp), log_probs=True)[0].gather(-1, out[:, None])
                torch.testing.assert_close(hypo["positional_scores"], expected.squeeze(-1), **FP32)


# ---- recomputation, layers ----------------------------------------------------------------------------
def test_checkpoint_recomputes_the_same_output_and_gradients():
    """Dropout on: the recomputation replays the same random numbers (checkpoint keeps the RNG state)."""
    results = []
    for checkpoint in (False, True):
        attn = make("strided", stride=4, block=2, dropout=0.3, checkpoint=checkpoint, chunk=8).train()
        x = torch.randn(B, 13, D, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(5)
        out, _ = attn(x, None, keep=0)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, **EXACT64)


def test_checkpoint_saves_no_scores_for_the_backward_pass():
    """What autograd keeps after the forward pass (distinct storages, in elements): with --sparse-checkpoint
    only q, k, v themselves, without it the scores and weights of every chunk too."""
    saved = {}
    for checkpoint in (False, True):
        attn = make("strided", stride=16, block=8, checkpoint=checkpoint, chunk=64).train()
        q, k, v = (torch.randn(1, H, 512, D // H, dtype=torch.float64, requires_grad=True) for _ in range(3))
        storages = {}

        def keep(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            attn.attend_blocks(q, k, v)
        saved[checkpoint] = sum(storages.values())
    assert saved[True] == 3 * q.numel() < saved[False] / 5, saved


def test_interleaved_layers_alternate_the_factors(lm):
    model = lm(attention="sparse", sparse_heads="interleave", sparse_stride=4, sparse_summary=1, decoder_layers=3)
    factors = [layer.attn.head_factors() for layer in model.decoder.layers]
    assert factors == [[FACTOR1] * 2, [FACTOR2] * 2, [FACTOR1] * 2]


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sparse_stride=64), "longer than the sequence"),
        (dict(sparse_stride=0), "--sparse-stride must be positive"),
        (dict(sparse_stride=8, sparse_block=3), "--sparse-block 3 must divide --sparse-stride 8"),
        (dict(sparse_stride=8, sparse_summary=9), "--sparse-summary 9 must be between 1 and --sparse-stride 8"),
        (dict(sparse_stride=8, sparse_summary=0), "--sparse-summary 0 must be between"),
        (dict(sparse_pattern="strided", sparse_summary_blocks=2), "only in the fixed pattern"),
        (dict(sparse_summary_blocks=0), "--sparse-summary-blocks 0: distinct summary blocks"),
        (dict(sparse_stride=8, sparse_summary=3, sparse_summary_blocks=3), "= 9 summary positions do not fit"),
        (dict(sparse_stride=8, sparse_summary=1, sparse_summary_blocks=3, sparse_heads="split"), "more than the 1"),
        (dict(mem_len=8, pos_emb="none"), "cannot attend over a memory; drop --mem-len"),
        (dict(sparse_heads="split", decoder_attention_heads=1), "needs at least 2 heads"),
        (dict(sparse_heads="interleave", share_layers=True), "--share-layers"),
        (dict(pos_emb="rotary"), "--pos-emb rotary is computed inside attention"),
    ],
)
def test_bad_options_are_rejected(lm_config, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        validate_config(lm_config(attention="sparse", **overrides))


def test_head_factors_and_block_divisibility():
    assert make("fixed", "split", heads_n=2).head_factors() == [FACTOR1, FACTOR2]
    assert make("fixed", "split", heads_n=8).head_factors() == [FACTOR1] * 4 + [FACTOR2] * 4
    assert make("strided", "merged").head_factors() == [UNION] * H
    with pytest.raises(UserError, match="must divide --sparse-stride"):
        make("fixed", stride=8, block=3)


# ---- end to end ---------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAIN = [
    "--user-dir", ROOT / "plugins", "--task", "segment_lm", "--arch", "sparse_tiny", "--criterion",
    "aux_cross_entropy", "--tokens-per-sample", "32", "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003",
    "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "5", "--seed", "3",
    "--no-epoch-checkpoints",
]  # fmt: skip


def fairseq(tool, *args, stdin=None):
    return subprocess.run([str(Path(sys.executable).parent / tool), *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=CLI_ENV, cwd=ROOT, timeout=600)  # fmt: skip


@pytest.mark.cli
def test_sparse_tiny_trains_evaluates_and_generates(tmp_path):
    """fairseq-train with sparse_tiny (stride 8 < 32 tokens: really sparse), fairseq-eval-lm reports the
    validation loss, fairseq-interactive generates with beam search; a stride longer than the segment
    stops with one line."""
    raw, data, save = tmp_path / "raw", tmp_path / "data-bin", tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "recipes.corpus", "--out", raw, "--scale", "0.02"], check=True, cwd=ROOT)
    splits = [a for s in ("train", "valid", "test") for a in (f"--{s}", raw / f"{s}.txt")]
    subprocess.run([sys.executable, "-m", "preprocess.text", *splits, "--level", "byte", "--binarizer", "fast",
                    "--out", data], check=True, cwd=ROOT, capture_output=True)  # fmt: skip

    bad = fairseq("fairseq-train", data, *TRAIN, "--sparse-stride", "64", "--save-dir", save)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --sparse-stride 64 is longer than the sequence")

    train = fairseq("fairseq-train", data, *TRAIN, "--max-update", "20", "--save-dir", save)
    assert train.returncode == 0, train.stderr[-3000:]
    valid = re.findall(r"valid on 'valid' subset \|.* bpb ([\d.]+)", train.stdout)
    evaluated = fairseq(
        "fairseq-eval-lm", data, "--user-dir", ROOT / "plugins", "--task", "segment_lm", "--path",
        save / "checkpoint_best.pt", "--gen-subset", "valid", "--tokens-per-sample", "32", "--batch-size", "4", "--cpu",
    )  # fmt: skip
    loss = re.search(r"Loss \(base 2\): ([\d.]+)", evaluated.stdout + evaluated.stderr)
    assert valid and loss, (train.stdout[-2000:], evaluated.stderr[-2000:])
    assert abs(float(loss.group(1)) - float(valid[-1])) < 6e-4

    prompt = " ".join(str(b) for b in b"ticket 12")  # the symbols of the text typed in (byte data)
    proc = fairseq(
        "fairseq-interactive", data, "--user-dir", ROOT / "plugins", "--task", "segment_lm", "--path",
        save / "checkpoint_last.pt", "--max-len-b", "30", "--cpu", "--beam", "2", stdin="ticket 12\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    hypo = next(line.split("\t") for line in proc.stdout.splitlines() if line.startswith("H-0"))
    assert hypo[2].split()[: len(prompt.split())] == prompt.split() and len(hypo[2].split()) > len(prompt.split())

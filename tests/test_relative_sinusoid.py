"""Relative attention by the sinusoid identity (issue 18, item 1; ``plugins/attention/relative_sinusoid.py``).

The fused path (one SDPA call over [q + u, qt] . [k, kt]) must be the function of the explicit path (the
position term as a B x H x T x S tensor, ``RelativeAttention.fused_positions = False``), which
test_transformer_xl.py and test_compressive.py check against the paper's equation. Every test here builds
one attention twice (same parameters; u and v far from 0 so that a misplaced position term shows) and
compares outputs, next memories, auxiliary losses and the gradients of every parameter and input, in
float32 (1e-5) and float64 (1e-10): Transformer-XL with memory, ``--same-length``, ``--clamp-len`` (kept on
the explicit path: the comparison shows it), persistent slots (all-attention), an odd model dim, masks in
query chunks, and the Compressive Transformer with each compression loss and ``most_used``. Then
step-by-step generation = the parallel pass, the route builds no floating B x H x T x S tensor (checked on
every aten op of forward + backward), and one layer step at N = 4096 stays under a stated peak (the
suite's memory tool, in a worker process).

Shapes: B = batch, T = segment (queries), M = memory, S = keys, D = model dim, H = heads.
"""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugins.attention import build_attention
from plugins.attention.relative import RelativeAttention
from plugins.attention.relative_sinusoid import rotated_keys, rotated_queries
from plugins.errors import UserError
from plugins.models.efficient_lm import validate_config
from tests.test_long_context import measured_peak, run  # segments with memory; a worker's peak memory

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [torch.float32, torch.float64]


def pair(name: str, dtype, D: int = 16, H: int = 2, budget: int = 2**21, **options):
    """(explicit path, fused path): the same attention twice (``--relative-route explicit`` and ``fused``),
    training mode, dropout 0."""
    ns = SimpleNamespace(pos_emb="relative", score_chunk_elements=budget, relative_route="explicit", **options)
    torch.manual_seed(0)
    explicit = build_attention(name, D, H, 0.0, ns).to(dtype).train()
    with torch.no_grad():
        explicit.u.normal_()
        explicit.v.normal_()
    fused = copy.deepcopy(explicit)
    fused.cfg.relative_route = "fused"
    return explicit, fused


def assert_same(a, b, dtype):
    tol = TOLERANCE[dtype]
    for x, y in zip(a[0], b[0]):  # outputs
        torch.testing.assert_close(y, x, **tol)
    for m, n in zip(a[1], b[1]):  # every tensor of the next memories (hidden, compressed, usage, ...)
        assert (m is None) == (n is None)
        for key, value in ({} if m is None else vars(m)).items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(getattr(n, key).detach(), value.detach(), **tol)
    assert len(a[2]) == len(b[2])
    for x, y in zip(a[2], b[2]):  # auxiliary losses
        torch.testing.assert_close(y, x, **tol)
    assert len(a[3]) == len(b[3])
    for x, y in zip(a[3], b[3]):  # gradients
        torch.testing.assert_close(y, x, **tol)


def segments(lengths, dtype, D=16, batch=2):
    torch.manual_seed(1)
    return [torch.randn(batch, T, D, dtype=dtype, requires_grad=True) for T in lengths]


def test_the_identity_is_the_position_term():
    """p . r_(i-j) = qt_i . kt_j for every i, j (r: the model's sinusoid table), float64."""
    attn = build_attention("relative", 16, 2, 0.0, SimpleNamespace(pos_emb="relative"))
    p = torch.randn(1, 1, 5, 16, dtype=torch.float64)  # queries at positions 7 .. 11
    r = attn.sinusoid(torch.arange(-20, 20), torch.float64)  # 40 x D: r_d for d = -20 .. 19
    i, j = torch.arange(7, 12)[:, None], torch.arange(12)[None, :]
    direct = torch.einsum("td,tsd->ts", p[0, 0], r[i - j + 20])  # T x S
    fused = rotated_queries(p, 7, torch.float64)[0, 0] @ rotated_keys(12, 8, "cpu", torch.float64).T
    torch.testing.assert_close(fused, direct, rtol=0, atol=1e-12)


RELATIVE_CASES = {  # name: (options, segment lengths, keep, model dim, heads, score budget)
    "no-memory": (dict(), [9], 0, 16, 2, 2**21),
    "memory": (dict(), [7, 9, 5], 6, 16, 2, 2**21),
    "memory-longer-than-segment": (dict(), [3, 4, 5], 10, 16, 2, 2**21),
    "memory-mask-chunks": (dict(), [7, 9, 5], 6, 16, 2, 2 * 15),  # masks of 2 queries at a time
    "same-length": (dict(same_length=True), [7, 9, 8], 4, 16, 2, 2**21),
    "same-length-mask-chunks": (dict(same_length=True), [7, 9, 8], 4, 16, 2, 3 * 7),
    "clamp-len": (dict(clamp_len=3), [7, 9], 6, 16, 2, 2**21),  # the explicit path in both
    "persistent": (dict(persistent_mem_size=3), [7, 9], 5, 16, 2, 2**21),
    "persistent-no-memory": (dict(persistent_mem_size=3), [9], 0, 16, 2, 2**21),
    "persistent-same-length": (dict(persistent_mem_size=3, same_length=True), [7, 9], 3, 16, 2, 5 * 3),
    "untie-r-odd-dim": (dict(untie_r=True), [6, 5], 4, 15, 3, 2**21),  # odd D: the table's zero column
    "one-query": (dict(), [4, 1, 1], 8, 16, 2, 2**21),  # T = 1: no mask at all
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(RELATIVE_CASES))
def test_fused_relative_attention_is_the_explicit_path(case, dtype):
    options, lengths, keep, D, H, budget = RELATIVE_CASES[case]
    explicit, fused = pair("relative", dtype, D=D, H=H, budget=budget, **options)
    xs = segments(lengths, dtype, D=D)
    assert_same(run(explicit, xs, keep), run(fused, xs, keep), dtype)


@pytest.mark.parametrize("case", ["memory", "same-length", "persistent"])
def test_fused_relative_attention_without_gradient_is_the_explicit_path(case):
    """Evaluation (no autograd; the memory's cached K/V are reused)."""
    options, lengths, keep, D, H, budget = RELATIVE_CASES[case]
    explicit, fused = pair("relative", torch.float64, budget=budget, **options)
    xs = segments(lengths, torch.float64)
    outs = {}
    with torch.no_grad():
        for name, attn in (("explicit", explicit.eval()), ("fused", fused.eval())):
            mem, outs[name] = None, []
            for x in xs:
                out, mem = attn(x, mem, keep)
                outs[name].append(out)
    for a, b in zip(outs["explicit"], outs["fused"]):
        torch.testing.assert_close(b, a, **TOLERANCE[torch.float64])


COMPRESSIVE_CASES = {  # mem_len 6, compression rate 2: the 3rd segment onward compresses
    "conv-attention-reconstruction": dict(compression_fn="conv", compression_loss="attention_reconstruction"),
    "most-used": dict(compression_fn="most_used", compression_loss="attention_reconstruction"),  # explicit
    "mean-pool-autoencoding": dict(compression_fn="mean_pool", compression_loss="autoencoding"),
    "conv-bptt": dict(compression_fn="conv", compression_loss="bptt"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(COMPRESSIVE_CASES))
def test_fused_compressive_attention_is_the_explicit_path(case, dtype):
    """[compressed memory; memory; segment]: outputs, the compressed memory, most_used's usage, the compression
    losses and every gradient (f_c's included) as on the explicit path."""
    explicit, fused = pair("compressive", dtype, cmem_len=4, compression_rate=2, **COMPRESSIVE_CASES[case])
    xs = segments([7, 7, 7, 7], dtype)
    a, b = run(explicit, xs, 6), run(fused, xs, 6)
    assert a[1][-1].compressed_length == 4  # compressed slots are attended in the last segments
    assert bool(a[2]) == (COMPRESSIVE_CASES[case]["compression_loss"] != "bptt")
    assert_same(a, b, dtype)


# ---- generation -------------------------------------------------------------------------------------------
def step_by_step(model, toks):
    state = {}
    return torch.cat([model(toks[:, :t], incremental_state=state)[0] for t in range(1, toks.size(1) + 1)], 1)


GENERATION_CASES = {
    "relative": dict(attention="relative", pos_emb="relative", mem_len=32, relative_route="fused"),
    "all-attention": dict(
        attention="relative", pos_emb="relative", mem_len=32, persistent_mem_size=4, relative_route="fused"
    ),
    "compressive": dict(
        attention="compressive", pos_emb="relative", mem_len=32, cmem_len=4, compression_rate=2, relative_route="fused"
    ),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_step_by_step_generation_equals_the_fused_parallel_pass(lm, case):
    """Token by token (one query over the memory) == the fused parallel pass over 13 tokens (causal mode)."""
    model = lm(**GENERATION_CASES[case]).double().eval()
    assert all(isinstance(layer.attn, RelativeAttention) for layer in model.decoder.layers)
    assert all(layer.attn.cfg.relative_route == "fused" for layer in model.decoder.layers)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.v.normal_()  # a misplaced position term shows
    toks = torch.randint(4, 24, (2, 13))
    with torch.no_grad():
        full, _ = model(toks)
        model.reset_memory()
        torch.testing.assert_close(step_by_step(model, toks), full, **TOLERANCE[torch.float64])


# ---- no T x S tensor --------------------------------------------------------------------------------------
class ScoreTensors(TorchDispatchMode):
    """Records every floating tensor an aten op returns that holds scores of all heads: a dimension of at
    least ``T``, another of at least ``S`` and H x T x S elements or more. (SDPA turns a boolean T x S mask
    into a float one of the same size, for all heads at once: one per query chunk, bounded by
    ``--score-chunk-elements``; it is not counted.)"""

    def __init__(self, H: int, T: int, S: int):
        super().__init__()
        self.H, self.T, self.S, self.found = H, T, S, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2:
                dims = sorted(t.shape, reverse=True)
                if dims[0] >= self.S and dims[1] >= self.T and t.numel() >= self.H * self.T * self.S:
                    self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("route", ["fused", "explicit", "explicit, weights"])
@pytest.mark.parametrize("memory", [0, 256], ids=["no-memory", "memory"])
def test_the_fused_route_builds_no_score_tensor(route, memory):
    """Forward + backward of one layer (T = 256 queries, S = T + M keys, D 32, 4 heads, default chunk budget) builds
    no H x T x S score tensor on the fused path, nor on the explicit path (distance_bias.py: chunks of at most
    128 queries); asking for the attention weights (one B x H x T x S pass) does, which shows the check can fail."""
    T, D = 256, 32
    attn = build_attention("relative", D, 4, 0.0, SimpleNamespace(pos_emb="relative")).train()
    attn.cfg.relative_route = route.split(",")[0]
    x = torch.randn(1, T, D, requires_grad=True)
    mem = None
    if memory:
        with torch.no_grad():
            _, mem = attn(torch.randn(1, memory, D), None, memory)
    if route == "explicit, weights":
        q = attn.split_heads(attn.q_proj(x))  # B x H x T x Dh
        k, v = attn.keys_values(x, mem, None)  # B x H x S x Dh
        with ScoreTensors(4, T, T + memory) as seen:
            attn.relative_attention(q, k, v, need_weights=True)[0].square().sum().backward()
        assert seen.found
        return
    with ScoreTensors(4, T, T + memory) as seen:
        attn(x, mem, memory)[0].square().sum().backward()
    assert seen.found == []


# ---- memory -----------------------------------------------------------------------------------------------
MEMORY_BOUND_MB = 240  # measured here without warm-up: T = 4096: 201 MB; T = M = 2048: 193 MB
MEASURE = """
import json, torch
from recipes.benchmarks.memory import peak_memory
from recipes.benchmarks.suite.layer import build_attention_module
from plugins.memory import HiddenMemory
torch.set_num_threads(1)
torch.manual_seed(0)
N, M = 4096, {memory}
attn = build_attention_module(dict(attention="relative", N=N, D=256, H=4, device="cpu", options=dict(pos_emb="relative", relative_route="fused")))
mem = HiddenMemory(torch.randn(1, M, 256)) if M else None
x = torch.randn(1, N - M, 256, requires_grad=True)
step = lambda: attn(x, mem, M)[0].square().mean().backward()
peak, exact = peak_memory(step)
print(json.dumps(dict(peak_mb=peak / 2**20, exact=exact)))
"""


@pytest.mark.parametrize("memory", [2048])
def test_one_fused_layer_step_at_4096_keys_stays_under_the_bound(memory):
    """One relative attention layer over 4096 keys, T = M = 2048 (B 1, D 256, H 4, forward + backward, 1 thread,
    --relative-route fused: masks in query chunks) allocates less than MEMORY_BOUND_MB at its
    peak (``recipes.benchmarks.memory.peak_memory`` in a worker process with the suite's allocator settings);
    The explicit one-pass path needs ~1.3 GB."""
    result = measured_peak(MEASURE.format(memory=memory))
    assert result["peak_mb"] < MEMORY_BOUND_MB, result


def test_the_fused_route_is_refused_with_clamp_len(lm_config):
    """A clamped distance is not a rotation: asking for the fused route with --clamp-len is an error."""
    for attention in ("relative", "compressive"):
        cfg = lm_config(attention=attention, pos_emb="relative", relative_route="fused", clamp_len=4)
        with pytest.raises(UserError, match="--relative-route fused is not the same function with --clamp-len"):
            validate_config(cfg)
        validate_config(lm_config(attention=attention, pos_emb="relative", relative_route="fused"))

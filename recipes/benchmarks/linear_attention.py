"""Causal linear attention (``--attention linear``) against full softmax attention and a public implementation.

What is measured
    1. Training cost of one causal attention layer (d_model 256, 4 heads, batch 1, q/k/v/out projections
       included) at N = 512 ... 16384: forward + backward time (median of ``--repeats`` after a warm-up)
       and two memory figures:
       - ``peak MB``: what the first forward + backward at N adds at its peak above the memory held before it
         (``recipes/benchmarks/memory.py``: the resident-set high-water mark, reset just before the step, in a
         fresh process per case run with ``memory.MALLOC_ENV`` so that freed tensors leave the resident set;
         a warm-up step at N = 2 x chunk first). It includes activations, temporaries and gradients, as the
         OS sees them (torch's CPU allocator has no peak counter);
       - ``saved MB``: bytes autograd keeps for backward (``memory.saved_tensor_bytes``), exact and independent
         of the allocator: the activation memory a deep model pays per layer.
       Implementations:
       - ``linear``: ours (chunked causal product with the recomputing backward, ``CausalDotProduct``);
       - ``linear-autograd``: the same chunked forward differentiated by autograd (what the custom backward
         saves: autograd also stores the C x C products and the chunk states);
       - ``full``: ``--attention full`` (``scaled_dot_product_attention`` with ``is_causal``: torch's CPU
         flash kernel, O(N) memory, O(N^2) time);
       - ``lucidrains``: ``causal_linear_attn`` of ``linear-attention-transformer`` (pip, lucidrains) with
         the same projections, if importable. Note: it is bucketed (a query sees the state of earlier
         buckets only, not its own bucket) and uses softmax/exp feature maps, so it computes less than
         exact causal linear attention; it is the fastest public pure-PyTorch one that installs here.
         ``pytorch-fast-transformers`` (CausalLinearAttention) does not build without CUDA (its setup.py
         needs CUDA_HOME), so it is not in the table.
    2. Generation (RNN mode): time per generated token of the same layer, without gradients, after a
       prefix of P positions (P = 64 and P = ``--decode-position``), median over ``--decode-steps`` steps:
       ``linear`` carries only (S, Z); ``full`` attends over the cached keys/values of all P positions.
    3. Tokens/s of a whole model (the ``*_ptb`` preset size: 4 layers x 256, 4 heads, FFN 1024, byte
       vocabulary) generating ``--generate`` tokens greedily through the decoder's ``incremental_state``
       (fairseq's generator path), ``linear`` vs ``full``.

Goals of the issue: time(16384) / time(1024) <= 20 for linear; faster than full from N = 4096 on; not slower
than a public implementation at any N; generation time per token at 16k / at 64 <= 1.2.

Command (from the repository root)::

    OMP_NUM_THREADS=1 python -m recipes.benchmarks.linear_attention            # N up to 16384
    OMP_NUM_THREADS=1 python -m recipes.benchmarks.linear_attention --quick    # N up to 4096, ~3 min

Output: markdown tables on stdout and in ``<out>/<stamp>.md``, one JSON line in ``<out>/results.jsonl``.
Compare ratios within one run (the machine is shared).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from recipes.benchmarks.memory import peak_memory, saved_tensor_bytes, worker_env
from recipes.benchmarks.train_throughput import REPO, add_sized_args, resolve_sizes, save_record, start_run, versions

DEFAULT_OUT = "runs/benchmarks/linear_attention"
SIZES = {  # flag: (default, --quick)
    "lengths": ("512,1024,2048,4096,8192,16384", "512,1024,2048,4096"),
    "repeats": (3, 2),
    "decode_position": (16384, 4096),
    "decode_steps": (64, 32),
    "generate": (1000, 200),
}
IMPLS = ("linear", "linear-autograd", "full", "lucidrains")
D_MODEL, HEADS, CHUNK = 256, 4, 64


# ---- one case, in its own process ---------------------------------------------------------------------------
def peer_available() -> Optional[str]:
    try:
        from linear_attention_transformer.linear_attention_transformer import causal_linear_attn  # noqa: F401
    except Exception as e:  # any import failure means: skip the peer
        return f"{type(e).__name__}: {e}"
    return None


def build_layer(impl: str) -> Callable:
    """x (1 x N x D) -> out (1 x N x D) for ``impl``, all with the same q/kv/out projections."""
    from plugins.attention import build_attention
    from plugins.attention.linear import EPS, causal_dot_product_reference

    name = "full" if impl == "full" else "linear"
    attn = build_attention(name, D_MODEL, HEADS, 0.0, SimpleNamespace(linear_chunk_size=CHUNK))
    if impl in ("linear", "full"):
        return lambda x: attn(x, None, keep=0)[0]

    def projected(x):
        q = attn.split_heads(attn.q_proj(x))  # B x H x N x Dh
        k, v = (attn.split_heads(t) for t in attn.kv_proj(x).chunk(2, dim=-1))
        return q, k, v

    if impl == "linear-autograd":

        def forward(x):
            q, k, v = projected(x)
            fq, fk = attn.feature_map(q, True), attn.feature_map(k, False)
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # B x H x N x (Dh + 1)
            num_den = causal_dot_product_reference(fq, fk, v1, CHUNK)
            return attn.out_proj(attn.merge_heads(num_den[..., :-1] / (num_den[..., -1:] + EPS)))

        return forward
    from linear_attention_transformer.linear_attention_transformer import causal_linear_attn

    return lambda x: attn.out_proj(attn.merge_heads(causal_linear_attn(*projected(x), bucket_size=CHUNK)))


def train_case(impl: str, n: int, repeats: int) -> Dict:
    torch.manual_seed(0)
    layer = build_layer(impl)
    x = torch.randn(1, n, D_MODEL, requires_grad=True)

    def step():
        layer(x).sum().backward()

    layer(torch.randn(1, 2 * CHUNK, D_MODEL, requires_grad=True)).sum().backward()  # libraries' first-use memory
    peak, _ = peak_memory(step)  # the first step at size N measures memory (and warms up)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times),
        "peak_mb": peak / 2**20,
        "saved_mb": saved_tensor_bytes(layer, x) / 2**20,
    }


def decode_case(impl: str, position: int, steps: int) -> Dict:
    from plugins.attention import build_attention

    torch.manual_seed(0)
    attn = build_attention(impl, D_MODEL, HEADS, 0.0, SimpleNamespace(linear_chunk_size=CHUNK)).eval()
    times = []
    with torch.no_grad():
        _, mem = attn(torch.randn(1, position, D_MODEL), None, keep=None)  # the prefix, in parallel
        for _ in range(steps + 2):
            x = torch.randn(1, 1, D_MODEL)
            start = time.perf_counter()
            _, mem = attn(x, mem, keep=None)
            times.append(time.perf_counter() - start)
    return {"ms_per_token": 1000 * statistics.median(times[2:])}


def generate_case(impl: str, tokens: int) -> Dict:
    """Greedy generation with the ``*_ptb`` size through the decoder's incremental_state."""
    from fairseq.data import Dictionary

    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig

    vocab = Dictionary()
    for byte in range(256):
        vocab.add_symbol(str(byte))
    cfg = EfficientLMConfig()
    sizes = dict(
        attention=impl,
        pos_emb="sinusoidal",
        decoder_layers=4,
        decoder_embed_dim=D_MODEL,
        dropout=0.0,
        decoder_ffn_embed_dim=1024,
        decoder_attention_heads=HEADS,
        decoder_normalize_before=True,
        share_decoder_input_output_embed=True,
        tokens_per_sample=tokens + 1,
        max_target_positions=tokens + 1,
    )
    for name, value in sizes.items():  # full_ptb / linear_ptb sizes (dropout off: inference)
        setattr(cfg, name, value)
    torch.manual_seed(0)
    model = EfficientLM.build_model(cfg, SimpleNamespace(source_dictionary=vocab, target_dictionary=vocab)).eval()
    seq = torch.full((1, 1), 4, dtype=torch.long)
    state: dict = {}
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(tokens):
            logits, _ = model.decoder(seq, incremental_state=state)
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
        seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds}


def run_case(kind: str, impl: str, size: int, a, env) -> Dict:
    cmd = [sys.executable, "-m", "recipes.benchmarks.linear_attention", "--case", kind, impl, str(size),
           "--repeats", str(a.repeats), "--decode-steps", str(a.decode_steps)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the tables --------------------------------------------------------------------------------------------
def train_table(results: Dict, lengths: List[int], impls: List[str]) -> str:
    head = "| N | " + " | ".join(f"{i} s | {i} peak MB | {i} saved MB" for i in impls) + " | full / linear time |"
    lines = [head, "|---:|" + "---:|" * (3 * len(impls) + 1)]
    for n in lengths:
        cells = []
        for i in impls:
            r = results[i][n]
            cells += (
                ["error"] * 3
                if "error" in r
                else [f"{r['seconds']:.3f}", f"{r['peak_mb']:.0f}", f"{r['saved_mb']:.1f}"]
            )
        lin, full = results["linear"][n], results["full"][n]
        ratio = f"{full['seconds'] / lin['seconds']:.2f}x" if "error" not in lin and "error" not in full else "?"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def goals(results: Dict, lengths: List[int], impls: List[str], decode: Dict, a) -> List[str]:
    lin = results["linear"]
    out = []
    if not lin:  # train part not run
        lengths = []
    if 1024 in lengths and max(lengths) > 1024:
        top = max(lengths)
        growth = lin[top]["seconds"] / lin[1024]["seconds"]
        out.append(f"linear time({top}) / time(1024) = {growth:.1f} (N ratio {top // 1024}; goal <= 20 at 16384)")
        mem = lin[top]["saved_mb"] / lin[1024]["saved_mb"]
        out.append(
            f"linear saved memory({top}) / (1024) = {mem:.1f}; peak MB {lin[1024]['peak_mb']:.0f} -> {lin[top]['peak_mb']:.0f}"
        )
    faster = [n for n in lengths if results["full"][n].get("seconds", 0) > lin[n]["seconds"]]
    if lengths:
        out.append(f"linear faster than full at N = {faster or 'none'}")
    if "lucidrains" in impls and lengths:
        slower = [
            n
            for n in lengths
            if "error" not in results["lucidrains"][n] and lin[n]["seconds"] > results["lucidrains"][n]["seconds"]
        ]
        out.append(f"linear slower than lucidrains at N = {slower or 'none'}")
    for impl, r in decode.items():
        if r:
            out.append(f"{impl} decode ms/token at {a.decode_position} / at 64 = {r[a.decode_position] / r[64]:.2f}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="N up to 4096, fewer repeats (~3 minutes)")
    p.add_argument("--parts", default="train,decode,generate", help="which of the three measurements to run")
    p.add_argument("--case", nargs=3, metavar=("KIND", "IMPL", "SIZE"), help=argparse.SUPPRESS)  # one subprocess
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    a.lengths = [int(n) for n in str(a.lengths).split(",")]
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.case:
        kind, impl, size = a.case
        torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
        fn = {"train": lambda: train_case(impl, int(size), a.repeats), "decode": lambda: decode_case(impl, int(size), a.decode_steps),
              "generate": lambda: generate_case(impl, int(size))}[kind]  # fmt: skip
        print(json.dumps(fn()))
        return
    out, stamp, logs, env = start_run(a.out, a.threads)
    impls = list(IMPLS)
    missing = peer_available()
    if missing:
        print(f"skipping lucidrains (linear-attention-transformer not importable: {missing})")
        impls.remove("lucidrains")
    parts = a.parts.split(",")
    results = {i: {} for i in impls}
    for n in a.lengths if "train" in parts else []:  # interleaved: every implementation at one N, then the next N
        for i in impls:
            results[i][n] = run_case("train", i, n, a, worker_env(env))
            print(f"train N={n} {i}: {results[i][n]}", flush=True)
    decode = {i: {} for i in ("linear", "full")}
    for pos in (64, a.decode_position) if "decode" in parts else []:
        for i in decode:
            decode[i][pos] = run_case("decode", i, pos, a, env)["ms_per_token"]
            print(f"decode position {pos} {i}: {decode[i][pos]:.3f} ms/token", flush=True)
    generated = (
        {i: run_case("generate", i, a.generate, a, env)["tokens_per_s"] for i in ("linear", "full")}
        if "generate" in parts
        else {}
    )
    report = [
        f"threads {a.threads}, d_model {D_MODEL}, heads {HEADS}, batch 1, chunk {CHUNK}, torch {torch.__version__}"
    ]
    if "train" in parts:
        report += ["", "### One causal attention layer, forward + backward", "", train_table(results, a.lengths, impls)]
    if "decode" in parts:
        report += [
            "",
            "### Generation (one layer, no gradients): ms per token",
            "",
            "| position | linear | full | full / linear |",
            "|---:|---:|---:|---:|",
        ]
        report += [
            f"| {p} | {decode['linear'][p]:.3f} | {decode['full'][p]:.3f} | "
            f"{decode['full'][p] / decode['linear'][p]:.1f}x |"
            for p in (64, a.decode_position)
        ]
    if "generate" in parts:
        report += ["", f"### Whole model (ptb size), {a.generate} generated tokens", ""]
        report += [f"- {i}: {generated[i]:.0f} tokens/s" for i in generated]
    report += ["", "### Goals", "", *(f"- {g}" for g in goals(results, a.lengths, impls, decode, a))]
    text = "\n".join(report)
    print("\n" + text)
    (out / f"{stamp}.md").write_text(text + "\n")
    settings = {k: getattr(a, k) for k in (*SIZES, "threads", "quick")}
    save_record(out, stamp, logs, {"stamp": stamp, "settings": settings, "train": results, "decode": decode,
                                   "generate": generated, "versions": versions(REPO / "plugins")})  # fmt: skip


if __name__ == "__main__":
    main()

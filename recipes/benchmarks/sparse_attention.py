"""One attention layer, forward + backward: Sparse Transformer attention against full attention (SDPA).

What is measured
    For N = 1024 ... 16384 (``--lengths``), batch 1, d_model 256, 4 heads (``--dim``, ``--heads``): the
    wall time and the peak memory of one forward + backward (``out.sum().backward()``) of one attention
    layer (projections included) of

    - ``full``: ``--attention full`` = ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
      (on CPU a flash-style kernel: memory linear in N, time quadratic);
    - ``strided`` / ``fixed``: ``--attention sparse`` with stride L = sqrt(N) rounded to a power of two, blocks
      of min(L, 64), c = 8 summary positions (fixed), merged heads; each with and without
      ``--sparse-checkpoint`` (``+ckpt``: scores recomputed chunk by chunk in the backward pass).

    ``keys/query`` is the average number of keys a query attends (full: (N + 1) / 2). A block-sparse
    peer implementation was not found that installs on a CPU-only torch without replacing it (openai's
    blocksparse needs TensorFlow + CUDA; DeepSpeed's and xformers' sparse kernels need Triton/CUDA), so
    there is none in the table.

How
    Every (N, case) runs in a fresh Python process (``--worker``), one thread (``--threads``). Memory
    (``recipes/benchmarks/memory.py``): after a warm-up step at N = 2 L (first-call allocations), one step
    at N runs and its peak is the resident-set high-water mark, reset just before the step, above the
    resident set before it (the input, the layer's weights and their gradients excluded); the worker runs
    with ``memory.MALLOC_ENV`` so that glibc returns every freed tensor to the OS at once and the resident
    set follows the live tensors instead of the heap's high-water mark. Time: the median of ``--repeats``
    steps at N (the first one included). Speed is noisy on a shared machine: read the ratios of one run.

Command (from the repository root)::

    python -m recipes.benchmarks.sparse_attention             # N = 1024 ... 16384
    python -m recipes.benchmarks.sparse_attention --quick     # N = 1024 ... 4096, one repeat

Output: a markdown table on stdout and in ``<out>/<stamp>.md``, one JSON line appended to
``<out>/results.jsonl`` (settings, every measurement, versions).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .memory import peak_memory, worker_env
from .train_throughput import REPO, add_sized_args, resolve_sizes, save_record, start_run, versions

DEFAULT_OUT = "runs/benchmarks/sparse_attention"
SIZES = {"lengths": ("1024,2048,4096,8192,16384", "1024,2048,4096"), "repeats": (3, 1)}
CASES = ["full", "strided", "strided+ckpt", "fixed", "fixed+ckpt"]
SUMMARY = 8


def sparse_options(case: str, N: int) -> Dict:
    L = 2 ** round(0.5 * (N.bit_length() - 1))  # sqrt(N) rounded to a power of two
    pattern = case.split("+")[0]
    return dict(sparse_pattern=pattern, sparse_stride=L, sparse_block=min(L, 64), sparse_summary=SUMMARY,
                sparse_heads="merged", sparse_checkpoint=case.endswith("+ckpt"))  # fmt: skip


def keys_per_query(case: str, N: int) -> float:
    """Average number of keys a query attends (the pattern's density times N). Call in a worker (it needs
    the plugins imported the way fairseq imports them)."""
    if case == "full":
        return (N + 1) / 2
    import torch

    from plugins.attention.sparse import UNION, pattern_mask

    o = sparse_options(case, N)
    pos = torch.arange(N)
    total = sum(
        int(pattern_mask(o["sparse_pattern"], o["sparse_stride"], SUMMARY, torch.tensor(UNION),
                         pos[i : i + 1024, None], pos[None, :]).sum())
        for i in range(0, N, 1024)
    )  # fmt: skip
    return total / N


def worker(spec: Dict) -> Dict:
    """One case in this (fresh) process: peak memory of one step, then the step time."""
    import argparse as _argparse
    from types import SimpleNamespace

    import torch
    from fairseq import utils

    utils.import_user_module(_argparse.Namespace(user_dir=spec["plugins"]))
    from plugins.attention import build_attention

    torch.manual_seed(0)
    case, N = spec["case"], spec["N"]
    options = SimpleNamespace() if case == "full" else SimpleNamespace(**sparse_options(case, N))
    attn = build_attention("full" if case == "full" else "sparse", spec["dim"], spec["heads"], 0.0, options)

    def step(x):
        out, _ = attn(x, None, keep=0)
        out.sum().backward()

    warm = 2 * (options.sparse_stride if case != "full" else 64)
    step(torch.randn(1, warm, spec["dim"], requires_grad=True))  # first-call allocations, kernels
    x = torch.randn(1, N, spec["dim"], requires_grad=True)
    attn.zero_grad(set_to_none=False)  # gradient buffers exist before the measured step
    times = []

    def timed():
        x.grad = None
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)

    peak, _ = peak_memory(timed)
    for _ in range(spec["repeats"] - 1):
        timed()
    return {"case": case, "N": N, "peak_mb": peak / 2**20, "times": times, "time": statistics.median(times),
            "keys_per_query": keys_per_query(case, N)}  # fmt: skip


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="Sparse Transformer attention vs SDPA: one layer forward + backward, time and peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="N up to 4096, one repeat (a few minutes)")
    p.add_argument("--dim", type=int, default=256, help="d_model")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON spec
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    return a


def markdown_table(rows: List[Dict]) -> str:
    lines = [
        "| N | attention | keys/query | time (s) | peak memory (MB) | time vs full | memory vs full |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['case']} | {r['keys_per_query']:,.0f} | {r['time']:.2f} | {r['peak_mb']:,.0f} | "
            f"{r['time_ratio']:.2f}x | {r['memory_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def goals(rows: List[Dict]) -> List[str]:
    """The issue's goals, checked on this run's numbers (ratios < 1: sparse uses less than full)."""
    out = []
    for what, key, n_min in (("memory", "memory_ratio", 4096), ("time", "time_ratio", 8192)):
        for case in sorted({r["case"] for r in rows if r["case"] != "full"}):
            sel = [r for r in rows if r["case"] == case and r["N"] >= n_min]
            if not sel:
                continue
            met = all(r[key] < 1 for r in sel)
            detail = ", ".join(f"N={r['N']}: {r[key]:.2f}x" for r in sel)
            out.append(f"- {case} beats full in {what} at N >= {n_min}: {'met' if met else 'NOT met'} ({detail})")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    out, stamp, logs, env = start_run(a.out, a.threads)
    env = worker_env(env)
    lengths = [int(n) for n in a.lengths.split(",")]
    cases = a.cases.split(",")
    rows, runs = [], []
    for N in lengths:
        for case in cases:
            spec = dict(case=case, N=N, dim=a.dim, heads=a.heads, repeats=a.repeats, plugins=a.plugins)
            cmd = [sys.executable, "-m", "recipes.benchmarks.sparse_attention", "--worker", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            (logs / f"{case}-{N}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"{case} N={N} failed:\n{proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append(result)
            print(f"N={N} {case}: {result['time']:.2f} s, {result['peak_mb']:.0f} MB", flush=True)
        full = next((r for r in runs if r["N"] == N and r["case"] == "full"), None)
        for r in (r for r in runs if r["N"] == N):
            r["time_ratio"] = r["time"] / full["time"] if full else float("nan")
            r["memory_ratio"] = r["peak_mb"] / full["peak_mb"] if full else float("nan")
            rows.append(r)
    table = markdown_table(rows)
    report = "\n".join([table, "", *goals(rows)])
    print("\n" + report)
    (out / f"{stamp}.md").write_text(report + "\n")
    record = dict(
        benchmark="sparse_attention", stamp=stamp, lengths=lengths, cases=cases, dim=a.dim, heads=a.heads,
        repeats=a.repeats, threads=a.threads, summary=SUMMARY, rows=rows, versions=versions(Path(a.plugins)),
        command=" ".join(["python -m recipes.benchmarks.sparse_attention", *(argv if argv is not None else sys.argv[1:])]),
        load=os.getloadavg(),
    )  # fmt: skip
    save_record(out, stamp, logs, record)


if __name__ == "__main__":
    main()

"""LSH attention and reversible layers (Reformer) against full attention, on CPU.

What is measured
    1. One attention layer (projections included), forward + backward, d_model 256, 4 heads, batch 1,
       sequence length N = 1024 ... 16384: the median time of ``--repeats`` steps after one warm-up step,
       and the peak memory of the step above the memory held before it (``recipes/benchmarks/memory.py``:
       the resident-set high-water mark, reset before the step, in a worker run with ``memory.MALLOC_ENV``
       so that freed tensors leave the resident set; the largest over the repeats). Cases: ``full``
       (PyTorch SDPA, causal), ``lsh`` with 1, 2, 4 hashing rounds (buckets and chunks of 64), and
       reformer-pytorch's ``LSHSelfAttention`` (causal, bucket_size 64, the same rounds) when it imports.
    2. A 12-layer-deep LSH model (d 256, 4 heads, FFN 1024, bytes vocabulary), one training step (forward
       + backward) at one length, for 1 ... 12 layers, with and without ``--reversible``: the peak memory
       as a function of depth (the reversible one should stay flat).
    Every case runs in its own subprocess (no allocator state shared between cases), with
    ``OMP_NUM_THREADS`` = ``--threads``; rows of one run are comparable, ratios are what to read.

Command (from the repository root)::

    python -m recipes.benchmarks.lsh_attention            # N up to 16384, depths 1..12 at 4096
    python -m recipes.benchmarks.lsh_attention --quick    # N up to 4096; depths 1, 4, 12 at 2048

reformer-pytorch (optional peer): ``pip install --no-deps reformer-pytorch colt5-attention
local-attention axial-positional-embedding product-key-memory`` (pure Python; einops is needed too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from .memory import peak_memory, worker_env
from .train_throughput import REPO, add_sized_args, resolve_sizes, save_record, start_run, versions

DEFAULT_OUT = "runs/benchmarks/lsh_attention"
SIZES = {  # flag: (default, --quick)
    "max_length": (16384, 4096),
    "model_length": (4096, 2048),
    "repeats": (3, 2),
    "depths": ("1,2,4,8,12", "1,4,12"),
}
D, HEADS, BUCKET = 256, 4, 64


# ---- measurement inside a worker process -------------------------------------------------------------
def measure(step, repeats: int) -> Dict:
    """Median seconds of ``step()`` and its peak memory (MB) above what was resident before it."""
    step()  # warm-up (first-call allocations, kernel selection)
    times, peaks = [], []

    def timed():
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    for _ in range(repeats):
        peaks.append(peak_memory(timed)[0] / 2**20)
    return {"seconds": statistics.median(times), "peak_mb": max(peaks)}


def attention_worker(case: Dict) -> Dict:
    import torch

    torch.manual_seed(0)
    N = case["n"]
    x = torch.randn(1, N, D, requires_grad=True)
    if case["kind"] == "reformer-pytorch":
        from reformer_pytorch import LSHSelfAttention

        layer = LSHSelfAttention(dim=D, heads=HEADS, bucket_size=BUCKET, n_hashes=case["hashes"], causal=True)

        def forward():
            return layer(x)

    else:
        sys.path.insert(0, str(REPO))
        from types import SimpleNamespace

        from plugins.attention import build_attention

        options = SimpleNamespace(lsh_n_hashes=case.get("hashes", 1), lsh_bucket_size=BUCKET, lsh_chunk_size=BUCKET)
        layer = build_attention(case["kind"], D, HEADS, 0.0, options)

        def forward():
            return layer(x, None, keep=0)[0]

    layer.train()

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward().square().mean().backward()

    return measure(step, case["repeats"])


def model_worker(case: Dict) -> Dict:
    import argparse as _argparse

    import torch
    from fairseq import utils

    utils.import_user_module(_argparse.Namespace(user_dir=str(REPO / "plugins")))
    from fairseq.data import Dictionary

    from plugins.models.efficient_lm import EfficientLM, EfficientLMConfig

    d = Dictionary()
    for b in range(256):
        d.add_symbol(str(b))
    cfg = EfficientLMConfig()
    values = dict(attention="lsh", lsh_n_hashes=2, lsh_bucket_size=BUCKET, lsh_chunk_size=BUCKET, pos_emb="sinusoidal",
                  decoder_layers=case["layers"], decoder_embed_dim=D, decoder_ffn_embed_dim=4 * D,
                  decoder_attention_heads=HEADS, decoder_normalize_before=True, dropout=0.0,
                  reversible=case["reversible"], ffn_chunks=case["ffn_chunks"], tokens_per_sample=case["n"],
                  max_target_positions=case["n"], share_decoder_input_output_embed=True)  # fmt: skip
    for k, v in values.items():
        setattr(cfg, k, v)
    task = _argparse.Namespace(source_dictionary=d, target_dictionary=d)
    torch.manual_seed(0)
    model = EfficientLM.build_model(cfg, task).train()
    tokens = torch.randint(4, len(d), (1, case["n"]))

    def step():
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tokens.view(-1)).backward()

    result = measure(step, case["repeats"])
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


# ---- driver --------------------------------------------------------------------------------------------
def run_case(case: Dict, env: Dict[str, str], timeout: int = 900) -> Dict:
    cmd = [sys.executable, "-m", "recipes.benchmarks.lsh_attention", "--worker", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**case, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**case, **json.loads(lines[-1])}


def peer_available(env) -> Optional[str]:
    proc = subprocess.run([sys.executable, "-c", "import reformer_pytorch"], capture_output=True, text=True, env=env)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def fmt(r: Dict, key: str, spec: str) -> str:
    return "error" if "error" in r else format(r[key], spec)


def attention_table(rows: List[Dict], lengths: List[int]) -> str:
    kinds = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["n"]): r for r in rows}
    head = "| N | " + " | ".join(f"{k} s / MB" for k in kinds) + " |"
    lines = [head, "|---:|" + "---:|" * len(kinds)]
    for n in lengths:
        cells = [f"{fmt(by[k, n], 'seconds', '.3f')} / {fmt(by[k, n], 'peak_mb', '.0f')}" for k in kinds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(rows: List[Dict], depths: List[int]) -> str:
    by = {(r["reversible"], r["layers"]): r for r in rows}
    lines = ["| layers | plain peak MB | reversible peak MB | plain s | reversible s |", "|---:|---:|---:|---:|---:|"]
    for n in depths:
        p, r = by[False, n], by[True, n]
        lines.append(f"| {n} | {fmt(p, 'peak_mb', '.0f')} | {fmt(r, 'peak_mb', '.0f')} | "
                     f"{fmt(p, 'seconds', '.2f')} | {fmt(r, 'seconds', '.2f')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="N up to 4096, model at 2048 (~3 minutes)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hashes", default="1,2,4", help="LSH rounds to compare")
    p.add_argument("--lengths", default=None, help="comma-separated N (default: 1024, 2048, ... up to --max-length)")
    p.add_argument("--skip-model", action="store_true", help="only the attention-layer table")
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    if a.worker:
        case = json.loads(a.worker)
        print(json.dumps(model_worker(case) if case["kind"] == "model" else attention_worker(case)))
        return
    resolve_sizes(a, SIZES)
    out, stamp, logs, env = start_run(a.out, a.threads)
    env = worker_env(env)  # freed tensors leave the resident set (see memory.py)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384) if n <= a.max_length]
    if a.lengths:
        lengths = [int(n) for n in a.lengths.split(",")]
    hashes = [int(h) for h in a.hashes.split(",")]
    missing_peer = peer_available(env)
    if missing_peer:
        print(f"reformer-pytorch not available ({missing_peer}): skipped")

    cases = []
    for n in lengths:
        cases.append({"kind": "full", "label": "full (SDPA)", "n": n})
        for h in hashes:
            cases.append({"kind": "lsh", "label": f"lsh H={h}", "n": n, "hashes": h})
            if not missing_peer:
                cases.append({"kind": "reformer-pytorch", "label": f"reformer-pytorch H={h}", "n": n, "hashes": h})
    rows = []
    for case in cases:
        r = run_case({**case, "repeats": a.repeats}, env)
        print(json.dumps(r), flush=True)
        rows.append(r)
    tables = [f"## One attention layer, forward + backward (d {D}, {HEADS} heads, batch 1, bucket {BUCKET}, "
              f"{a.threads} thread)\n\n" + attention_table(rows, lengths)]  # fmt: skip

    model_rows = []
    if not a.skip_model:
        depths = [int(x) for x in a.depths.split(",")]
        for n_layers in depths:
            for rev in (False, True):
                case = {"kind": "model", "layers": n_layers, "reversible": rev, "ffn_chunks": 4 if rev else 1,
                        "n": a.model_length, "repeats": 1}  # fmt: skip
                r = run_case(case, env)
                print(json.dumps(r), flush=True)
                model_rows.append(r)
        tables.append(f"## LSH model training step (d {D}, {HEADS} heads, FFN {4 * D}, T {a.model_length}, batch 1; "
                      "reversible with --ffn-chunks 4)\n\n" + model_table(model_rows, depths))  # fmt: skip
    text = "\n\n".join(tables)
    (out / f"{stamp}.md").write_text(text + "\n")
    print("\n" + text)
    record = {"benchmark": "lsh_attention", "stamp": stamp, "threads": a.threads, "quick": a.quick,
              "versions": versions(REPO / "plugins"), "attention": rows, "model": model_rows,
              "command": "python -m recipes.benchmarks.lsh_attention" + (" --quick" if a.quick else "")}  # fmt: skip
    save_record(out, stamp, logs, record)


if __name__ == "__main__":
    main()

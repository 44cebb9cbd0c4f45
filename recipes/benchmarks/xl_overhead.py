"""Training overhead of Transformer-XL: ``xl_small`` against ``full_small`` at equal size and segment length.

What is measured
    Train tokens per second (fairseq's ``wps``: target tokens / wall time of forward + backward + Adam
    step + data loading + logging) of the ``full_small`` preset (4 layers x 128, 4 heads, FFN 512,
    pre-norm, tied embeddings, causal softmax attention, sinusoidal positions) and of ``xl_small`` (the
    same network with Transformer-XL relative attention), both trained by the real ``fairseq-train`` on
    the same data with the same segment length T (``--tokens-per-sample``) and batch. Rows per T:

    - ``full_small``: T queries over T keys;
    - ``xl_small --mem-len 0``: relative attention alone (the position term q.W_R r, the relative shift,
      the float mask that keeps SDPA off its fused causal path), no memory;
    - ``xl_small --mem-len T`` and ``--mem-len 2T``: with memory, every layer attends over M more keys,
      whose keys/values are recomputed from the cached (detached) layer inputs every segment, and the
      relative position term grows to T x (M + T).

    The number to read is ``vs full`` (tokens/s relative to ``full_small`` at the same T) and the
    overhead ``full / xl - 1`` (extra time per training token). ``mem 0`` separates the cost of the
    relative attention itself from the cost of the memory.

How
    - data: the deterministic pseudo-text of ``train_throughput`` (``make_data``: a seeded Zipfian word
      generator, one byte per token, fixed 256-byte dictionary), ``--task segment_lm`` (B contiguous
      streams, in order, so the memory continues every stream; no epoch boundary inside a run);
    - code: a copy of ``--plugins`` (default this checkout's ``plugins/``) taken at start is the
      ``--user-dir`` of every run (edits made meanwhile do not leak in); the record keeps the git
      commit and a hash of the copied ``.py`` files;
    - every run a fresh ``fairseq-train`` process with ``--cpu --no-save --disable-validation
      --max-update N --log-format json --num-workers 0``, the same ``OMP_NUM_THREADS`` /
      ``MKL_NUM_THREADS`` (``--threads``, default 1: on a shared 2-core box 2-thread OpenMP collapses
      whenever another job takes a core, which hits the many small ops of relative attention harder
      than the large GEMMs); runs are interleaved (all configurations of all T, then again,
      ``--repeats`` times);
    - a run's speed is its tokens over its time across the ``train_inner`` intervals after the first
      (warm-up; the memory is also empty in the first update) -- ``train_throughput``'s ``parse_log`` /
      ``run_speed``; the table gives the median run per configuration, the ratio of the medians, and
      the table also gives the median of the per-repeat paired ratios (robust to drifting load) and the
      ratio of the fastest runs (the least disturbed by other jobs); when the three disagree, the
      machine was too busy: raise ``--repeats``.

Command (from the repository root)::

    python -m recipes.benchmarks.xl_overhead            # ~10 min on an idle 2-core CPU, ~20 on a busy one
    python -m recipes.benchmarks.xl_overhead --quick    # ~1-2 min smoke run (T = 64, one repeat)
    python -m recipes.benchmarks.xl_overhead --segments 64,128,256 --repeats 5 --threads 2

How to read the output
    A markdown table (stdout and ``<out>/<stamp>.md``): per T and configuration, keys per query (up to
    M + T), parameters, median tokens/s, tokens/s relative to ``full_small`` and the time overhead.
    ``<out>/results.jsonl`` gets one JSON line with settings, exact commands, every run, snapshot_plugins, tree_hash, versions,
    threads and date; logs are in ``<out>/<stamp>/``. Compare ratios within one run, not tokens/s across
    runs (the machine is shared).
"""

import argparse
import datetime
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from recipes.benchmarks.train_throughput import (
    BIN,
    add_sized_args,
    make_data,
    resolve_sizes,
    run_one,
    save_record,
    snapshot_plugins,
    start_run,
    tree_hash,
    versions,
)

DEFAULT_OUT = "runs/benchmarks/xl_overhead"

SIZES = {  # flag: (default, --quick)
    "segments": ("64,128", "64"),  # T = --tokens-per-sample
    "batch_size": (16, 8),
    "max_update": (60, 20),
    "log_interval": (10, 5),
    "repeats": (3, 1),
    "corpus_mb": (1.5, 0.3),
}


def configs(segment: int) -> List[Dict]:
    """(label, arch, mem_len) of every row at segment length T."""
    return [
        {"label": "full_small", "arch": "full_small", "mem_len": 0},
        {"label": "xl_small, mem 0", "arch": "xl_small", "mem_len": 0},
        {"label": "xl_small, mem T", "arch": "xl_small", "mem_len": segment},
        {"label": "xl_small, mem 2T", "arch": "xl_small", "mem_len": 2 * segment},
    ]


def train_cmd(a, data: Path, save_dir: Path, arch: str, mem_len: int, segment: int) -> List[str]:
    return [
        str(BIN / "fairseq-train"), str(data), "--cpu", "--seed", "1", "--num-workers", "0",
        "--user-dir", a.user_dir, "--task", "segment_lm", "--criterion", "aux_cross_entropy",
        "--arch", arch, "--mem-len", str(mem_len),
        "--tokens-per-sample", str(segment), "--batch-size", str(a.batch_size),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.0005", "--lr-scheduler", "fixed",
        "--max-update", str(a.max_update), "--log-format", "json", "--log-interval", str(a.log_interval),
        "--no-save", "--disable-validation", "--save-dir", str(save_dir), "--no-progress-bar",
    ]  # fmt: skip


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="Train tokens/s of xl_small (relative attention + memory) vs full_small at equal T.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="T=64 only, few updates, one repeat (~1-2 minutes)")
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    a.segments = [int(x) for x in str(a.segments).split(",") if x.strip()]
    a.plugins = str(Path(a.plugins).resolve())
    if a.max_update < 2 * a.log_interval:
        p.error("--max-update must cover at least two --log-interval intervals (the first is warm-up)")
    return a


def build_rows(a, runs: List[Dict]) -> List[Dict]:
    rows = []
    for t in a.segments:
        mine = [r for r in runs if r["segment"] == t]
        full = [r for r in mine if r["model"] == "full_small"]
        base = statistics.median(r["tokens_per_s"] for r in full)
        for c in configs(t):
            sel = [r for r in mine if r["model"] == c["label"]]
            med = statistics.median(r["tokens_per_s"] for r in sel)
            paired = [x["tokens_per_s"] / f["tokens_per_s"] for x, f in zip(sel, full)]  # same repeat
            best = max(r["tokens_per_s"] for r in sel) / max(r["tokens_per_s"] for r in full)
            rows.append(
                {
                    "segment": t,
                    "model": c["label"],
                    "mem_len": c["mem_len"],
                    "keys": c["mem_len"] + t,
                    "params": sel[0]["params"],
                    "median": med,
                    "ratio": med / base,
                    "overhead": base / med - 1.0,
                    "paired_ratio": statistics.median(paired),
                    "best_ratio": best,
                    "runs": len(sel),
                }
            )
    return rows


def markdown_table(rows: List[Dict]) -> str:
    lines = [
        "| T | model | mem_len | keys per query (max) | params | median tokens/s | vs full | time overhead "
        "| paired | best vs best |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['segment']} | {r['model']} | {r['mem_len']} | {r['keys']} | {r['params']:,} | {r['median']:,.0f} "
            f"| {r['ratio']:.2f}x | {100 * r['overhead']:+.0f}% | {r['paired_ratio']:.2f}x | {r['best_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    out, stamp, logs, env = start_run(a.out, a.threads)
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="xl_overhead_") as tmp:
        tmp = Path(tmp)
        # a private copy of plugins/: edits made to the checkout while this runs do not leak into it
        code_version = versions(Path(a.plugins))
        a.user_dir = str(snapshot_plugins(Path(a.plugins), tmp / "snapshot"))
        plugins_hash = tree_hash(Path(a.user_dir))
        t0 = time.time()
        data = make_data(tmp, a.corpus_mb, a.seed)
        print(f"corpus: {a.corpus_mb} MB of pseudo-text binarized in {time.time() - t0:.0f} s ({data})")
        commands: Dict[str, str] = {}
        runs: List[Dict] = []
        for rep in range(a.repeats):
            for t in a.segments:
                for c in configs(t):
                    cmd = train_cmd(a, data, tmp / "ckpt", c["arch"], c["mem_len"], t)
                    commands[f"T={t} {c['label']}"] = shlex.join(cmd)
                    slug = f"T{t}-{c['arch']}-mem{c['mem_len']}-{rep}"
                    r = run_one(c["label"], cmd, env, logs / f"{slug}.log")
                    r.update(segment=t, mem_len=c["mem_len"], repeat=rep)
                    runs.append(r)
                    print(
                        f"repeat {rep} T={t:4d} {c['label']:18s} {r['tokens_per_s']:9,.0f} tokens/s  ({r['wall_s']:.0f} s)"
                    )

    rows = build_rows(a, runs)
    table = markdown_table(rows)
    header = (
        f"xl overhead, {stamp}: full_small vs xl_small (4 layers x 128, 4 heads, FFN 512), batch {a.batch_size} "
        f"streams, {a.max_update} updates (first {a.log_interval} are warm-up), {a.threads} thread(s), "
        f"{a.repeats} interleaved repeats; vs full = median tokens/s / full_small's at the same T, "
        "time overhead = full / xl - 1, paired = median of per-repeat ratios, best vs best = fastest run / "
        "full_small's fastest (the least disturbed by other load)"
    )
    print("\n" + header + "\n\n" + table)
    (out / f"{stamp}.md").write_text(header + "\n\n" + table + "\n")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "benchmark": "xl_overhead",
        "settings": {k: getattr(a, k) for k in (*SIZES, "threads", "seed", "quick")},
        "threads": a.threads,
        "versions": code_version,
        "plugins": a.plugins,
        "plugins_tree_hash": plugins_hash,  # sha256 of the snapshot's .py files: the code measured
        "cpu_count": os.cpu_count(),
        "data": f"generated pseudo-text, {a.corpus_mb} MB, seed {a.seed}",
        "env": {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)},
        "commands": commands,
        "rows": rows,
        "runs": runs,
        "table": table,
        "total_s": round(time.time() - started),
    }
    save_record(out, stamp, logs, record)


if __name__ == "__main__":
    main()

"""Compute follows the span: one adaptive-span attention layer with a full cache vs learned short spans.

What is measured
    One ``--attention adaptive_span`` layer (D, H, a segment of T queries, batch B) at steady state of
    segment-level recurrence, for max span S in {1024, 2048, 4096, 8192}, in two settings:

    - ``full``: every head's span at S (s_h = 1): the window and the cache are S positions, what a
      fixed-span model (or adaptive span without trimming) pays;
    - ``short``: learned short spans, the heads spread geometrically over 64..512 positions (most heads
      of the paper's trained models, in its span-per-head figure, are that short): the window is the longest span + ramp (32)
      rounded up to 64, i.e. 576, whatever S is.

    Per setting and S: the milliseconds of one evaluation forward (no gradient; the cache holds the layer
    inputs and their keys/values) and of one training forward + backward (the cache holds layer inputs,
    keys/values are recomputed, as in Transformer-XL), the peak memory each step adds above what was held
    before it (``recipes.benchmarks.memory.peak_memory``, after a warm-up step) and the size of the cache
    the layer keeps (computed from its tensors).
    The number to read is ``full / short``: how much the trimmed layer saves at that S; the ``short`` row
    should stay flat as S grows while ``full`` grows with S.

How
    Every (setting, S, step kind) runs in its own ``python -m recipes.benchmarks.adaptive_span --one ...``
    process with ``OMP_NUM_THREADS`` = ``--threads`` (default 1: the 2-core box is shared); timings are the
    median of ``--repeats`` steps after one warm-up step. Peak memory (``recipes/benchmarks/memory.py``):
    on CPU the resident-set high-water mark of the step, reset just before it, above the resident set
    before it, in a worker run with ``memory.MALLOC_ENV`` (freed tensors leave the resident set); on CUDA
    (``--device cuda``) ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the step.
    float32, CPU by default.

Command (from the repository root)::

    python -m recipes.benchmarks.adaptive_span            # D 512, H 8, T 512, B 1; ~5-10 min on 2 shared cores
    python -m recipes.benchmarks.adaptive_span --quick    # D 256, H 4, T 256; ~2 min

Output: a markdown table on stdout and in ``<out>/<stamp>.md``, one JSON line in ``<out>/results.jsonl``
(settings, command, every measurement, versions).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

from .memory import peak_memory, worker_env
from .train_throughput import REPO, add_sized_args, resolve_sizes, save_record, start_run, versions

DEFAULT_OUT = "runs/benchmarks/adaptive_span"
SPANS = (1024, 2048, 4096, 8192)
SIZES = {  # flag: (default, --quick)
    "embed_dim": (512, 256),
    "heads": (8, 4),
    "tokens_per_sample": (512, 256),
    "batch_size": (1, 1),
    "repeats": (3, 2),
}


def short_spans(heads: int) -> List[float]:
    """Spans spread geometrically from 64 to 512 positions over the heads."""
    if heads == 1:
        return [512.0]
    return [64.0 * 8.0 ** (h / (heads - 1)) for h in range(heads)]


def measure_one(spec: Dict) -> Dict:
    """One (setting, S, kind) measurement in this process; returns times (ms), peak added (MiB), cache size."""
    import torch

    sys.path.insert(0, str(REPO))
    from plugins.attention import build_attention
    from plugins.memory import HiddenMemory

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    D, H, T, B, S = spec["embed_dim"], spec["heads"], spec["tokens_per_sample"], spec["batch_size"], spec["max_span"]
    options = SimpleNamespace(max_span=S, span_ramp=32, span_init=1.0, span_loss_weight=0.0, persistent_mem_size=0)
    attn = build_attention("adaptive_span", D, H, dropout=0.0, options=options).to(device)
    if spec["setting"] == "short":
        attn.span_fraction.data = torch.tensor(short_spans(H), device=device) / S
    train = spec["kind"] == "train"
    attn.train(train)
    window = attn.window()
    with torch.set_grad_enabled(train):
        cache = attn.cache_length(keep=S, window=window)  # the steady-state cache of this mode
    with torch.no_grad():
        hidden = torch.randn(B, cache, D, device=device)
        keys, values = (None, None) if train else attn.keys_values(hidden, None)
    mem = HiddenMemory(hidden, keys, values)
    cache_mib = sum(t.numel() * t.element_size() for t in (hidden, keys, values) if t is not None) / 2**20
    x = torch.randn(B, T, D, device=device, requires_grad=train)

    def step():
        with torch.set_grad_enabled(train):
            out, _ = attn(x, mem, keep=S)
            if train:
                out.square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (first-call allocations, kernel selection)
    peak, _ = peak_memory(step, device)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return {**spec, "window": window, "cache": cache, "cache_mib": cache_mib, "ms": statistics.median(times),
            "all_ms": times, "peak_mib": peak / 2**20}  # fmt: skip


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="Adaptive span: time and memory of one layer, full cache vs learned short spans.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller layer, two repeats (~2 minutes)")
    p.add_argument("--spans", default=",".join(map(str, SPANS)), help="max spans S to measure")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement (JSON spec)
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    return a


def markdown_table(rows: List[Dict]) -> str:
    lines = [
        "| S | setting | window | cache (pos / MiB) | eval fwd ms | train fwd+bwd ms | eval peak MiB | train peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["max_span"], r["setting"], r["kind"]): r for r in rows}
    for S in sorted({r["max_span"] for r in rows}):
        for setting in ("full", "short"):
            ev, tr = by[(S, setting, "eval")], by[(S, setting, "train")]
            lines.append(
                f"| {S} | {setting} | {ev['window']} | {ev['cache']} / {ev['cache_mib']:.1f} | {ev['ms']:.1f} | "
                f"{tr['ms']:.1f} | {ev['peak_mib']:.0f} | {tr['peak_mib']:.0f} |"
            )
        ev_f, ev_s, tr_f, tr_s = by[(S, "full", "eval")], by[(S, "short", "eval")], by[(S, "full", "train")], by[(S, "short", "train")]  # fmt: skip
        lines.append(
            f"| {S} | **full / short** | | {ev_f['cache_mib'] / ev_s['cache_mib']:.1f}x | {ev_f['ms'] / ev_s['ms']:.1f}x | "
            f"{tr_f['ms'] / tr_s['ms']:.1f}x | {ev_f['peak_mib'] / max(ev_s['peak_mib'], 1):.1f}x | "
            f"{tr_f['peak_mib'] / max(tr_s['peak_mib'], 1):.1f}x |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    if a.one is not None:
        print(json.dumps(measure_one(json.loads(a.one))))
        return
    out, stamp, logs, env = start_run(a.out, a.threads)
    env = worker_env(env)
    base = {k: getattr(a, k) for k in SIZES} | {"device": a.device}
    rows = []
    for S in [int(s) for s in a.spans.split(",")]:
        for setting in ("full", "short"):
            for kind in ("eval", "train"):
                spec = {**base, "max_span": S, "setting": setting, "kind": kind}
                cmd = [sys.executable, "-m", "recipes.benchmarks.adaptive_span", "--one", json.dumps(spec)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if proc.returncode != 0:
                    raise SystemExit(f"error: measurement {spec} failed:\n{proc.stderr[-2000:]}")
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"S={S:5d} {setting:5s} {kind:5s} window {r['window']:5d} {r['ms']:9.1f} ms  peak +{r['peak_mib']:.0f} MiB", flush=True)  # fmt: skip
    table = markdown_table(rows)
    print("\n" + table)
    (out / f"{stamp}.md").write_text(table + "\n")
    command = "python -m recipes.benchmarks.adaptive_span " + " ".join(sys.argv[1:] if argv is None else argv)
    save_record(out, stamp, logs, {"benchmark": "adaptive_span", "stamp": stamp, "command": command.strip(),
                                   "settings": base, "threads": a.threads, "rows": rows,
                                   "versions": versions(REPO / "plugins")})  # fmt: skip


if __name__ == "__main__":
    main()

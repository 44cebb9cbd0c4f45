"""Cost of covering a long past: Transformer-XL memory vs memory + compressed memory (Rae et al. 2020).

What is measured
    One attention layer in training (forward + backward, the steady state where every segment evicts T
    states) of two models that see the same span P of past positions, and a third with the same keys:

    - ``xl``: ``--attention relative --mem-len P`` (every past position is a key: P + T keys per query);
    - ``compressive``: ``--attention compressive --mem-len M --cmem-len N --compression-rate c`` with
      M + c N = P (M + N + T keys: the compressed part attends over c x fewer keys), conv compression with
      its attention-reconstruction loss (the paper's default; its cost is included);
    - ``xl_same_keys``: ``--attention relative --mem-len M + N`` (as many keys as the compressive model, a
      shorter span): the difference to it is the cost of compressing and of the compression loss.

    Per model: keys per query, attention FLOPs (the two T x S products QK^T and AV plus the relative
    position term, 2 multiply-adds each: ``6 B T S D`` per layer, plus projecting the S - T memory keys and
    values ``4 B (S - T) D^2``), median seconds per segment, the memory held for backward (the bytes of
    every storage autograd saves during the forward, ``memory.count_saved_tensors``: the activation memory
    of training), the bytes of the recurrent state carried to the next segment, and on a GPU the peak CUDA
    memory a segment adds above what was allocated before it (``memory.peak_memory``: weights, memories and
    input excluded). ``recipes/benchmarks/memory.py`` documents both measurements. Ratios are
    xl / compressive in the same run (the machine is shared: compare ratios, not seconds across runs).

How
    float32, ``torch.manual_seed(0)``, dropout 0; both layers are built through the attention registry
    (``build_attention``) with the same width; warm-up segments fill the memories to their steady size;
    then ``--repeats`` rounds, each timing both models one after the other (interleaved), median per model.

Command (from the repository root)::

    OMP_NUM_THREADS=1 python -m recipes.benchmarks.compressive_memory            # D 512, T 512, P 2560
    OMP_NUM_THREADS=1 python -m recipes.benchmarks.compressive_memory --quick    # D 256, T 128, P 640
"""

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

from plugins.attention import build_attention
from recipes.benchmarks.memory import count_saved_tensors, peak_memory
from recipes.benchmarks.train_throughput import add_sized_args, resolve_sizes, save_record, start_run, versions

DEFAULT_OUT = "runs/benchmarks/compressive_memory"
SIZES = {  # flag: (default, --quick); defaults: compressive_enwik8 (mem 512, cmem 512, c 4)
    "embed_dim": (512, 256),
    "heads": (8, 4),
    "segment": (512, 128),
    "mem_len": (512, 128),
    "cmem_len": (512, 128),
    "rate": (4, 4),
    "batch_size": (2, 2),
    "repeats": (5, 3),
}


def options(**values) -> SimpleNamespace:
    base = dict(clamp_len=0, same_length=False, untie_r=False, pos_emb="relative", cmem_len=0, compression_rate=1,
                compression_fn="conv", compression_loss="attention_reconstruction", compression_loss_weight=1.0)  # fmt: skip
    return SimpleNamespace(**{**base, **values})


def build(a) -> Dict[str, Dict]:
    span = a.mem_len + a.rate * a.cmem_len
    torch.manual_seed(0)
    xl = build_attention("relative", a.embed_dim, a.heads, 0.0, options())
    ct = build_attention(
        "compressive", a.embed_dim, a.heads, 0.0, options(cmem_len=a.cmem_len, compression_rate=a.rate)
    )
    keys = a.mem_len + a.cmem_len
    torch.manual_seed(0)
    xl_keys = build_attention("relative", a.embed_dim, a.heads, 0.0, options())
    return {
        "xl": {"attn": xl.to(a.device).train(), "keep": span, "desc": f"relative, mem {span} (same span)"},
        "xl_same_keys": {
            "attn": xl_keys.to(a.device).train(),
            "keep": keys,
            "desc": f"relative, mem {keys} (same keys, span {keys})",
        },
        "compressive": {
            "attn": ct.to(a.device).train(),
            "keep": a.mem_len,
            "desc": f"compressive, mem {a.mem_len} + cmem {a.cmem_len} x c {a.rate}",
        },
    }


def state_bytes(mem) -> int:
    return sum(t.numel() * t.element_size() for t in vars(mem).values() if isinstance(t, torch.Tensor))


def fill(model: Dict, a, span: int):
    """Warm-up segments until the memories hold their steady-state sizes (the XL memory the whole span)."""
    mem = None
    with torch.no_grad():
        for _ in range(span // a.segment + 2):
            _, mem = model["attn"](
                torch.randn(a.batch_size, a.segment, a.embed_dim, device=a.device), mem, model["keep"]
            )
    mem.keys = mem.values = None  # training recomputes them (no cache with gradients)
    return mem


def step(model: Dict, mem, x) -> Dict:
    """One training segment: forward, loss (LM stand-in + the compression loss), backward. Returns the
    seconds, the bytes autograd saved for backward, and the keys per query."""
    attn = model["attn"]
    attn.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with count_saved_tensors() as saved:
        out, new_mem = attn(x, mem, model["keep"])
        loss = out.float().square().mean() + sum(t.weight * t.value for t in attn.aux_losses(new_mem).values())
    loss.backward()
    sync()
    keys = x.size(1) + mem.length + getattr(mem, "compressed_length", 0)
    return {"seconds": time.perf_counter() - start, "saved_bytes": saved["bytes"], "keys": keys, "new_mem": new_mem}


def step_with_peak(model: Dict, mem, x) -> Dict:
    """``step``, with ``peak_bytes``: on CUDA the memory the step adds at its peak, else None (no CPU peak:
    the three models share this process and its heap)."""
    if not x.is_cuda:
        return {**step(model, mem, x), "peak_bytes": None}
    result = []
    peak, _ = peak_memory(lambda: result.append(step(model, mem, x)), x.device)
    return {**result[0], "peak_bytes": peak}


def flops(a, keys: int) -> float:
    B, T, D = a.batch_size, a.segment, a.embed_dim
    return 6 * B * T * keys * D + 4 * B * (keys - T) * D * D


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="XL memory vs memory + compressed memory over the same span: keys, FLOPs, time, memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="D 256, T 128, span 640, 3 repeats (well under a minute)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    return a


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out, stamp, logs, _ = start_run(a.out, a.threads)
    span = a.mem_len + a.rate * a.cmem_len
    models = build(a)
    mems = {name: fill(m, a, span) for name, m in models.items()}
    runs: Dict[str, List[Dict]] = {name: [] for name in models}
    peak: Dict[str, int] = {}
    for _ in range(a.repeats):
        for name, m in models.items():
            x = torch.randn(a.batch_size, a.segment, a.embed_dim, device=a.device)
            r = step_with_peak(m, mems[name], x)
            peak_bytes = r.pop("peak_bytes")
            if peak_bytes is not None:
                peak[name] = peak_bytes
            r["state_bytes"] = state_bytes(mems[name])
            mems[name] = r.pop("new_mem").detach()  # the next segment continues the stream
            mems[name].keys = mems[name].values = None
            runs[name].append(r)

    rows = []
    for name, m in models.items():
        rs = runs[name]
        rows.append(
            {
                "model": name,
                "desc": m["desc"],
                "keys": rs[-1]["keys"],
                "gflop": flops(a, rs[-1]["keys"]) / 1e9,
                "seconds": statistics.median(r["seconds"] for r in rs),
                "saved_mb": rs[-1]["saved_bytes"] / 2**20,
                "state_mb": rs[-1]["state_bytes"] / 2**20,
                "peak_mb": peak[name] / 2**20 if name in peak else None,
            }
        )
    xl, same_keys, ct = rows

    def paired_ratio(a_name: str, b_name: str) -> float:  # per repeat (the same load), then the median
        return statistics.median(x["seconds"] / y["seconds"] for x, y in zip(runs[a_name], runs[b_name]))

    paired = paired_ratio("xl", "compressive")
    lines = [
        f"span {span} past positions, T {a.segment}, D {a.embed_dim}, H {a.heads}, batch {a.batch_size}, "
        f"{a.device}, {a.threads} thread(s), one layer, forward + backward",
        "",
        "| model | keys per query | attention GFLOP | s / segment (median) | saved for backward MB | state MB |"
        + (" peak MB |" if peak else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['desc']} | {r['keys']} | {r['gflop']:.2f} | {r['seconds']:.3f} | {r['saved_mb']:.0f} | "
            f"{r['state_mb']:.1f} |" + (f" {r['peak_mb']:.0f} |" if peak else "")
        )
    ratio = (
        f"xl / compressive: keys {xl['keys'] / ct['keys']:.2f}x, FLOPs {xl['gflop'] / ct['gflop']:.2f}x, "
        f"time {paired:.2f}x (median paired), saved-for-backward memory {xl['saved_mb'] / ct['saved_mb']:.2f}x, "
        f"state {xl['state_mb'] / ct['state_mb']:.2f}x"
        + (f", peak {xl['peak_mb'] / ct['peak_mb']:.2f}x" if peak else "")
    )
    overhead = (
        f"compressive / xl with the same keys (the cost of compressing and of its loss): time "
        f"{paired_ratio('compressive', 'xl_same_keys'):.2f}x, saved-for-backward memory "
        f"{ct['saved_mb'] / same_keys['saved_mb']:.2f}x"
    )
    table = "\n".join(lines + ["", ratio, overhead])
    print(table)
    (out / f"{stamp}.md").write_text(table + "\n")
    save_record(out, stamp, logs, {"date": stamp, "settings": vars(a), "rows": rows, "paired_time_ratio": paired,
                                   "runs": {k: [dict(r) for r in v] for k, v in runs.items()},
                                   "versions": versions(Path(__file__).resolve().parents[2] / "plugins")})  # fmt: skip


if __name__ == "__main__":
    main()

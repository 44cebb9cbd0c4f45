"""The markdown summary of a suite run: one table per section and the goals of the leaderboard issue,
each reported as met / not met / not measured with the number behind it."""

from collections import defaultdict
from typing import Dict, List, Optional

from . import evaluation, mechanisms, training
from .peers import PEERS
from .plots import label

SUBQUADRATIC = ("linear", "sparse", "lsh")


def _fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def layer_table(rows: List[Dict]) -> str:
    lengths = sorted({r["N"] for r in rows})
    by_name = defaultdict(dict)
    for r in rows:
        different = r.get("peer") in PEERS and not PEERS[r["peer"]].same_function
        by_name[label(r) + (" [different function]" if different else "")][r["N"]] = r
    head = "| mechanism | " + " | ".join(f"N={n} ms / MB" for n in lengths) + " | time, mem vs SDPA at largest N |"
    lines = [head, "|---" * (len(lengths) + 2) + "|"]
    for name, cells in sorted(by_name.items()):
        parts = []
        for n in lengths:
            r = cells.get(n)
            if r is None:
                parts.append("")
            elif r["status"] != "ok":
                parts.append(r["status"])
            else:
                parts.append(f"{r['time_ms']:.1f} / {r['peak_mb']:.0f}")
        last = next((cells[n] for n in reversed(lengths) if n in cells and cells[n]["status"] == "ok"), None)
        ratio = f"{_fmt(last.get('time_vs_sdpa'))}x, {_fmt(last.get('mem_vs_sdpa'))}x" if last else "–"
        lines.append(f"| {name} | " + " | ".join(parts) + f" | {ratio} |")
    return "\n".join(lines)


def quality_tables(rows: List[Dict], a) -> List[str]:
    """One table per dataset, best test first."""
    parts = []
    for dataset in dict.fromkeys(r.get("dataset", "ptb-chars") for r in rows):
        mine = sorted((r for r in rows if r.get("dataset", "ptb-chars") == dataset),
                      key=lambda r: (r["status"] != "ok", r.get("test") or float("inf")))  # fmt: skip
        metric = next((r["metric"] for r in mine if r.get("metric")), "")
        parts += [f"## Quality at equal budget: {dataset} ({a.quality_updates} updates of {a.quality_batch} x "
                  f"{a.quality_segment} tokens for every preset, test {metric})", "",
                  "| preset | params | vs full_tiny | sized by | valid | test | train tokens/s | peak train MB |",
                  "|---|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in mine:
            if r["status"] != "ok":
                parts.append(f"| {r['preset']} | {r['status']}: {r.get('error', '')} | | | | | | |")
                continue
            cells = [f"{r['params']:,}", _fmt(r.get("params_vs_full")), r.get("sized") or "–",
                     _fmt(r.get("valid"), ".3f"), _fmt(r.get("test"), ".3f"), _fmt(r.get("tokens_per_s"), ",.0f"),
                     _fmt(r.get("peak_train_mb"), ",.0f")]  # fmt: skip
            parts.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
        parts.append("")
    return parts


def goals(rows: Dict[str, List[Dict]]) -> List[str]:
    out = []
    layer_ok = [r for r in rows["layer"] if r["status"] == "ok"]
    ours = [r for r in layer_ok if not r.get("peer")]
    for mech in sorted({r["attention"] for r in ours if "time_vs_best_peer" in r}):
        worst = max(r["time_vs_best_peer"] for r in ours if r["attention"] == mech and "time_vs_best_peer" in r)
        out.append(f"- {mech} not slower than the best public implementation at any N: "
                   f"{'met' if worst <= 1.0 else 'not met'} (worst time ratio {worst:.2f})")  # fmt: skip
    for mech in SUBQUADRATIC if rows["layer"] else ():  # (no layer section in this run: nothing to say)
        variants = sorted({r.get("label", "") for r in ours if r["attention"] == mech})
        if not variants:
            out.append(f"- {mech}: not measured (not registered in this checkout)")
        for variant in variants:
            mine = [r for r in ours if r["attention"] == mech and r.get("label", "") == variant]
            name = label(mine[0])
            big = [r for r in mine if r["N"] == 16384 and r.get("mem_vs_sdpa") is not None]
            if big:
                ratio = big[0]["mem_vs_sdpa"]
                out.append(f"- {name} memory at N=16384 <= 1/4 of SDPA's: {'met' if ratio <= 0.25 else 'not met'} "
                           f"({ratio:.2f}x)")  # fmt: skip
            else:
                out.append(f"- {name} memory at N=16384: not measured (largest N here: {max(r['N'] for r in mine)})")
            late = [r for r in mine if r["N"] >= 8192 and r.get("time_vs_sdpa") is not None]
            if late:
                worst = max(r["time_vs_sdpa"] for r in late)
                out.append(f"- {name} time <= SDPA's from N=8192: {'met' if worst <= 1.0 else 'not met'} "
                           f"(worst {worst:.2f}x)")  # fmt: skip
            else:
                out.append(f"- {name} time from N=8192: not measured")
    for r in rows["generation"]:
        if r.get("attention") == "linear" and r["status"] == "ok":
            ratio = r["late_over_early"]
            out.append(f"- linear generation flat in position (<= 1.2x, last vs second 64 of {r['generated']} tokens): "
                       f"{'met' if ratio <= 1.2 else 'not met'} ({ratio:.2f}x)")  # fmt: skip
    for c, ratio in evaluation.headline([r for r in rows["evaluation"] if r["status"] == "ok"]).items():
        if c >= 800:
            out.append(f"- XL memory evaluation >= 300x stride-1 at C={c}: {'met' if ratio >= 300 else 'not met'} "
                       f"({ratio:.0f}x)")  # fmt: skip
    for r in rows["training"]:
        paired = r.get("paired") or r.get("vs_reference")  # paired: None when no repeat has both runs
        if r["status"] == "ok" and r["case"] == "fairseq" and not r.get("reference"):
            out.append(f"- efficient_lm full trains at >= 1.0x fairseq transformer_lm's tokens/s: "
                       f"{'met' if paired >= 1.0 else 'not met'} ({paired:.2f}x paired)")  # fmt: skip
        if r["status"] == "ok" and r["case"] == "xl" and r.get("mem_len") == 0 and not r.get("reference"):
            out.append(f"- xl_small (memory off) trains at >= 0.8x full_small's tokens/s at T={r['segment']}: "
                       f"{'met' if paired >= 0.8 else 'not met'} ({paired:.2f}x paired)")  # fmt: skip
    return out


def summarize(rows: Dict[str, List[Dict]], meta: Dict, a, seconds: Optional[float]) -> str:
    parts = [f"# Benchmark suite, {meta['date']}", "",
             f"Machine: {meta['machine']}, device {a.device}, {a.threads} thread(s) per case; versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
             + (f"; total {seconds / 60:.1f} min." if seconds is not None else "."),
             ""]  # fmt: skip
    if rows["layer"]:
        parts += [f"## One attention layer, forward + backward (D={a.dim}, {a.heads} heads, batch 1)", "",
                  layer_table(rows["layer"]), ""]  # fmt: skip
    if rows["generation"]:
        parts += ["## Generation (fairseq SequenceGenerator, sampling)", "",
                  "| mechanism | tokens | tokens/s | ms/token early | ms/token late | late / early |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows["generation"]:
            if r["status"] == "ok":
                parts.append(f"| {label(r)} | {r['generated']} | {r['tokens_per_s']:.1f} | {r['early_ms']:.2f} | "
                             f"{r['late_ms']:.2f} | {r['late_over_early']:.2f} |")  # fmt: skip
            else:
                parts.append(f"| {label(r)} | {r['status']}: {r.get('error', '')} | | | | |")
        parts.append("")
    if rows.get("mechanisms"):
        parts += ["## Mechanisms, each against its own alternative", "", *mechanisms.tables(rows["mechanisms"])]
    if rows.get("training"):
        parts += ["## Training tokens/s through fairseq-train (vs the reference of each case: fairseq's "
                  "transformer_lm, full_small)", "", training.table(rows["training"]), ""]  # fmt: skip
    if rows["evaluation"]:
        ok = [r for r in rows["evaluation"] if r["status"] == "ok"]
        head = "; ".join(f"{ratio:,.0f}x at C={c}" for c, ratio in evaluation.headline(ok).items())
        parts += ["## Evaluation: fairseq-eval-lm with memory vs stride-1 sliding windows "
                  f"(memory / stride 1, fastest of each: {head or 'not measured'})", "",
                  evaluation.table(rows["evaluation"]), ""]  # fmt: skip
    if rows["quality"]:
        parts += quality_tables(rows["quality"], a)
    if rows["gpu"]:
        parts += ["## GPU: bf16 training MFU", ""]
        for r in rows["gpu"]:
            if r["status"] == "ok":
                parts.append(f"- {r['label']}: {r['tokens_per_s']:,.0f} tokens/s, {r['model_tflops']:.1f} TFLOP/s, "
                             f"MFU {100 * r['mfu']:.1f}% of a measured {r['peak_tflops']:.0f} TFLOP/s bf16 matmul")  # fmt: skip
            else:
                parts.append(f"- {r.get('label', 'gpu')}: {r['status']} ({r.get('error', '')})")
        parts.append("")
    parts += ["## Goals", "", *goals(rows), ""]
    return "\n".join(parts)

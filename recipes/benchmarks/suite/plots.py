"""Figures of the suite (matplotlib, Agg backend)."""

import logging
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search logs at DEBUG otherwise


def label(row: Dict) -> str:
    name = row.get("peer") or row["attention"]
    return f"{name} ({row['label']})" if row.get("label") else name


def layer_scaling(rows: List[Dict], png: Path) -> None:
    """Time and peak memory vs N, log-log, one line per mechanism/variant (peers dashed)."""
    series = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            series[label(r)].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: r["N"])
        style = "--" if points[0].get("peer") else "-"
        n = [p["N"] for p in points]
        axes[0].plot(n, [p["time_ms"] for p in points], style, marker="o", label=name)
        axes[1].plot(n, [max(p["peak_mb"], 1e-3) for p in points], style, marker="o", label=name)
    for ax, title in zip(axes, ("forward + backward time (ms)", "peak memory (MB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def generation_profile(rows: List[Dict], png: Path, window: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["status"] == "ok":
            x = [window * (i + 0.5) for i in range(len(r["profile_ms"]))]
            ax.plot(x, r["profile_ms"], label=label(r))
    ax.set(xlabel="position", ylabel="ms per generated token", title="generation (fairseq SequenceGenerator)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def quality_vs_speed(rows: List[Dict], png: Path) -> None:
    """Long Range Arena's figure for autoregressive LM: quality vs training speed, marker area = memory;
    one panel per dataset."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("test") is not None and r.get("tokens_per_s")]
    datasets = list(dict.fromkeys(r.get("dataset", "") for r in ok)) or [""]
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in ok if r.get("dataset", "") == dataset]
        if mine:
            biggest = max(r.get("peak_train_mb") or 1 for r in mine)
            for r in mine:
                size = 60 + 900 * (r.get("peak_train_mb") or 0) / biggest
                ax.scatter(r["tokens_per_s"], r["test"], s=size, alpha=0.5)
                ax.annotate(r["preset"], (r["tokens_per_s"], r["test"]), fontsize=8, ha="center", va="center")
            ax.set_ylabel(f"test {mine[0]['metric']} (lower is better)")
        ax.set(xlabel="training tokens/s (higher is better)", title=f"{dataset}: quality vs speed (area: peak memory)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

"""Side by side: the soaks of several models (``recipes.reliability.soak`` output directories) as one
markdown table and one figure (RSS, loss and tokens/s against updates, one line per model).

    python -m recipes.reliability.soak_report runs/reliability/soak/*-20000 --png docs/reliability/soaks.png
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

COLUMNS = {  # summary.json key -> column header
    "updates": "updates",
    "wall_minutes": "wall min",
    "rss_mb_after_warmup": "RSS after warm-up MB",
    "rss_mb_end": "RSS at end MB",
    "rss_slope_mb_per_1k_updates_second_half": "RSS slope, 2nd half, MB / 1k updates",
    "non_finite_losses": "non-finite losses",
    "loss_first": "loss first",
    "loss_end": "loss end",
    "wps_first_fifth": "tokens/s 1st fifth",
    "wps_last_fifth": "tokens/s last fifth",
    "cpu_ms_per_update_first_fifth": "CPU ms / update 1st fifth",
    "cpu_ms_per_update_last_fifth": "CPU ms / update last fifth",
}


def load(run_dir: Path) -> Dict:
    summary, records = run_dir / "summary.json", run_dir / "soak.jsonl"
    if not summary.exists() or not records.exists():
        sys.exit(f"error: {run_dir} has no summary.json / soak.jsonl: is it a finished soak directory?")
    return {
        "summary": json.loads(summary.read_text()),
        "records": [json.loads(line) for line in records.read_text().splitlines() if line.strip()],
    }


def table(runs: List[Dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS.values()) + " |", "|---" + "|---:" * len(COLUMNS) + "|"]
    for run in runs:
        s = run["summary"]
        lines.append(f"| {s['arch']} | " + " | ".join(str(s.get(key, "–")) for key in COLUMNS) + " |")
    return "\n".join(lines)


def plot(runs: List[Dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for run in runs:
        updates = [r["update"] for r in run["records"]]
        for ax, key in zip(axes, ("rss_mb", "loss", "wps")):
            ax.plot(updates, [r[key] for r in run["records"]], lw=1, label=run["summary"]["arch"])
    for ax, label in zip(axes, ("RSS (MB)", "train loss (bits/char)", "tokens/s")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.25 * max(r["rss_mb"] for run in runs for r in run["records"]))
    axes[0].legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("updates")
    axes[0].set_title("long-run soaks on PTB characters, CPU, 1 thread each")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="soak output directories")
    parser.add_argument("--png", type=Path, help="write the figure here")
    args = parser.parse_args(argv)
    runs = [load(run_dir) for run_dir in args.runs]
    print(table(runs))
    if args.png:
        plot(runs, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()

"""Results of an experiment's runs: a markdown table and loss curves.

    python -m recipes.report runs/xl_memory_ptb_cpu [more run dirs ...] [--out DIR] [--title TEXT]
        [--label RUN_DIR TEXT ...]

(several directories: one table and one set of figures, e.g. a study next to the baseline runs of another,
in the order given; ``--label`` names a run in the figures, e.g. the other study's baseline run by the
setting it stands for: ``--label runs/study_linear_vs_full_ptb_words/seed=1 "4 heads"``)

Reads every run directory below the given one (``train.log`` in fairseq's JSON log format, ``run.json``,
``eval.json``; written by ``python -m slurm.launch``) and writes

- ``results.md``: run, swept values, parameters, best validation and test metric, median training
  tokens/s, training time. The metric is named by the data's unit, as the criterion logs it: ``bpb``
  (bytes), ``bpc`` (characters) = the base-2 loss; ``ppl`` (words, subwords) = 2^loss;
- ``loss_vs_updates.png`` and ``loss_vs_wall.png``: train and valid loss (bits per token) of every
  run, one colour per run labelled by the values its sweep varied, one panel per dataset, stacked.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from recipes import results


@dataclass
class RunResult:
    dir: Path
    log: results.RunLog
    swept: Dict[str, object] = field(default_factory=dict)
    dataset: str = "?"
    evaluation: Optional[dict] = None
    given_label: Optional[str] = None  # --label: the figures' name for this run

    @property
    def metric(self) -> str:
        return (self.evaluation or {}).get("metric") or self.log.metric

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.swept.items()) or self.log.name

    def best_valid(self) -> Optional[float]:
        values = [r[self.metric] for r in self.log.valid if self.metric in r]
        return min(values) if values else None

    def train_seconds(self) -> Optional[float]:
        walls = [r["wall"] for r in self.log.train if "wall" in r]
        return max(walls) if walls else None


def natural_key(path: Path) -> list:
    """Sort run directories by their numbers' values: ``tokens-per-sample=32`` before ``tokens-per-sample=128``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> List[RunResult]:
    out = []
    for train_log in sorted(root.rglob("train.log"), key=natural_key):
        run_dir = train_log.parent
        saved = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        name = f"{saved['experiment']}/{saved['name']}" if saved else str(run_dir.relative_to(root))
        evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else None
        out.append(RunResult(run_dir, results.parse_log(train_log, name), saved.get("swept") or {},
                             Path(saved["data"]).name if saved.get("data") else "?", evaluation))  # fmt: skip
    return out


def _number(value: Optional[float], metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f} {metric}" if metric == "ppl" else f"{value:.4f} {metric}"


def table(runs: List[RunResult]) -> str:
    lines = ["| run | swept | params | best valid | test | train tokens/s | train time |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        wps, seconds = run.log.median_wps(), run.train_seconds()
        test = run.evaluation["value"] if run.evaluation else None
        subset = run.evaluation.get("subset", "test") if run.evaluation else "test"
        cells = [
            run.log.name,
            ", ".join(f"{k}={v}" for k, v in run.swept.items()) or "-",
            f"{run.log.params:,}" if run.log.params else "-",
            _number(run.best_valid(), run.metric),
            _number(test, run.metric) + ("" if subset == "test" or test is None else f" ({subset})"),
            f"{wps:,.0f}" if wps else "-",
            f"{seconds:,.0f} s" if seconds is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure_labels(runs: List[RunResult]) -> List[str]:
    """Short legend labels: only the swept options whose values differ between these runs (an experiment by
    its name alone), e.g. ``compression-rate=2, seed=1`` or ``study_full_vs_xl_ptb_words, arch=xl_small``."""
    keys = [k for k in dict.fromkeys(k for run in runs for k in run.swept)
            if len({str(run.swept.get(k)) for run in runs}) > 1]  # fmt: skip
    names = sorted({str(run.swept["experiment"]) for run in runs if "experiment" in run.swept})
    head = os.path.commonprefix(names).rpartition("_")[0]  # study_x_ptb_words, study_y_ptb_words -> x, y
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1].partition("_")[2]
    short = {n: n[len(head) + 1 if head else 0 : len(n) - len(tail) - 1 if tail else len(n)] or n for n in names}
    labels = []
    for run in runs:
        parts = [
            short[str(run.swept[k])] if k == "experiment" else f"{k}={run.swept[k]}" for k in keys if k in run.swept
        ]
        labels.append(getattr(run, "given_label", None) or ", ".join(parts) or run.label)
    return labels


def plot(runs: List[RunResult], png: Path, x: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({run.dataset for run in runs})
    # one panel per dataset, stacked (each keeps the width of a single-dataset figure and its legend on the right)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, 4.8 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        group = [run for run in runs if run.dataset == dataset]
        results.draw_curves(ax, [run.log for run in group], x=x, labels=figure_labels(group))
        metric = group[0].metric
        unit = {"bpb": "bits per byte", "bpc": "bits per character"}.get(metric, "bits per token; ppl = 2^loss")
        ax.set_ylabel(f"cross entropy ({unit}, log scale)")
        ax.set_title(dataset, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_bars(runs: List[RunResult], png: Path, title: str = "") -> None:
    """Best validation and test number of every run as horizontal bars (one number per setting reads better
    than overlapping curves when the curves end close together), in the data's metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = figure_labels(runs)
    valid = [run.best_valid() or 0.0 for run in runs]
    test = [(run.evaluation or {}).get("value") or 0.0 for run in runs]
    fig, ax = plt.subplots(figsize=(13, 0.5 * len(runs) + 1.5))
    rows = range(len(runs))
    ax.barh([r + 0.2 for r in rows], valid, height=0.4, color="C0", label="best valid")
    ax.barh([r - 0.2 for r in rows], test, height=0.4, color="C1", label="test")
    for r, (v, t) in enumerate(zip(valid, test)):
        for y, value in ((r + 0.2, v), (r - 0.2, t)):
            if value:
                ax.text(
                    value, y, f" {value:.2f}" if runs[0].metric == "ppl" else f" {value:.4f}", va="center", fontsize=7
                )
    ax.set_yticks(list(rows), labels, fontsize=7)
    ax.invert_yaxis()
    low = min(x for x in valid + test if x) if any(valid + test) else 0.0
    ax.set_xlim(left=low * 0.9)  # the differences are at the end of the bars
    ax.set_xlabel(runs[0].metric)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", nargs="+", help="directories of runs (searched recursively for train.log)")
    parser.add_argument("--out", help="where to write results.md and the PNGs (default: the first runs_dir)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--label", nargs=2, action="append", default=[], metavar=("RUN_DIR", "TEXT"),
                        help="name the run in RUN_DIR so in the figures (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    roots = [Path(d) for d in args.runs_dir]
    runs = []
    for root in roots:
        found = find_runs(root) if root.is_dir() else []
        if not found:
            sys.exit(f"error: no runs (train.log files) under {root}")
        runs += found
    if len(roots) > 1:  # several experiments side by side: each run says which one it belongs to
        for run in runs:
            run.swept = {"experiment": run.log.name.split("/")[0], **run.swept}
    by_dir = {run.dir.resolve(): run for run in runs}
    for run_dir, text in args.label:
        if Path(run_dir).resolve() not in by_dir:
            sys.exit(f"error: --label {run_dir}: not one of the runs reported (a directory holding a train.log)")
        by_dir[Path(run_dir).resolve()].given_label = text
    out = Path(args.out) if args.out else roots[0]
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "results.md").write_text(text + "\n")
    for x, name in (("num_updates", "loss_vs_updates.png"), ("wall", "loss_vs_wall.png")):
        plot(runs, out / name, x, args.title)
    plot_bars(runs, out / "best.png", args.title)
    print(text + f"\n\nwrote {out / 'results.md'}, {out / 'loss_vs_updates.png'}, {out / 'loss_vs_wall.png'}, "
          f"{out / 'best.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

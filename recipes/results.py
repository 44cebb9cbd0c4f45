"""Read fairseq logs, tabulate results, plot loss curves (used by the quickstart and the experiments).

fairseq's ``--log-format simple`` lines are parsed, e.g.::

    ... | train_inner | epoch 001:    100 / 1954 loss=2.133, nll_loss=2.133, bpb=2.1329, wps=409.1, ...
    ... | valid | epoch 001 | valid on 'valid' subset | loss 3.138 | nll_loss 3.138 | bpb 3.1377 | ... | num_updates 60
    ... | fairseq_cli.train | num. shared model params: 1,234 (num. trained: 1,234)
    INFO:fairseq_cli.eval_lm:Loss (base 2): 3.1377, Perplexity: 8.80

and so are ``--log-format json`` lines (what ``slurm.launch`` runs write), e.g.::

    ... | INFO | train_inner | {"epoch": 1, "loss": "4.665", "bpb": "4.6647", "wps": "1181.5", "num_updates": "15", "wall": "7"}
    ... | INFO | valid | {"epoch": 1, "valid_loss": "4.913", "valid_bpb": "4.913", "valid_num_updates": "10"}

A log that was resumed repeats the updates done after the last checkpoint; the later entry is kept. Its
``wall`` continues across the restart since ``plugins/wall_clock.py``; in a log written before it, fairseq
logged ``wall`` 0 after every resume, and the wall time of those lines is rebuilt from the lines' timestamps
(``continuous_wall``).
"""

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

METRICS = ("bpb", "bpc", "ppl")
_NUMBER = r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?"


@dataclass
class RunLog:
    name: str
    params: Optional[int] = None
    train: List[Dict[str, float]] = field(default_factory=list)  # one dict per train_inner line
    valid: List[Dict[str, float]] = field(default_factory=list)  # one dict per validation
    eval_loss: Optional[float] = None  # fairseq-eval-lm "Loss (base 2)"

    @property
    def metric(self) -> str:
        row = self.valid[-1] if self.valid else (self.train[-1] if self.train else {})
        return next((m for m in METRICS if m in row), "loss")

    def median_wps(self, skip_first: int = 1) -> Optional[float]:
        wps = sorted(r["wps"] for r in self.train[skip_first:] if "wps" in r) or sorted(
            r["wps"] for r in self.train if "wps" in r
        )
        return wps[len(wps) // 2] if wps else None


def _pairs(text: str, sep: str) -> Dict[str, float]:
    out = {}
    for key, value in re.findall(rf"([a-z_0-9]+){sep}({_NUMBER})(?=[,|\s]|$)", text):
        out[key] = float(value)
    return out


_JSON_LINE = re.compile(
    r"(?:\| |INFO:)(train_inner|valid)(?: \| |:)(\{.*\})\s*$"
)  # fairseq's or Python's default format


def _json_stats(text: str, prefix: str = "") -> Dict[str, float]:
    out = {}
    for key, value in json.loads(text).items():
        try:
            out[key[len(prefix) :] if prefix and key.startswith(prefix) else key] = float(value)
        except (TypeError, ValueError):
            pass
    return out


def _last_per_update(rows: List[Dict[str, float]]) -> List[Dict[str, float]]:
    """One entry per update, the last one logged (a resumed run repeats the updates after its checkpoint)."""
    by_update = {}
    for row in rows:
        by_update[row.get("num_updates", len(by_update))] = row
    return [by_update[k] for k in sorted(by_update)]


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \|")


def continuous_wall(rows: List[Dict[str, float]]) -> None:
    """Rebuild ``wall`` after a restart that set it back (in place; rows in log order, before de-duplication).

    A resumed run repeats the updates after its checkpoint, so its first line's wall should be at least the wall
    logged before it at an earlier update. fairseq 0.12.3 without ``plugins/wall_clock.py`` logs 0 instead on
    every line after a resume: such a line gets the wall at the last earlier update, plus the training time
    of its own interval (``train_wall``) for the first line, plus the time since that first line (from the
    lines' timestamps, ``_time``) for the next ones. The time between the kill and the restart is not counted."""
    segment_base = segment_start = None
    for i, row in enumerate(rows):
        if "wall" not in row:
            continue
        earlier = [r for r in rows[:i] if "wall" in r and r.get("num_updates", 0) < row.get("num_updates", 0)]
        base = earlier[-1]["wall"] if earlier else 0.0
        if i and "wall" in rows[i - 1] and row["wall"] < rows[i - 1]["wall"] and row["wall"] < base:
            segment_base, segment_start = base + row.get("train_wall", 0.0), row.get("_time")  # a reset: rebuild
        if segment_base is not None:
            if row["wall"] == 0 and segment_start is not None and "_time" in row:
                row["wall"] = segment_base + row["_time"] - segment_start
            else:  # a wall that restarted from 0 but counts (no timestamps needed)
                row["wall"] = segment_base + row["wall"]


def parse_log(path, name: Optional[str] = None) -> RunLog:
    run = RunLog(name or Path(path).stem)
    for line in Path(path).read_text(errors="replace").splitlines():
        json_line = _JSON_LINE.search(line)
        if json_line and json_line.group(1) == "train_inner":
            run.train.append(_json_stats(json_line.group(2)))
            stamp = _TIMESTAMP.match(line)
            if stamp:
                run.train[-1]["_time"] = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        elif json_line and json_line.group(1) == "valid":
            run.valid.append(_json_stats(json_line.group(2), prefix="valid_"))
        elif "| train_inner |" in line:
            run.train.append(_pairs(line.split("| train_inner |", 1)[1], "="))
        elif "| valid |" in line and "valid on" in line:
            run.valid.append(_pairs(line.split("subset", 1)[1], " "))
        elif "num. shared model params:" in line:
            run.params = int(re.search(r"params: ([\d,]+)", line).group(1).replace(",", ""))
        elif "Loss (base 2):" in line:
            run.eval_loss = float(re.search(rf"Loss \(base 2\): ({_NUMBER})", line).group(1))
    continuous_wall(run.train)
    run.train, run.valid = _last_per_update(run.train), _last_per_update(run.valid)
    return run


def results_table(runs: List[RunLog], eval_label: str = "test") -> str:
    """Markdown table: model, params, final valid metric, eval-lm metric, median train tokens/s."""
    lines = [
        f"| model | params | valid {runs[0].metric} | {eval_label} {runs[0].metric} | train tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        valid = run.valid[-1].get(run.metric) if run.valid else None
        evals = run.eval_loss if run.metric != "ppl" or run.eval_loss is None else 2**run.eval_loss
        cells = [
            run.name,
            f"{run.params:,}" if run.params else "?",
            f"{valid:.4f}" if valid is not None else "?",
            f"{evals:.4f}" if evals is not None else "?",
            f"{run.median_wps():,.0f}" if run.median_wps() else "?",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


X_LABELS = {"num_updates": "updates", "wall": "wall time (s)"}


def cross_entropy(record: dict) -> float:
    """The language model's loss of a log record, in bits per token: ``nll_loss`` where the criterion logs it
    (``aux_cross_entropy``'s training ``loss`` adds auxiliary terms such as a compression loss), else ``loss``."""
    return record.get("nll_loss", record["loss"])


def draw_curves(ax, runs: List[RunLog], x: str = "num_updates", labels: Optional[List[str]] = None) -> None:
    """Train (thin) and valid (markers) cross entropy in bits per token against ``x`` (updates or wall
    seconds), one colour per run, on a log scale (early losses are 10x the final ones; the gaps are at the end)."""
    import matplotlib.ticker

    for i, run in enumerate(runs):
        color, label = f"C{i % 10}", (labels[i] if labels else run.name)
        t = [r for r in run.train if x in r and "loss" in r]
        ax.plot([r[x] for r in t], [cross_entropy(r) for r in t], color=color, lw=1, alpha=0.7, label=f"{label} train")
        v = [r for r in run.valid if "loss" in r and "num_updates" in r]
        if x != "num_updates":  # a validation has no wall time: use that of the last training entry before it
            v = [{**r, x: max((e[x] for e in t if e.get("num_updates", 0) <= r["num_updates"]), default=0.0)} for r in v]  # fmt: skip
        ax.plot([r[x] for r in v], [cross_entropy(r) for r in v], color=color, marker="o", lw=2, label=f"{label} valid")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)


def plot_curves(runs: List[RunLog], png, title: str = "") -> None:
    """Train (thin) and valid (markers) loss in bits per token against updates, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_curves(ax, runs)
    ax.set_ylabel("loss (bits per token, log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

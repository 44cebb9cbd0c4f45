"""Read fairseq logs, tabulate results, plot loss curves (used by the quickstart and the experiments).

fairseq's ``--log-format simple`` lines are parsed, e.g.::

    ... | train_inner | epoch 001:    100 / 1954 loss=2.133, nll_loss=2.133, bpb=2.1329, wps=409.1, ...
    ... | valid | epoch 001 | valid on 'valid' subset | loss 3.138 | nll_loss 3.138 | bpb 3.1377 | ... | num_updates 60
    ... | fairseq_cli.train | num. shared model params: 1,234 (num. trained: 1,234)
    INFO:fairseq_cli.eval_lm:Loss (base 2): 3.1377, Perplexity: 8.80
"""

import re
from dataclasses import dataclass, field
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


def parse_log(path, name: Optional[str] = None) -> RunLog:
    run = RunLog(name or Path(path).stem)
    for line in Path(path).read_text(errors="replace").splitlines():
        if "| train_inner |" in line:
            run.train.append(_pairs(line.split("| train_inner |", 1)[1], "="))
        elif "| valid |" in line and "valid on" in line:
            run.valid.append(_pairs(line.split("subset", 1)[1], " "))
        elif "num. shared model params:" in line:
            run.params = int(re.search(r"params: ([\d,]+)", line).group(1).replace(",", ""))
        elif "Loss (base 2):" in line:
            run.eval_loss = float(re.search(rf"Loss \(base 2\): ({_NUMBER})", line).group(1))
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


def plot_curves(runs: List[RunLog], png, title: str = "") -> None:
    """Train (thin) and valid (markers) loss in bits per token against updates, one colour per run."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        t = [r for r in run.train if "num_updates" in r and "loss" in r]
        v = [r for r in run.valid if "num_updates" in r and "loss" in r]
        ax.plot([r["num_updates"] for r in t], [r["loss"] for r in t], color=color, lw=1, alpha=0.7,
                label=f"{run.name} train")  # fmt: skip
        ax.plot([r["num_updates"] for r in v], [r["loss"] for r in v], color=color, marker="o", lw=2,
                label=f"{run.name} valid")  # fmt: skip
    ax.set_xlabel("updates")
    ax.set_ylabel("loss (bits per token, log scale)")
    ax.set_yscale("log")  # early losses are 10x the final ones; the gap between models is at the end
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

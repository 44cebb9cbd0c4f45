"""Quality at equal budget: every ``*_tiny`` preset trained on the same real data for the same tokens.

Each preset runs the real ``fairseq-train`` (``--task segment_lm``, same segment length, batch, optimizer
and number of updates for all, so every model sees the same tokens), then ``fairseq-eval-lm`` on the test
split; the row holds valid and test bits per character (PTB characters) or perplexity (WikiText-2
words), parameters, train tokens/s (fairseq's ``wps``, median interval after the first) and the peak
resident memory of the training process (``wait4`` rusage). Parameter counts are reported, not forced:
presets that differ by more than 10% from ``full_tiny`` are flagged (``params_vs_full``).
"""

import lzma
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from recipes.results import parse_log

from .isolate import REPO

BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared" / "data"


def tiny_presets() -> List[str]:
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "efficient_lm" and a.endswith("_tiny"))


def prepare_ptb_chars(dest: Path) -> Path:
    """PTB (Mikolov's text, ../shared/data) at the character level, binarized once."""
    out = dest / "ptb-chars"
    if (out / "dict.txt").exists():
        return out
    raw = dest / "ptb-raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        source = SHARED / "ptb" / f"ptb.{split}.txt.xz"
        if not source.exists():
            raise SystemExit(f"error: {source} is missing: the quality section needs ../shared/data (see README)")
        (raw / f"{split}.txt").write_bytes(lzma.decompress(source.read_bytes()))
    splits = [a for s in ("train", "valid", "test") for a in (f"--{s}", raw / f"{s}.txt")]
    cmd = [sys.executable, "-m", "preprocess.text", *splits, "--level", "char", "--out", out]
    subprocess.run(list(map(str, cmd)), check=True, cwd=REPO, capture_output=True)
    return out


def train_and_eval(preset: str, data: Path, run_dir: Path, a, env: Dict[str, str]) -> Dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [str(data), "--user-dir", str(REPO / "plugins"), "--task", "segment_lm", "--cpu", "--num-workers", "0"]
    train = [
        str(BIN / "fairseq-train"), *common, "--arch", preset, "--criterion", "aux_cross_entropy",
        "--tokens-per-sample", str(a.quality_segment), "--batch-size", str(a.quality_batch),
        "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "cosine", "--warmup-updates", "20",
        "--clip-norm", "0.25", "--max-update", str(a.quality_updates), "--seed", "1",
        "--log-format", "simple", "--log-interval", "20", "--save-dir", str(run_dir), "--no-epoch-checkpoints",
    ]  # fmt: skip
    row: Dict = {"preset": preset, "command": " ".join(train)}
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(train, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    row["train_s"] = round(time.time() - start, 1)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        return {**row, "status": "error", "error": (tail or ["?"])[0][:300]}
    row["peak_train_mb"] = usage.ru_maxrss / 1024
    evaluate = [str(BIN / "fairseq-eval-lm"), *common, "--path", str(run_dir / "checkpoint_last.pt"),
                "--gen-subset", "test", "--tokens-per-sample", str(a.quality_segment), "--batch-size", "1"]  # fmt: skip
    with open(run_dir / "train.log", "a") as log:
        subprocess.run(evaluate, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
    run = parse_log(run_dir / "train.log", preset)
    metric = run.metric
    row.update(status="ok", params=run.params, metric=metric, tokens_per_s=run.median_wps(),
               valid=run.valid[-1].get(metric) if run.valid else None)  # fmt: skip
    if run.eval_loss is not None:
        row["test"] = run.eval_loss if metric in ("bpc", "bpb") else 2**run.eval_loss
    return row


def add_param_ratios(rows: List[Dict]) -> None:
    ref = next((r["params"] for r in rows if r["preset"] == "full_tiny" and r.get("params")), None)
    for r in rows:
        if ref and r.get("params"):
            r["params_vs_full"] = r["params"] / ref

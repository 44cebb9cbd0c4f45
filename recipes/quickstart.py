"""The quickstart: why memory matters, in under 10 minutes on 2 CPU cores.

1. generates the embedded ticket-log corpus (``recipes/corpus.py``) and binarizes it at byte level;
2. trains, with the real ``fairseq-train --user-dir plugins``, the same small model twice on 64-byte
   segments, side by side: full attention without memory (it sees at most 64 bytes), and
   Transformer-XL (relative attention) with a 192-position memory of the previous segments;
3. evaluates both checkpoints on the test split with ``fairseq-eval-lm``;
4. prints a results table and saves the train/valid loss curves as a PNG.

Run it as ``bash recipes/quickstart.sh`` (installs first). Runs that already finished are reused
(fairseq resumes from ``checkpoint_last.pt`` and stops at once), never overwritten.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from recipes import results

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# name -> arguments on top of COMMON; both models are one flag set apart.
MODELS = {
    "full-64": ["--pos-emb", "sinusoidal"],  # context: the current 64-byte segment only
    # + Transformer-XL: relative positions and the previous 192 positions as memory (detached)
    "xl-64+mem192": ["--attention", "relative", "--pos-emb", "relative", "--mem-len", "192"],
}
COMMON = [
    "--task", "segment_lm", "--arch", "full_small", "--criterion", "aux_cross_entropy",
    "--tokens-per-sample", "64", "--batch-size", "16",
    "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
    "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
    "--dropout", "0.0",  # 600 updates see 0.6M of the 2M training bytes: nothing to overfit
    "--seed", "1", "--cpu", "--num-workers", "0",
    "--log-format", "simple", "--log-interval", "50",
    "--no-epoch-checkpoints", "--save-interval-updates", "1000000",
]  # fmt: skip


def run_all(jobs) -> None:
    """Run fairseq commands side by side (one thread each: on 2 cores two single-threaded processes
    beat two-threaded ones taking turns), showing their output prefixed by the run name and keeping a
    copy of each in its log. ``jobs``: [(name, command, log path)]."""

    def copy_output(name, proc, log):
        with open(log, "a") as f:
            for line in proc.stdout:
                f.write(line)
                if not ("Warning" in line or "warnings.warn" in line or line.startswith("  ")):
                    sys.stdout.write(f"[{name}] {line}")  # fairseq's deprecation noise is only logged

    running = []
    for name, cmd, log in jobs:
        print(f"[{name}] $", " ".join(str(c) for c in cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=copy_output, args=(name, proc, log))
        reader.start()
        running.append((name, proc, reader, log))
    for name, proc, reader, log in running:
        reader.join()
        if proc.wait() != 0:
            sys.exit(f"error: {name} failed (exit {proc.returncode}); see {log}")


def prepare_data(data_bin: Path, scale: float) -> None:
    if (data_bin / "metadata.json").exists():
        return
    with tempfile.TemporaryDirectory() as raw:  # the text is regenerated identically whenever needed
        corpus = [sys.executable, "-m", "recipes.corpus", "--out", raw, "--scale", str(scale)]
        subprocess.run(corpus, check=True, cwd=ROOT)
        splits = [a for s in ("train", "valid", "test") for a in (f"--{s}", f"{raw}/{s}.txt")]
        cmd = [sys.executable, "-m", "preprocess.text", *splits, "--level", "byte", "--binarizer", "fast"]
        subprocess.run([*cmd, "--name", "ticket-log", "--out", str(data_bin)], check=True, cwd=ROOT)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "quickstart"), help="run directory")
    parser.add_argument("--data", default=str(ROOT / "data-bin" / "ticket-log"), help="binarized corpus")
    parser.add_argument("--max-update", type=int, default=600, help="updates per model")
    parser.add_argument("--corpus-scale", type=float, default=1.0, help="corpus size factor (tests use 0.05)")
    args = parser.parse_args(argv)
    out, data_bin = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(data_bin, args.corpus_scale)

    train, evaluate = [], []
    for name, extra in MODELS.items():
        save_dir = out / name
        save_dir.mkdir(exist_ok=True)
        train.append((name, [BIN / "fairseq-train", data_bin, "--user-dir", ROOT / "plugins", *COMMON, *extra,
                             "--max-update", str(args.max_update),
                             "--validate-interval-updates", str(max(args.max_update // 4, 1)),
                             "--save-dir", save_dir], save_dir / "train.log"))  # fmt: skip
        (save_dir / "eval.log").unlink(missing_ok=True)  # re-evaluating is cheap: always the current checkpoint
        evaluate.append((name, [BIN / "fairseq-eval-lm", data_bin, "--user-dir", ROOT / "plugins",
                                "--task", "segment_lm", "--path", save_dir / "checkpoint_best.pt",
                                "--gen-subset", "test", "--tokens-per-sample", "64", "--batch-size", "16",
                                "--cpu"], save_dir / "eval.log"))  # fmt: skip
    run_all(train)
    run_all(evaluate)
    logs = []
    for name in MODELS:
        log = results.parse_log(out / name / "train.log", name)
        log.eval_loss = results.parse_log(out / name / "eval.log").eval_loss
        logs.append(log)

    table = results.results_table(logs, eval_label="test")
    png = out / "loss_curves.png"
    results.plot_curves(
        logs, png, title="ticket-log, byte level: 64-byte segments, full attention vs Transformer-XL memory"
    )
    (out / "results.md").write_text(table + "\n")
    print("\n" + table + f"\n\nloss curves: {png}\ntable: {out / 'results.md'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the runs go side by side, one core each
    shutil.which("fairseq-train", path=str(BIN)) or sys.exit("error: fairseq is not installed: run bash install.sh")
    main()

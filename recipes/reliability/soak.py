"""Long-run health soak: does a memory model train for many updates with flat memory, finite loss and
steady speed?

Trains a ``*_tiny`` memory model (default ``xl_tiny``) with the real ``fairseq-train`` on PTB characters
(``../shared/data/ptb``, binarized at the char level on first use) on CPU, validating and checkpointing
every ``--save-every`` updates (so the checkpoint code runs throughout, as in a real run). At every log
interval it records the training process's resident memory (``VmRSS`` from ``/proc``), the loss and
fairseq's tokens/s, then writes:

- ``<out>/soak.jsonl``: one record per interval (update, seconds, rss_mb, loss, wps, cpu_s: the training
  process's user + system CPU seconds so far);
- ``<out>/soak.png``: RSS, loss and tokens/s against updates;
- ``<out>/summary.json`` and a table on stdout: RSS after warm-up vs at the end and its slope over the
  second half (MB per 1k updates; the segment memory is detached, so there is no graph growing across
  segments and the slope should be ~0), non-finite losses, tokens/s of the first vs the last fifth, and CPU
  milliseconds per update of the first vs the last fifth (the drift measure that other jobs on a shared
  machine do not distort, as they do tokens/s).

    python -m recipes.reliability.soak --updates 20000                 # the full soak (hours on 1 core)
    python -m recipes.reliability.soak --updates 2000 --arch full_tiny # a short one
"""

import argparse
import json
import lzma
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PTB = ROOT.parent / "shared" / "data" / "ptb"


def ptb_chars(data_bin: Path) -> Path:
    """PTB (Mikolov's split) as characters, binarized by preprocess.text once."""
    if (data_bin / "dict.txt").exists():
        return data_bin
    if not PTB.is_dir():
        sys.exit(f"error: {PTB} not found: pass --data with a binarized corpus")
    with tempfile.TemporaryDirectory() as tmp:
        splits = []
        for split in ("train", "valid", "test"):
            text = Path(tmp) / f"{split}.txt"
            text.write_bytes(lzma.decompress((PTB / f"ptb.{split}.txt.xz").read_bytes()))
            splits += [f"--{split}", str(text)]
        subprocess.run([sys.executable, "-m", "preprocess.text", *splits, "--level", "char", "--binarizer", "fast",
                        "--out", str(data_bin)], check=True, cwd=ROOT)  # fmt: skip
    return data_bin


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far: unlike tokens/s, not diluted by other jobs on the machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"; utime and stime are fields 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args) -> list:
    out = Path(args.out)
    save_dir = out / "checkpoints"
    shutil.rmtree(save_dir, ignore_errors=True)
    command = [
        str(Path(sys.executable).parent / "fairseq-train"), str(args.data), "--user-dir", str(ROOT / "plugins"),
        "--task", "segment_lm", "--arch", args.arch, "--criterion", "aux_cross_entropy",
        "--tokens-per-sample", str(args.tokens_per_sample), "--batch-size", str(args.batch_size),
        "--optimizer", "adam", "--lr", "0.001", "--lr-scheduler", "cosine", "--warmup-updates", "200",
        "--clip-norm", "0.25", "--max-update", str(args.updates), "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", str(args.interval), "--seed", "1",
        "--save-dir", str(save_dir), "--save-interval-updates", str(args.save_every),
        "--keep-interval-updates", "2", "--no-epoch-checkpoints", *args.fairseq_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    (out / "command.txt").write_text(" ".join(command) + "\n")
    records, start = [], time.time()
    with open(out / "train.log", "w") as log, open(out / "soak.jsonl", "w") as jsonl:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            if "| train_inner | {" not in line:
                continue
            stats = json.loads(line.split("| train_inner | ", 1)[1])
            record = {"update": int(stats["num_updates"]), "seconds": round(time.time() - start, 1),
                      "rss_mb": round(rss_mb(proc.pid), 1), "loss": float(stats["loss"]), "wps": float(stats["wps"]),
                      "cpu_s": round(cpu_seconds(proc.pid), 2)}  # fmt: skip
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            if len(records) % 10 == 0:
                print(f"update {record['update']}: loss {record['loss']:.3f}, rss {record['rss_mb']} MB, "
                      f"{record['wps']:.0f} tokens/s", flush=True)  # fmt: skip
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f"error: fairseq-train failed ({proc.returncode}); see {out / 'train.log'}")
    return records


def slope_per_1k(xs, ys) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def cpu_per_update(records: list, fifth: int) -> dict:
    """CPU milliseconds per update over the first and the last fifth of the run (after the first record)."""
    if len(records) < 3 or "cpu_s" not in records[0]:
        return {}

    def rate(a, b):
        return round(1000 * (b["cpu_s"] - a["cpu_s"]) / (b["update"] - a["update"]), 2)

    return {"cpu_ms_per_update_first_fifth": rate(records[0], records[min(fifth, len(records) - 1)]),
            "cpu_ms_per_update_last_fifth": rate(records[-fifth - 1], records[-1])}  # fmt: skip


def summarize(records: list, args) -> dict:
    n = len(records)
    warm = records[min(n - 1, max(1, n // 10))]  # after warm-up (allocator, first checkpoint, validation)
    half = records[n // 2 :]
    fifth = max(1, n // 5)
    return {
        "arch": args.arch,
        "updates": records[-1]["update"],
        "wall_minutes": round(records[-1]["seconds"] / 60, 1),
        "rss_mb_after_warmup": warm["rss_mb"],
        "rss_mb_end": records[-1]["rss_mb"],
        "rss_mb_max": max(r["rss_mb"] for r in records),
        "rss_slope_mb_per_1k_updates_second_half": round(
            slope_per_1k([r["update"] for r in half], [r["rss_mb"] for r in half]), 2
        ),  # fmt: skip
        "non_finite_losses": sum(not math.isfinite(r["loss"]) for r in records),
        "loss_first": records[0]["loss"],
        "loss_end": records[-1]["loss"],
        "wps_first_fifth": round(statistics.median(r["wps"] for r in records[1 : fifth + 1] or records), 1),
        "wps_last_fifth": round(statistics.median(r["wps"] for r in records[-fifth:]), 1),
        **cpu_per_update(records, fifth),
        "threads": args.threads,
        "load_average": os.getloadavg(),
    }


def plot(records: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [r["update"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, key, label in zip(axes, ("rss_mb", "loss", "wps"), ("RSS (MB)", "train loss (bits/char)", "tokens/s")):
        ax.plot(updates, [r[key] for r in records], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.25 * max(r["rss_mb"] for r in records))
    axes[-1].set_xlabel("updates")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="xl_tiny", help="a *_tiny preset (default xl_tiny)")
    parser.add_argument("--updates", type=int, default=20000, help="training updates (default 20000)")
    parser.add_argument("--interval", type=int, default=50, help="updates between records (default 50)")
    parser.add_argument("--save-every", type=int, default=1000, help="validate + checkpoint every N updates")
    parser.add_argument("--tokens-per-sample", type=int, default=64, help="segment length (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="streams (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads (default 1)")
    parser.add_argument("--data", type=Path, default=ROOT / "data-bin" / "ptb-chars", help="binarized corpus")
    parser.add_argument("--out", help="output directory (default runs/reliability/soak/<arch>-<updates>)")
    parser.add_argument("fairseq_args", nargs=argparse.REMAINDER, help="after --: more fairseq-train arguments")
    args = parser.parse_args(argv)
    args.fairseq_args = [a for a in args.fairseq_args if a != "--"]
    args.out = args.out or str(ROOT / "runs" / "reliability" / "soak" / f"{args.arch}-{args.updates}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.data = ptb_chars(args.data) if args.data == ROOT / "data-bin" / "ptb-chars" else args.data
    records = run(args)
    if len(records) < 3:
        sys.exit("error: fewer than 3 log intervals: raise --updates or lower --interval")
    summary = summarize(records, args)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(records, Path(args.out) / "soak.png", f"{args.arch} on PTB chars, {summary['updates']} updates, CPU")
    print("\n| metric | value |\n|---|---:|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    print(f"\nwrote {args.out}/soak.png, soak.jsonl, summary.json")


if __name__ == "__main__":
    main()

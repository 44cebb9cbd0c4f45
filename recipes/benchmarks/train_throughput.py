"""Training throughput: our ``efficient_lm --attention full`` against fairseq's own ``transformer_lm``.

What is measured
    Train tokens per second (fairseq's ``wps``: target tokens / wall time, forward + backward + Adam
    step + data loading + logging) of two models of the same size, both trained by the real
    ``fairseq-train`` CLI on the same binarized data with the same tokens per batch. The ratio
    ``ours / fairseq`` is the number to read: 1.00x means our framework costs nothing over fairseq's
    reference implementation of the same network; below 1.0x we are slower.

How
    - data: a deterministic pseudo-text corpus (a seeded Zipfian word generator, a few MB) written one
      byte per token as decimal values, binarized by ``fairseq-preprocess --only-source`` with a fixed
      256-entry byte dictionary (no ``<unk>``); or ``--data DIR``, an existing data-bin directory;
    - ours is this checkout's ``plugins/`` (``--plugins DIR``: another checkout's, e.g. a git worktree
      of an older commit), copied at the start so every repeat runs the same code even while the tree
      is being edited; the record keeps the git commit and a hash of the copied ``.py`` files;
    - runs are interleaved (ours, fairseq, ours, fairseq, ... ``--repeats`` times), each a fresh
      ``fairseq-train`` process with ``--cpu --no-save --disable-validation --max-update N
      --log-format json``, the same ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (``--threads``) and
      ``--num-workers 0`` (no data-loader process competing for the cores);
    - a run's speed is its tokens over its time across the ``train_inner`` log intervals after the
      first (the first one holds the warm-up: allocator, first-call kernels); the table reports the
      median run of each model and the ratio of the medians, and the record also keeps every run and
      the median of the paired per-repeat ratios (less sensitive to drifting machine load).

Same network on both sides (what ``transformer_lm`` does differently, and how it is neutralized)
    - sizes: ``--decoder-layers/-embed-dim/-ffn-embed-dim/-attention-heads`` given to both; relu;
      ``--dropout``, ``--attention-dropout 0``, ``--activation-dropout 0`` given to both;
    - pre-norm: ``transformer_lm`` forces ``decoder_normalize_before`` and adds a final LayerNorm; we pass
      ``--decoder-normalize-before`` to ours, which then adds its final LayerNorm too;
    - embeddings: both scale token embeddings by sqrt(D) (neither gets ``--no-scale-embedding``), both
      tie input and output embeddings (``--share-decoder-input-output-embed``), no bias on the output;
    - positions: ``transformer_lm`` defaults to sinusoidal (``--decoder-learned-pos`` off); ours gets
      ``--pos-emb sinusoidal``. Both have no position parameters. (fairseq's positions start at
      padding_idx + 1 and ours at 0: same cost, different numbers.)
    - widths: ``transformer_lm``'s ``--decoder-input-dim`` / ``--decoder-output-dim`` default to 512,
      not to the embed dim; with any other D fairseq would build a 512-wide embedding plus D x 512
      input and output projections, so both are set to D;
    - parameters: identical counts (checked from each run's ``num. shared model params`` log line);
    - attention: fairseq calls ``F.multi_head_attention_forward`` with an additive float causal mask
      and separate q/k/v weights; ours calls ``F.scaled_dot_product_attention(is_causal=True)`` with a
      fused k/v projection. That is the implementation difference being compared, not neutralized.
Unavoidable task/criterion differences (same cost per token)
    - data: fairseq ``--task language_modeling --sample-break-mode none`` (shuffled blocks of T tokens)
      vs ours ``--task segment_lm`` (B contiguous streams, in order); both feed B x T tokens, all
      targets, no padding, so ``wpb`` is B * T on both sides;
    - loss: ``cross_entropy`` (log_softmax + nll) vs ``aux_cross_entropy`` (``F.cross_entropy``, no
      auxiliary terms for full attention).

Command (from the repository root)::

    python -m recipes.benchmarks.train_throughput            # ~5 min on an idle 2-core CPU
    python -m recipes.benchmarks.train_throughput --quick    # ~1 min smoke run (1 repeat, 2 x 128)
    python -m recipes.benchmarks.train_throughput --out runs/benchmarks/train_throughput --repeats 5

Reading the ratio: > 1.0x ours is faster. On a 2-core CPU (torch 2.13) ours came out ~1.1x at the
default size: per step it runs 5 instead of 6 linear layers per attention (k and v in one matmul),
the causal SDPA kernel skips the masked half of the scores (fairseq adds a float mask, so nothing is
skipped) and it does no T x B <-> B x T layout copies (torch.profiler: ``aten::copy_`` ~4x less time).
A ratio well below 1.0x after a change to ``plugins/`` is a regression to profile
(``py-spy record -- <ours command from the record>`` or ``torch.profiler`` around a train step).
Under heavy machine load single intervals swing by up to 6x (other processes come and go; the load
average is printed under the table): raise ``--repeats`` and look at the paired ratio too.

Output: a markdown table (model, parameters, median tokens/s, ratio) on stdout and in
``<out>/<stamp>.md``, one JSON line appended to ``<out>/results.jsonl`` (settings, exact commands,
every run's speed, torch/fairseq versions, threads, date), and every run's log in ``<out>/<stamp>/``.
Machine load drifts: compare ratios measured in the same run, not tokens/s across runs.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # fairseq's console scripts live next to the interpreter
DEFAULT_OUT = "runs/benchmarks/train_throughput"

SIZES = {  # flag: (default, --quick)
    "layers": (4, 2),
    "embed_dim": (256, 128),
    "ffn_dim": (1024, 512),
    "heads": (4, 4),
    "tokens_per_sample": (256, 128),
    "batch_size": (8, 8),
    "max_update": (60, 30),
    "log_interval": (10, 5),
    "repeats": (3, 1),
    "corpus_mb": (3.0, 1.0),
}


# ---- data ----------------------------------------------------------------------------------------
def pseudo_text(num_bytes: int, seed: int) -> List[str]:
    """Lines of lowercase words drawn from a Zipfian vocabulary of random letter strings."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    letter_p = 1.0 / np.arange(1, 27)
    letter_p /= letter_p.sum()
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 11), p=letter_p)) for _ in range(5000)]
    word_p = 1.0 / np.arange(1, len(vocab) + 1)
    word_p /= word_p.sum()
    lines, size = [], 0
    while size < num_bytes:
        words = [vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(4, 25)), p=word_p)]
        line = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ","])
        lines.append(line)
        size += len(line) + 1
    return lines


BYTE_STR = [str(b) for b in range(256)]


def write_bytes_as_tokens(lines: List[str], path: Path) -> None:
    """One text line per line, each byte as its decimal value, space-separated."""
    with open(path, "w") as f:
        for line in lines:
            f.write(" ".join(BYTE_STR[b] for b in line.encode("utf-8")) + "\n")


def make_data(workdir: Path, corpus_mb: float, seed: int) -> Path:
    raw, dest = workdir / "raw", workdir / "data-bin"
    raw.mkdir(parents=True)
    (raw / "bytes.dict").write_text("".join(f"{b} 1\n" for b in range(256)))
    write_bytes_as_tokens(pseudo_text(int(corpus_mb * 1e6), seed), raw / "train.txt")
    write_bytes_as_tokens(pseudo_text(50_000, seed + 1), raw / "valid.txt")
    cmd = [
        str(BIN / "fairseq-preprocess"), "--only-source", "--srcdict", str(raw / "bytes.dict"),
        "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
        "--destdir", str(dest), "--workers", "1",
    ]  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"fairseq-preprocess failed:\n{done.stdout[-3000:]}")
    return dest


def snapshot_plugins(src: Path, dest_parent: Path) -> Path:
    """Copy ``src`` (a plugins/ directory) to ``dest_parent/<same name>``; fairseq imports a user dir
    under its basename, so the copy keeps it."""
    dest = dest_parent / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of every ``.py`` file: which code was measured."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ---- commands ------------------------------------------------------------------------------------
def common_args(a, data: Path, save_dir: Path) -> List[str]:
    return [
        str(data), "--cpu", "--seed", "1", "--num-workers", str(a.num_workers),
        "--decoder-layers", str(a.layers), "--decoder-embed-dim", str(a.embed_dim),
        "--decoder-ffn-embed-dim", str(a.ffn_dim), "--decoder-attention-heads", str(a.heads),
        "--decoder-normalize-before", "--share-decoder-input-output-embed", "--activation-fn", "relu",
        "--dropout", str(a.dropout), "--attention-dropout", "0.0", "--activation-dropout", "0.0",
        "--tokens-per-sample", str(a.tokens_per_sample), "--batch-size", str(a.batch_size),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.0005", "--lr-scheduler", "fixed",
        "--max-update", str(a.max_update), "--log-format", "json", "--log-interval", str(a.log_interval),
        "--no-save", "--disable-validation", "--save-dir", str(save_dir),
        "--no-progress-bar",
    ]  # fmt: skip


def ours_cmd(a, data: Path, save_dir: Path, plugins: Path) -> List[str]:
    return [
        str(BIN / "fairseq-train"), *common_args(a, data, save_dir),
        "--user-dir", str(plugins), "--task", "segment_lm", "--criterion", "aux_cross_entropy",
        "--arch", "efficient_lm", "--attention", "full", "--pos-emb", "sinusoidal",
    ]  # fmt: skip


def fairseq_cmd(a, data: Path, save_dir: Path) -> List[str]:
    return [
        str(BIN / "fairseq-train"), *common_args(a, data, save_dir),
        "--task", "language_modeling", "--sample-break-mode", "none", "--criterion", "cross_entropy",
        "--arch", "transformer_lm",
        # its config defaults these to 512 (not to the embed dim): with any other D it would add an
        # input and an output projection and a wider embedding table
        "--decoder-input-dim", str(a.embed_dim), "--decoder-output-dim", str(a.embed_dim),
    ]  # fmt: skip


# ---- running and parsing -------------------------------------------------------------------------
PARAMS_RE = re.compile(r"num\. shared model params: ([\d,]+)")


def parse_log(text: str) -> Dict:
    """``train_inner`` intervals (ntokens, seconds) and the parameter count from a fairseq-train log."""
    intervals, params = [], None
    for line in text.splitlines():
        if "| train_inner | " in line:
            stats = json.loads(line.split("| train_inner | ", 1)[1])
            # wps and wpb are averages over the interval; ups is rounded to 2 digits, so time comes from wps
            intervals.append(
                {"update": int(stats["num_updates"]), "wps": float(stats["wps"]), "wpb": float(stats["wpb"])}
            )
        m = PARAMS_RE.search(line)
        if m and params is None:
            params = int(m.group(1).replace(",", ""))
    return {"intervals": intervals, "params": params}


def run_speed(intervals: List[Dict]) -> float:
    """Tokens / seconds over every interval after the first (the warm-up)."""
    kept = intervals[1:]
    if not kept:
        raise RuntimeError("no train_inner interval after warm-up: raise --max-update or lower --log-interval")
    prev = [i["update"] for i in intervals[:-1]]
    tokens = [i["wpb"] * (i["update"] - p) for i, p in zip(kept, prev)]
    seconds = [t / i["wps"] for t, i in zip(tokens, kept)]
    return sum(tokens) / sum(seconds)


def run_one(name: str, cmd: List[str], env: Dict[str, str], log_path: Path) -> Dict:
    start, load = time.time(), os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path.write_text(done.stdout)
    if done.returncode != 0:
        sys.exit(f"{name}: fairseq-train failed (rc {done.returncode}), log {log_path}:\n{done.stdout[-4000:]}")
    parsed = parse_log(done.stdout)
    speed = run_speed(parsed["intervals"])
    return {
        "model": name,
        "tokens_per_s": round(speed, 1),
        "interval_wps": [i["wps"] for i in parsed["intervals"]],
        "params": parsed["params"],
        "wall_s": round(time.time() - start, 1),
        "loadavg_1min_before": round(load, 2),  # other processes on the machine skew tokens/s
        "log": str(log_path),
    }


# ---- main ----------------------------------------------------------------------------------------
def versions(plugins: Path) -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist, key in (("torch", "torch"), ("fairseq-fixed", "fairseq"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "?"
    try:
        repo = plugins.parent  # the checkout whose plugins/ was benchmarked
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "plugins"], cwd=repo, capture_output=True, text=True)
        out["git"] = commit.stdout.strip() + ("+dirty(plugins)" if dirty.stdout.strip() else "")
    except OSError:
        out["git"] = "?"
    return out


def add_sized_args(p: argparse.ArgumentParser, sizes: Dict, default_out: str, threads: int) -> None:
    """Options every benchmark shares: --quick, --out, --plugins, --threads, --seed and one option per
    entry of ``sizes`` (name -> (default, --quick value)); resolve them with ``resolve_sizes``."""
    p.add_argument("--out", default=default_out, help="output directory (relative to the repository root)")
    p.add_argument("--plugins", default=str(REPO / "plugins"), help="--user-dir (e.g. another checkout's plugins/)")
    p.add_argument("--threads", type=int, default=threads, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    p.add_argument("--seed", type=int, default=1234, help="corpus generator seed")
    for name, (default, quick) in sizes.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", type=type(default), default=None, help=f"{default} ({quick} with --quick)"
        )


def resolve_sizes(a, sizes: Dict) -> None:
    for name, (default, quick) in sizes.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else default)


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="Train tokens/s of efficient_lm --attention full vs fairseq transformer_lm (same size).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small model, few updates, one repeat (~1 minute)")
    p.add_argument("--data", default=None, help="existing fairseq data-bin directory (default: generate one)")
    p.add_argument("--num-workers", type=int, default=0, help="fairseq data-loader workers of both runs")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of both models")
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=2)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    if a.max_update < 2 * a.log_interval:
        p.error("--max-update must cover at least two --log-interval intervals (the first is warm-up)")
    return a


def start_run(out_arg: str, threads: int):
    """The run directory ``<out>/<stamp>/`` and the environment every benchmarked command gets."""
    out = Path(out_arg) if Path(out_arg).is_absolute() else REPO / out_arg
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = out / stamp
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    return out, stamp, logs, env


def save_record(out: Path, stamp: str, logs: Path, record: Dict) -> None:
    """Append the run's record (settings, exact commands, every measurement) to ``<out>/results.jsonl``."""
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\nrecord: {out / 'results.jsonl'}  table: {out / f'{stamp}.md'}  logs: {logs}")


def markdown_table(rows: List[Dict]) -> str:
    lines = ["| model | params | median tokens/s | ratio (ours / fairseq) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['median']:,.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    out, stamp, logs, env = start_run(a.out, a.threads)

    vers = versions(Path(a.plugins).resolve())  # before the runs: the commit whose plugins/ is copied
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        tmp = Path(tmp)
        if a.data:
            data = Path(a.data).resolve()
        else:
            t0 = time.time()
            data = make_data(tmp, a.corpus_mb, a.seed)
            print(f"corpus: {a.corpus_mb} MB of pseudo-text binarized in {time.time() - t0:.0f} s ({data})")
        # every repeat runs the same code even if plugins/ is edited meanwhile: a frozen copy (same basename)
        plugins = snapshot_plugins(Path(a.plugins).resolve(), tmp / "snapshot")
        plugins_hash = tree_hash(plugins)
        commands = {
            "ours": ours_cmd(a, data, tmp / "ckpt", plugins),
            "fairseq": fairseq_cmd(a, data, tmp / "ckpt"),
        }
        runs: List[Dict] = []
        for rep in range(a.repeats):
            for name in ("ours", "fairseq"):
                r = run_one(name, commands[name], env, logs / f"{name}-{rep}.log")
                r["repeat"] = rep
                runs.append(r)
                print(f"repeat {rep} {name:8s} {r['tokens_per_s']:9,.0f} tokens/s  (run {r['wall_s']:.0f} s)")

    names = {"ours": "efficient_lm --attention full (ours)", "fairseq": "fairseq transformer_lm"}
    med = {n: statistics.median(r["tokens_per_s"] for r in runs if r["model"] == n) for n in names}
    params = {n: next(r["params"] for r in runs if r["model"] == n) for n in names}
    rows = [
        {"model": names[n], "params": params[n], "median": med[n], "ratio": med[n] / med["fairseq"]}
        for n in ("ours", "fairseq")
    ]
    paired = [
        o["tokens_per_s"] / f["tokens_per_s"]
        for o, f in zip([r for r in runs if r["model"] == "ours"], [r for r in runs if r["model"] == "fairseq"])
    ]
    table = markdown_table(rows)
    settings = {k: getattr(a, k) for k in (*SIZES, "threads", "num_workers", "dropout", "seed", "quick")}
    header = (
        f"train throughput, {stamp}: {a.layers} layers x {a.embed_dim} (ffn {a.ffn_dim}, {a.heads} heads), "
        f"T={a.tokens_per_sample} B={a.batch_size}, {a.max_update} updates, {a.threads} threads, "
        f"{a.repeats} interleaved repeats; median paired ratio {statistics.median(paired):.2f}x"
    )
    loads = [r["loadavg_1min_before"] for r in runs]
    footer = (
        f"machine load (1-min load average before each run): {min(loads):.1f}-{max(loads):.1f} on "
        f"{os.cpu_count()} cores; above ~{a.threads} other processes share the cores and tokens/s is noisy"
    )
    print("\n" + header + "\n\n" + table + "\n\n" + footer)
    if params["ours"] != params["fairseq"]:
        print(f"WARNING: parameter counts differ ({params['ours']:,} vs {params['fairseq']:,})")

    (out / f"{stamp}.md").write_text(header + "\n\n" + table + "\n\n" + footer + "\n")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "benchmark": "train_throughput",
        "settings": settings,
        "threads": a.threads,
        "versions": vers,
        "plugins": str(Path(a.plugins).resolve()),
        "plugins_sha256_16": plugins_hash,
        "cpu_count": os.cpu_count(),
        "data": str(a.data) if a.data else f"generated pseudo-text, {a.corpus_mb} MB, seed {a.seed}",
        "commands": {n: shlex.join(c) for n, c in commands.items()},
        "env": {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)},
        "median_tokens_per_s": med,
        "params": params,
        "ratio": med["ours"] / med["fairseq"],
        "paired_ratios": paired,
        "runs": runs,
        "table": table,
    }
    save_record(out, stamp, logs, record)


if __name__ == "__main__":
    main()

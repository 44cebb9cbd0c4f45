"""Evaluation speed: Transformer-XL with memory against a vanilla transformer with a sliding window.

What is measured
    Tokens scored per second by the real ``fairseq-eval-lm`` CLI at the same effective context C
    (every scored token is predicted from the C tokens before it), Dai et al. 2019, Sec. 3.2 and
    Table 9 ("up to 1,800+ times faster than the vanilla model during evaluation"; 363x at attention
    length 800, on GPU). Three ways to evaluate, each row of the table:

    (a) memory: an ``xl`` model (``--attention relative --pos-emb relative``) read by ``--task
        segment_lm`` in contiguous segments of ``T_eval`` tokens, batch size 1, with
        ``--model-overrides "{'mem_len': C, 'same_length': True}"``: every query attends to exactly C
        keys (itself and the C-1 before it, held in the per-layer memory), i.e. the same window as (b).
        A segment costs T_eval queries over C + T_eval keys plus the relative position term; without
        gradients the plugin reuses the memory's cached keys/values (the paper's code re-projects the
        cached layer inputs), so only the T_eval new positions are projected; rows for several T_eval
        (longer segments amortize the per-segment work over more tokens);
    (b) sliding window, stride 1: a ``full`` model of the same size (absolute sinusoidal positions)
        under fairseq's ``--task language_modeling --tokens-per-sample C --context-window C-1``: one
        new token per window, each window a full forward over C tokens (the "vanilla" evaluation of
        Al-Rfou et al. 2019 that the paper compares with). It is very slow, so it runs on a short slice
        (the first ``--slice-tokens`` tokens of the test text, its own split ``test1``); tokens/s per
        token is what is compared. Several batch sizes (windows per forward); the fastest is the
        baseline of the ratio (the most favourable to the vanilla model);
    (c) default windows: the same ``full`` model with ``--tokens-per-sample C`` and no context window
        (non-overlapping blocks, a token sees 0..C-1 tokens, C/2 on average), for reference: the
        cheapest evaluation, but with a shorter average context than (a) and (b).

    The number to read is the ratio ``memory / sliding stride 1`` at each C (the issue's goal: >= 300x
    at C >= 800 on CPU). tokens/s is eval-lm's own ``Evaluated N tokens in Xs (Y tokens/s)`` line:
    model forward + log-softmax + target gather only, without process start, checkpoint loading and
    batch collation (the command's whole wall time is kept in the JSON record too). N counts scored
    targets in both tasks. (a) includes its first C/T_eval segments, whose memory is still filling up
    (cheaper): with the default 32k-token test that flatters (a) by about 1-2%.

How
    - data: the deterministic pseudo-text of ``train_throughput`` (a seeded Zipfian word generator)
      written one byte per token, binarized by ``fairseq-preprocess --only-source`` with a fixed
      256-byte dictionary into train / valid / test (``--test-tokens``) / test1 (the slice);
    - models: speed does not depend on the weights, so both are trained for only ``--train-updates``
      updates by real ``fairseq-train`` (``--task segment_lm``, ``--arch xl_small`` / ``full_small``
      with the sizes below: 4 layers x 256, 4 heads, FFN 1024, pre-norm, tied embeddings); the ``full``
      checkpoint, trained under ``segment_lm``, loads under ``--task language_modeling`` for (b) and (c)
      (eval-lm builds the task from its command line, the model from the checkpoint);
      ``--full-train-task language_modeling`` trains it under fairseq's task instead;
    - code: a copy of ``--plugins`` (default this checkout's ``plugins/``) taken at start is the
      ``--user-dir`` of every run, so edits made meanwhile do not leak into a run; the record keeps the
      git commit and a hash of the copied ``.py`` files;
    - order: for every C the runs are interleaved, (a) and (c) before and after every (b) run, so the
      cheap runs are repeated around the slow ones (medians reported); ``--repeats`` repeats it all;
    - threads: ``OMP_NUM_THREADS = MKL_NUM_THREADS = --threads`` (default 1) and ``--num-workers 0`` in
      every run. On a shared 2-core box another job makes 2-thread OpenMP collapse (threads wait at
      barriers for a descheduled partner): memory evaluation, made of many small ops, ran 4x slower with
      2 threads than with 1 at load 6 while the large GEMMs of (b) lost far less, so 2 threads on a
      busy machine distorts the ratio; use ``--threads 2`` on an idle machine.

Command (from the repository root)::

    python -m recipes.benchmarks.eval_speed            # ~16 min on a busy 2-core CPU (stride 1 at C=800 dominates)
    python -m recipes.benchmarks.eval_speed --quick    # ~3 min smoke run (2 layers x 128, C = 128, 256)
    python -m recipes.benchmarks.eval_speed --contexts 1600 --eval-segments 256 --sliding-batch-sizes 1 --slice-tokens 512

How to read the output
    A markdown table per run (stdout and ``<out>/<stamp>.md``): for each context C, tokens/s of every
    method and its ratio to the fastest stride-1 sliding window; the header line gives the headline
    ratio (fastest memory row / fastest stride-1 row) per C. ``<out>/results.jsonl`` gets one JSON line
    with the settings, the exact commands, every run (tokens, seconds, eval-lm's loss, wall time, load
    average before it), snapshot_plugins, tree_hash, versions, threads and date; every log is kept in ``<out>/<stamp>/``. Losses of
    these barely trained models mean nothing. The machine is shared: compare the ratios of one run,
    not tokens/s across runs.
"""

import argparse
import datetime
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from recipes.benchmarks.train_throughput import (
    BIN,
    REPO,
    add_sized_args,
    pseudo_text,
    resolve_sizes,
    save_record,
    snapshot_plugins,
    start_run,
    tree_hash,
    versions,
    write_bytes_as_tokens,
)

DEFAULT_OUT = "runs/benchmarks/eval_speed"

SIZES = {  # flag: (default, --quick)
    "layers": (4, 2),
    "embed_dim": (256, 128),
    "ffn_dim": (1024, 512),
    "heads": (4, 4),
    "contexts": ("256,800", "128,256"),  # effective context C of every method
    "eval_segments": ("128,256", "128"),  # T_eval of the memory runs
    "sliding_batch_sizes": ("1,16", "8"),  # windows per forward of the stride-1 runs
    "slice_tokens": (1024, 256),  # test1: the stride-1 slice
    "test_tokens": (32768, 4096),  # test: memory and default-window runs
    "train_updates": (10, 4),
    "repeats": (1, 1),
}
TRAIN_SEGMENT, TRAIN_MEM, TRAIN_BATCH = 128, 128, 4


# ---- data ----------------------------------------------------------------------------------------
def make_data(workdir: Path, test_tokens: int, slice_tokens: int, seed: int) -> Dict:
    """train / valid / test / test1 (= the first ``slice_tokens`` tokens of test, whole lines)."""
    raw, dest = workdir / "raw", workdir / "data-bin"
    raw.mkdir(parents=True)
    (raw / "bytes.dict").write_text("".join(f"{b} 1\n" for b in range(256)))
    write_bytes_as_tokens(pseudo_text(200_000, seed), raw / "train.txt")
    write_bytes_as_tokens(pseudo_text(20_000, seed + 1), raw / "valid.txt")
    test = pseudo_text(test_tokens, seed + 2)
    head, n = [], 0
    for line in test:  # one token per byte plus </s> per line
        if n >= slice_tokens:
            break
        head.append(line)
        n += len(line.encode("utf-8")) + 1
    write_bytes_as_tokens(test, raw / "test.txt")
    write_bytes_as_tokens(head, raw / "slice.txt")
    cmd = [
        str(BIN / "fairseq-preprocess"), "--only-source", "--srcdict", str(raw / "bytes.dict"),
        "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
        "--testpref", f"{raw / 'test.txt'},{raw / 'slice.txt'}", "--destdir", str(dest), "--workers", "1",
    ]  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"fairseq-preprocess failed:\n{done.stdout[-3000:]}")
    test_n = sum(len(line.encode("utf-8")) + 1 for line in test)
    return {"dir": dest, "test_tokens": test_n, "slice_tokens": n}


# ---- commands ------------------------------------------------------------------------------------
def train_cmd(a, data: Path, kind: str, save_dir: Path) -> List[str]:
    task = ["--task", "segment_lm", "--criterion", "aux_cross_entropy"]
    if kind == "full" and a.full_train_task == "language_modeling":
        task = ["--task", "language_modeling", "--sample-break-mode", "none", "--criterion", "cross_entropy"]
    arch = ["--arch", "xl_small", "--mem-len", str(TRAIN_MEM)] if kind == "xl" else ["--arch", "full_small"]
    return [
        str(BIN / "fairseq-train"), str(data), "--cpu", "--seed", "1", "--num-workers", "0",
        "--user-dir", a.user_dir, *task, *arch,
        "--decoder-layers", str(a.layers), "--decoder-embed-dim", str(a.embed_dim),
        "--decoder-ffn-embed-dim", str(a.ffn_dim), "--decoder-attention-heads", str(a.heads),
        "--tokens-per-sample", str(TRAIN_SEGMENT), "--batch-size", str(TRAIN_BATCH),
        "--optimizer", "adam", "--lr", "0.0005", "--max-update", str(a.train_updates),
        "--disable-validation", "--no-epoch-checkpoints", "--save-dir", str(save_dir),
        "--log-format", "json", "--no-progress-bar",
    ]  # fmt: skip


def eval_base(a, data: Path, ckpt: Path) -> List[str]:
    return [str(BIN / "fairseq-eval-lm"), str(data), "--cpu", "--user-dir", a.user_dir, "--path", str(ckpt),
            "--num-workers", "0"]  # fmt: skip


def memory_cmd(a, data: Path, ckpt: Path, context: int, segment: int) -> List[str]:
    overrides = f"{{'mem_len': {context}, 'same_length': True}}"
    return [
        *eval_base(a, data, ckpt), "--task", "segment_lm", "--gen-subset", "test",
        "--tokens-per-sample", str(segment), "--batch-size", "1", "--model-overrides", overrides,
    ]  # fmt: skip


def sliding_cmd(a, data: Path, ckpt: Path, context: int, batch: int) -> List[str]:
    # stride 1: blocks of --tokens-per-sample - --context-window = 1 new token, C tokens per window
    return [
        *eval_base(a, data, ckpt), "--task", "language_modeling", "--gen-subset", "test1",
        "--tokens-per-sample", str(context), "--context-window", str(context - 1), "--batch-size", str(batch),
    ]  # fmt: skip


def default_cmd(a, data: Path, ckpt: Path, context: int) -> List[str]:
    return [
        *eval_base(a, data, ckpt), "--task", "language_modeling", "--gen-subset", "test",
        "--tokens-per-sample", str(context), "--batch-size", "1",
    ]  # fmt: skip


# ---- running and parsing -------------------------------------------------------------------------
EVAL_RE = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")
LOSS_RE = re.compile(r"Loss \(base 2\): ([\d.]+)")


def run(cmd: List[str], env: Dict[str, str], log_path: Path, what: str) -> Dict:
    start, load = time.time(), os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path.write_text(done.stdout)
    if done.returncode != 0:
        sys.exit(f"{what} failed (rc {done.returncode}), log {log_path}:\n{done.stdout[-4000:]}")
    return {"text": done.stdout, "wall_s": round(time.time() - start, 1), "loadavg_1min_before": round(load, 2)}


def run_eval(cmd: List[str], env: Dict[str, str], log_path: Path, **labels) -> Dict:
    r = run(cmd, env, log_path, f"fairseq-eval-lm ({labels})")
    m, loss = EVAL_RE.search(r["text"]), LOSS_RE.search(r["text"])
    if m is None:
        sys.exit(f"no 'Evaluated N tokens' line in {log_path}")
    return {
        **labels,
        "tokens": int(m.group(1).replace(",", "")),
        "seconds": float(m.group(2)),
        "tokens_per_s": float(m.group(3)),
        "loss_base2": float(loss.group(1)) if loss else None,
        "wall_s": r["wall_s"],
        "loadavg_1min_before": r["loadavg_1min_before"],
        "log": str(log_path),
    }


# ---- main ----------------------------------------------------------------------------------------
def ints(text: str) -> List[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(
        description="fairseq-eval-lm tokens/s: Transformer-XL memory vs stride-1 sliding window (same context).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small model, short contexts and slices (~3 minutes)")
    p.add_argument(
        "--full-train-task", choices=("segment_lm", "language_modeling"), default="segment_lm",
        help="task the full model is trained under (it is evaluated under language_modeling either way)",
    )  # fmt: skip
    add_sized_args(p, SIZES, DEFAULT_OUT, threads=1)
    a = p.parse_args(argv)
    resolve_sizes(a, SIZES)
    a.contexts, a.eval_segments = ints(a.contexts), ints(a.eval_segments)
    a.sliding_batch_sizes = ints(a.sliding_batch_sizes)
    a.plugins = str(Path(a.plugins).resolve())
    if min(a.contexts) < 2:
        p.error("--contexts must be >= 2")
    return a


def matching(runs: List[Dict], **match) -> List[float]:
    return [r["tokens_per_s"] for r in runs if all(r.get(k) == v for k, v in match.items())]


def build_rows(a, runs: List[Dict]) -> List[Dict]:
    rows = []
    for c in a.contexts:
        group = []
        for t in a.eval_segments:
            group.append({"method": f"memory (xl, T_eval {t}, mem_len {c}, same_length)", "kind": "memory",
                          "batch": 1, "match": {"method": "memory", "segment": t}})  # fmt: skip
        for b in a.sliding_batch_sizes:
            group.append({"method": "sliding window stride 1 (full)", "kind": "sliding", "batch": b,
                          "match": {"method": "sliding", "batch": b}})  # fmt: skip
        group.append({"method": f"default windows (full, blocks of {c})", "kind": "default", "batch": 1,
                      "match": {"method": "default"}})  # fmt: skip
        for g in group:
            speeds = matching(runs, context=c, **g.pop("match"))
            g.update(context=c, speed=statistics.median(speeds), runs=len(speeds))
        base = max(g["speed"] for g in group if g["kind"] == "sliding")  # the fastest stride-1 batch size
        for g in group:
            g["ratio"] = g["speed"] / base
        rows += group
    return rows


def markdown_table(rows: List[Dict]) -> str:
    lines = [
        "| context C | method | batch | runs | median tokens/s | vs stride 1 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['method']} | {r['batch']} | {r['runs']} | {r['speed']:,.1f} | {r['ratio']:,.1f}x |"
        )
    return "\n".join(lines)


def headline(a, rows: List[Dict]) -> Dict[int, float]:
    out = {}
    for c in a.contexts:
        mem = max(r["speed"] for r in rows if r["context"] == c and r["kind"] == "memory")
        sliding = max(r["speed"] for r in rows if r["context"] == c and r["kind"] == "sliding")
        out[c] = mem / sliding
    return out


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    out, stamp, logs, env = start_run(a.out, a.threads)
    commands: Dict[str, str] = {}
    runs: List[Dict] = []
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        tmp = Path(tmp)
        # a private copy of plugins/: edits made to the checkout while this runs do not leak into it
        code_version = versions(Path(a.plugins))
        a.user_dir = str(snapshot_plugins(Path(a.plugins), tmp / "snapshot"))
        plugins_hash = tree_hash(Path(a.user_dir))
        data = make_data(tmp, a.test_tokens, a.slice_tokens, a.seed)
        print(f"corpus: test {data['test_tokens']:,} tokens, stride-1 slice {data['slice_tokens']:,} tokens")
        ckpt = {}
        for kind in ("xl", "full"):
            cmd = train_cmd(a, data["dir"], kind, tmp / f"ckpt_{kind}")
            commands[f"train {kind}"] = shlex.join(cmd)
            r = run(cmd, env, logs / f"train-{kind}.log", f"fairseq-train ({kind})")
            ckpt[kind] = tmp / f"ckpt_{kind}" / "checkpoint_last.pt"
            print(f"trained {kind} ({a.train_updates} updates, {r['wall_s']:.0f} s): {ckpt[kind].name}")

        def cheap_runs(c: int, rep: int, k: int) -> None:
            for t in a.eval_segments:
                cmd = memory_cmd(a, data["dir"], ckpt["xl"], c, t)
                commands[f"memory C={c} T_eval={t}"] = shlex.join(cmd)
                r = run_eval(cmd, env, logs / f"memory-C{c}-T{t}-{rep}-{k}.log", context=c, method="memory",
                             segment=t, batch=1, repeat=rep)  # fmt: skip
                runs.append(r)
                print(
                    f"C={c:5d} memory   T_eval={t:4d}      {r['tokens_per_s']:10,.1f} tokens/s ({r['tokens']:,} tokens)"
                )
            cmd = default_cmd(a, data["dir"], ckpt["full"], c)
            commands[f"default C={c}"] = shlex.join(cmd)
            r = run_eval(cmd, env, logs / f"default-C{c}-{rep}-{k}.log", context=c, method="default", batch=1,
                         repeat=rep)  # fmt: skip
            runs.append(r)
            print(f"C={c:5d} default  blocks of {c:<6d}  {r['tokens_per_s']:10,.1f} tokens/s ({r['tokens']:,} tokens)")

        for rep in range(a.repeats):
            for c in a.contexts:
                for k, b in enumerate(a.sliding_batch_sizes):
                    cheap_runs(c, rep, k)
                    cmd = sliding_cmd(a, data["dir"], ckpt["full"], c, b)
                    commands[f"sliding C={c} batch={b}"] = shlex.join(cmd)
                    r = run_eval(cmd, env, logs / f"sliding-C{c}-B{b}-{rep}.log", context=c, method="sliding",
                                 batch=b, repeat=rep)  # fmt: skip
                    runs.append(r)
                    print(
                        f"C={c:5d} stride 1 batch {b:<4d}       {r['tokens_per_s']:10,.1f} tokens/s ({r['tokens']:,} tokens)"
                    )
                cheap_runs(c, rep, len(a.sliding_batch_sizes))

    rows = build_rows(a, runs)
    ratios = headline(a, rows)
    table = markdown_table(rows)
    header = (
        f"eval speed, {stamp}: {a.layers} layers x {a.embed_dim} (ffn {a.ffn_dim}, {a.heads} heads), "
        f"{a.threads} thread(s), tokens/s from fairseq-eval-lm's 'Evaluated N tokens' line; memory on "
        f"{data['test_tokens']:,} test tokens, stride 1 on the first {data['slice_tokens']:,}; "
        "memory / stride 1 (fastest of each): " + ", ".join(f"{r:,.0f}x at C={c}" for c, r in ratios.items())
    )
    print("\n" + header + "\n\n" + table)
    (out / f"{stamp}.md").write_text(header + "\n\n" + table + "\n")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "benchmark": "eval_speed",
        "settings": {k: getattr(a, k) for k in (*SIZES, "threads", "seed", "quick", "full_train_task")},
        "threads": a.threads,
        "versions": code_version,
        "plugins": a.plugins,
        "plugins_tree_hash": plugins_hash,  # sha256 of the snapshot's .py files: the code measured
        "cpu_count": os.cpu_count(),
        "data": {
            "generated": f"pseudo-text, seed {a.seed}",
            "test_tokens": data["test_tokens"],
            "slice_tokens": data["slice_tokens"],
        },  # fmt: skip
        "speed_source": "fairseq-eval-lm 'Evaluated N tokens in Xs (Y tokens/s)': scorer time only",
        "env": {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)},
        "commands": commands,
        "memory_over_stride1": {str(c): r for c, r in ratios.items()},
        "rows": rows,
        "runs": runs,
        "table": table,
        "total_s": round(time.time() - started),
    }
    save_record(out, stamp, logs, record)


if __name__ == "__main__":
    main()

"""Training throughput through the real ``fairseq-train``: tokens/s of paired configurations.

Three comparisons (``--training-cases``), each a table of tokens/s and the ratio to its reference:

- ``fairseq``: our ``efficient_lm --attention full`` against fairseq's own ``transformer_lm``, the same
  network on both sides (sizes, relu, pre-norm with a final LayerNorm, sqrt(D)-scaled tied embeddings,
  sinusoidal positions, ``--decoder-input-dim``/``--decoder-output-dim`` = D so that fairseq adds no
  projections; identical parameter counts). What differs is the implementation: fairseq runs
  ``F.multi_head_attention_forward`` with a float causal mask and separate q/k/v weights, ours SDPA with
  ``is_causal`` and a fused k/v projection. fairseq reads ``--task language_modeling --sample-break-mode
  none``, ours ``--task segment_lm``: both feed B x T target tokens per batch, no padding. > 1.0x: ours
  is faster.
- ``xl``: ``xl_small`` (Transformer-XL relative attention) against ``full_small`` at the same segment length
  T: ``--mem-len 0`` (the relative attention alone), ``T`` and ``2T`` (attention over M more keys, their
  keys/values recomputed from the detached memory every segment).
- ``linear``: ``linear_tiny`` (linear attention, elu + 1) against ``full_tiny`` (SDPA) at long segments (4,096
  tokens): the end-to-end counterpart of the layer section's linear rows (issue 18 asks linear to stay at least
  0.70x of full attention's wall time there, i.e. >= 1.43x its tokens/s).

How: a deterministic pseudo-text (a seeded Zipfian word generator, one byte per token, a fixed 256-byte
dictionary) binarized once by ``fairseq-preprocess``; a copy of ``plugins/`` taken at the start is the
``--user-dir`` of every run (edits made meanwhile do not leak in; the row keeps its hash); every run is a
fresh ``fairseq-train --cpu --no-save --disable-validation --num-workers 0`` with ``--log-format json``;
runs are interleaved (every configuration, then again, ``repeats`` times). A run's speed is its tokens
over its time across the ``train_inner`` intervals after the first (warm-up). Rows give the median run,
the ratio of medians, the median of per-repeat paired ratios (robust to drifting load) and the ratio of
the fastest runs (the least disturbed); when they disagree the machine was too busy: raise the repeats.
"""

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .isolate import REPO

BIN = Path(sys.executable).parent  # fairseq's console scripts live next to the interpreter
CASES = ("fairseq", "xl", "linear")

# setting: (full, --quick, --smoke); "fairseq" sizes from the former train_throughput, "xl" from xl_overhead
SIZES = {
    "fairseq": {
        "layers": (4, 2, 1), "embed_dim": (256, 128, 32), "ffn_dim": (1024, 512, 64), "heads": (4, 4, 2),
        "segment": (256, 128, 32), "batch": (8, 8, 2), "updates": (60, 30, 6), "log_interval": (10, 5, 2),
        "repeats": (3, 1, 1), "corpus_mb": (3.0, 1.0, 0.05),
    },
    "xl": {
        "segments": ([64, 128], [64], [16]), "batch": (16, 8, 2), "updates": (60, 20, 6), "log_interval": (10, 5, 2),
        "repeats": (3, 1, 1), "corpus_mb": (1.5, 0.3, 0.05),
    },
    "linear": {
        "segments": ([4096], [4096], [64]), "batch": (2, 1, 2), "updates": (30, 12, 6), "log_interval": (5, 3, 2),
        "repeats": (3, 1, 1), "corpus_mb": (1.0, 0.3, 0.05),
    },
}  # fmt: skip


def sizes(case: str, level: int, repeats: Optional[int] = None) -> Dict:
    """The settings of ``case`` at ``level`` (0 full, 1 --quick, 2 --smoke); ``repeats`` (``--training-repeats``)
    replaces the level's number of interleaved repeats."""
    out = {name: values[level] for name, values in SIZES[case].items()}
    if repeats is not None:
        out["repeats"] = repeats
    return out


# ---- data and code ---------------------------------------------------------------------------------------
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


def write_bytes_as_tokens(lines: List[str], path: Path) -> None:
    """One text line per line, each byte as its decimal value, space-separated."""
    with open(path, "w") as f:
        for line in lines:
            f.write(" ".join(str(b) for b in line.encode("utf-8")) + "\n")


def binarize(raw: Dict[str, List[str]], workdir: Path) -> Path:
    """``{split prefix: lines}`` (``train``, ``valid``, optionally ``test`` and more test splits) -> data-bin."""
    src, dest = workdir / "raw", workdir / "data-bin"
    src.mkdir(parents=True)
    (src / "bytes.dict").write_text("".join(f"{b} 1\n" for b in range(256)))
    for name, lines in raw.items():
        write_bytes_as_tokens(lines, src / f"{name}.txt")
    tests = [str(src / f"{name}.txt") for name in raw if name not in ("train", "valid")]
    cmd = [str(BIN / "fairseq-preprocess"), "--only-source", "--srcdict", str(src / "bytes.dict"),
           "--trainpref", str(src / "train.txt"), "--validpref", str(src / "valid.txt"),
           *(["--testpref", ",".join(tests)] if tests else []), "--destdir", str(dest), "--workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed: {done.stdout[-2000:]}")
    return dest


def snapshot_plugins(dest_parent: Path) -> Path:
    """A frozen copy of this checkout's ``plugins/`` (same basename: fairseq imports a user dir under it)."""
    dest = dest_parent / "plugins"
    shutil.copytree(REPO / "plugins", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of every ``.py`` file: which code was measured."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ---- commands ----------------------------------------------------------------------------------------------
def _train(data: Path, s: Dict, segment: int, save_dir: Path) -> List[str]:
    return [
        str(BIN / "fairseq-train"), str(data), "--cpu", "--seed", "1", "--num-workers", "0",
        "--tokens-per-sample", str(segment), "--batch-size", str(s["batch"]),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.0005", "--lr-scheduler", "fixed",
        "--max-update", str(s["updates"]), "--log-format", "json", "--log-interval", str(s["log_interval"]),
        "--no-save", "--disable-validation", "--save-dir", str(save_dir), "--no-progress-bar",
    ]  # fmt: skip


def fairseq_configs(data: Path, s: Dict, user_dir: Path, save_dir: Path) -> List[Dict]:
    """ours (efficient_lm, full attention) and fairseq's transformer_lm, the same network."""
    sized = [
        "--decoder-layers", str(s["layers"]), "--decoder-embed-dim", str(s["embed_dim"]),
        "--decoder-ffn-embed-dim", str(s["ffn_dim"]), "--decoder-attention-heads", str(s["heads"]),
        "--decoder-normalize-before", "--share-decoder-input-output-embed", "--activation-fn", "relu",
        "--dropout", "0.1", "--attention-dropout", "0.0", "--activation-dropout", "0.0",
    ]  # fmt: skip
    base = _train(data, s, s["segment"], save_dir) + sized
    ours = base + ["--user-dir", str(user_dir), "--task", "segment_lm", "--criterion", "aux_cross_entropy",
                   "--arch", "efficient_lm", "--attention", "full", "--pos-emb", "sinusoidal"]  # fmt: skip
    # transformer_lm defaults its input/output dims to 512 (not to D): it would add projections otherwise
    theirs = base + ["--task", "language_modeling", "--sample-break-mode", "none", "--criterion", "cross_entropy",
                     "--arch", "transformer_lm", "--decoder-input-dim", str(s["embed_dim"]),
                     "--decoder-output-dim", str(s["embed_dim"])]  # fmt: skip
    return [
        {"case": "fairseq", "model": "efficient_lm --attention full (ours)", "segment": s["segment"], "cmd": ours},
        {"case": "fairseq", "model": "fairseq transformer_lm", "segment": s["segment"], "cmd": theirs,
         "reference": True},
    ]  # fmt: skip


def xl_configs(data: Path, s: Dict, user_dir: Path, save_dir: Path) -> List[Dict]:
    """full_small and xl_small with memory 0, T and 2T, at every segment length T."""
    out = []
    for t in s["segments"]:
        for arch, mem in (("full_small", 0), ("xl_small", 0), ("xl_small", t), ("xl_small", 2 * t)):
            cmd = _train(data, s, t, save_dir) + ["--user-dir", str(user_dir), "--task", "segment_lm",
                                                   "--criterion", "aux_cross_entropy", "--arch", arch,
                                                   "--mem-len", str(mem)]  # fmt: skip
            label = "full_small" if arch == "full_small" else f"xl_small, mem {['0', 'T', '2T'][mem // t]}"
            out.append({"case": "xl", "model": label, "segment": t, "mem_len": mem, "cmd": cmd,
                        "reference": arch == "full_small"})  # fmt: skip
    return out


def linear_configs(data: Path, s: Dict, user_dir: Path, save_dir: Path) -> List[Dict]:
    """full_tiny (the reference) and linear_tiny at every segment length T."""
    out = []
    for t in s["segments"]:
        for arch in ("full_tiny", "linear_tiny"):
            cmd = _train(data, s, t, save_dir) + ["--user-dir", str(user_dir), "--task", "segment_lm",
                                                   "--criterion", "aux_cross_entropy", "--arch", arch]  # fmt: skip
            out.append({"case": "linear", "model": arch, "segment": t, "cmd": cmd, "reference": arch == "full_tiny"})
    return out


CONFIGS = {"fairseq": fairseq_configs, "xl": xl_configs, "linear": linear_configs}


# ---- running and parsing -------------------------------------------------------------------------------
PARAMS_RE = re.compile(r"num\. shared model params: ([\d,]+)")


def parse_log(text: str) -> Dict:
    """``train_inner`` intervals (update, wps, wpb) and the parameter count of a fairseq-train json log."""
    intervals, params = [], None
    for line in text.splitlines():
        if "| train_inner | " in line:
            stats = json.loads(line.split("| train_inner | ", 1)[1])
            # wps and wpb are averages over the interval; ups is rounded to 2 digits, so time comes from wps
            intervals.append({"update": int(stats["num_updates"]), "wps": float(stats["wps"]),
                              "wpb": float(stats["wpb"])})  # fmt: skip
        m = PARAMS_RE.search(line)
        if m and params is None:
            params = int(m.group(1).replace(",", ""))
    return {"intervals": intervals, "params": params}


def run_speed(intervals: List[Dict]) -> float:
    """Tokens / seconds over every interval after the first (the warm-up)."""
    kept = intervals[1:]
    if not kept:
        raise RuntimeError("no train_inner interval after warm-up: more updates or a shorter log interval")
    prev = [i["update"] for i in intervals[:-1]]
    tokens = [i["wpb"] * (i["update"] - p) for i, p in zip(kept, prev)]
    return sum(tokens) / sum(t / i["wps"] for t, i in zip(tokens, kept))


def run_one(config: Dict, env: Dict[str, str], log_path: Path, timeout: float) -> Dict:
    """One fresh fairseq-train: tokens/s after the warm-up interval, or the error."""
    start, load = time.time(), os.getloadavg()[0]
    try:
        done = subprocess.run(config["cmd"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {timeout:.0f} s"}
    log_path.write_text(done.stdout)
    if done.returncode != 0:
        return {"status": "error", "error": (done.stdout.strip().splitlines() or ["?"])[-1][:300]}
    parsed = parse_log(done.stdout)
    try:
        speed = run_speed(parsed["intervals"])
    except RuntimeError as e:
        return {"status": "error", "error": str(e)}
    return {"status": "ok", "tokens_per_s": round(speed, 1), "params": parsed["params"],
            "wall_s": round(time.time() - start, 1), "loadavg_1min_before": round(load, 2)}  # fmt: skip


def measure(
    cases: List[str], level: int, env: Dict[str, str], run_dir: Path, timeout: float, repeats: Optional[int] = None
) -> List[Dict]:
    """Every configuration of ``cases``, interleaved ``repeats`` times (default: the level's); one row per
    configuration."""
    import tempfile

    logs = run_dir / "training"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="suite_training_") as tmp:
        tmp = Path(tmp)
        user_dir = snapshot_plugins(tmp / "snapshot")
        code = tree_hash(user_dir)
        for case in cases:
            s = sizes(case, level, repeats)
            work = tmp / case
            data = binarize({"train": pseudo_text(int(s["corpus_mb"] * 1e6), 1234),
                             "valid": pseudo_text(50_000, 1235)}, work)  # fmt: skip
            configs = CONFIGS[case](data, s, user_dir, work / "ckpt")
            runs: List[List[Dict]] = [[] for _ in configs]
            for rep in range(s["repeats"]):
                for i, c in enumerate(configs):
                    slug = re.sub(r"[^\w]+", "-", f"{case}-T{c['segment']}-{c['model']}-{rep}")
                    r = run_one(c, env, logs / f"{slug}.log", timeout)
                    runs[i].append(r)
                    print(f"[training] {case} T={c['segment']} {c['model']} repeat {rep}: "
                          f"{r.get('tokens_per_s', r['status'])}", flush=True)  # fmt: skip
            rows += _rows(case, s, configs, runs, code)
    return rows


def _rows(case: str, s: Dict, configs: List[Dict], runs: List[List[Dict]], code: str) -> List[Dict]:
    out = []
    for c, rs in zip(configs, runs):
        ok = [r for r in rs if r["status"] == "ok"]
        row = {k: v for k, v in c.items() if k != "cmd"}
        row.update(command=" ".join(c["cmd"]), plugins_hash=code, sizes=s, runs=rs)
        if not ok:
            out.append({**row, "status": rs[-1]["status"], "error": rs[-1].get("error", "")})
            continue
        out.append({**row, "status": "ok", "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                    "params": ok[0]["params"]})  # fmt: skip
    add_ratios(out)
    return out


def add_ratios(rows: List[Dict]) -> None:
    """``vs_reference``: median tokens/s over the reference's at the same case and T; ``paired``: median of
    the per-repeat ratios; ``best``: fastest run over the reference's fastest."""
    for r in rows:
        ref = next((x for x in rows if x.get("reference") and x["case"] == r["case"]
                    and x["segment"] == r["segment"] and x["status"] == "ok"), None)  # fmt: skip
        if ref is None or r["status"] != "ok":
            continue
        mine = [x.get("tokens_per_s") for x in r["runs"]]
        theirs = [x.get("tokens_per_s") for x in ref["runs"]]
        pairs = [m / t for m, t in zip(mine, theirs) if m and t]
        r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["paired"] = statistics.median(pairs) if pairs else None
        r["best"] = max(filter(None, mine)) / max(filter(None, theirs))


def table(rows: List[Dict]) -> str:
    lines = ["| case | T | model | params | median tokens/s | vs reference | paired | best vs best |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r.get('case', '')} | {r.get('segment', '')} | {r.get('model', '')} | {r['status']}: "
                         f"{r.get('error', '')} | | | | |")  # fmt: skip
            continue
        ratios = [f"{r[k]:.2f}x" if r.get(k) is not None else "–" for k in ("vs_reference", "paired", "best")]
        lines.append(f"| {r['case']} | {r['segment']} | {r['model']} | {r['params']:,} | {r['tokens_per_s']:,.0f} | "
                     + " | ".join(ratios) + " |")  # fmt: skip
    return "\n".join(lines)

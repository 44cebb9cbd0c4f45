"""Evaluation speed: Transformer-XL with memory against a vanilla transformer with a stride-1 sliding window.

Tokens scored per second by the real ``fairseq-eval-lm`` at the same effective context C (every scored
token is predicted from the C tokens before it; Dai et al. 2019, Sec. 3.2 and Table 9: 363x at attention
length 800 on GPU). Three ways to evaluate:

- ``memory``: an ``xl_small``-shaped model under ``--task segment_lm`` in segments of ``T_eval`` tokens,
  batch 1, ``--model-overrides "{'mem_len': C, 'same_length': True}"``: every query attends to exactly C
  keys. Without gradients the memory's keys/values are cached, so a segment projects only its own tokens;
- ``sliding``: a ``full_small``-shaped model under ``--task language_modeling --tokens-per-sample C
  --context-window C-1``: one new token per window, each window a full forward over C tokens. Very slow,
  so it runs on the first ``slice_tokens`` tokens of the test text (its own split ``test1``); several
  batch sizes, the fastest is the baseline of the ratio (the most favourable to the vanilla model);
- ``default``: the same ``full`` model in non-overlapping blocks of C (a token sees C/2 on average), for
  reference.

The number to read is ``memory / sliding`` at each C (fastest of each). tokens/s is eval-lm's own
``Evaluated N tokens in Xs (Y tokens/s)`` line (scorer time only). The models are trained for a few updates
by the real ``fairseq-train`` (speed does not depend on the weights) on the pseudo-text of ``training``;
the cheap runs are repeated before and after every stride-1 run (medians).
"""

import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

from .isolate import REPO
from .training import BIN, binarize, pseudo_text, snapshot_plugins, tree_hash

# setting: (full, --quick, --smoke)
SIZES = {
    "layers": (4, 2, 1), "embed_dim": (256, 128, 32), "ffn_dim": (1024, 512, 64), "heads": (4, 4, 2),
    "contexts": ([256, 800], [256, 800], [64]),  # effective context C of every method
    "eval_segments": ([128, 256], [128], [32]),  # T_eval of the memory runs
    "sliding_batch_sizes": ([1, 16], [8], [8]),  # windows per forward of the stride-1 runs
    "slice_tokens": (1024, 256, 64),  # test1: the stride-1 slice
    "test_tokens": (32768, 4096, 512),  # test: memory and default-window runs
    "train_updates": (10, 4, 2),
}  # fmt: skip
TRAIN_SEGMENT, TRAIN_MEM, TRAIN_BATCH = 128, 128, 4
EVAL_RE = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")


def make_data(workdir: Path, test_tokens: int, slice_tokens: int) -> Dict:
    """train / valid / test / test1 (= the first ``slice_tokens`` tokens of test, whole lines)."""
    test = pseudo_text(test_tokens, 1236)
    head, n = [], 0
    for line in test:  # one token per byte plus </s> per line
        if n >= slice_tokens:
            break
        head.append(line)
        n += len(line.encode("utf-8")) + 1
    dest = binarize({"train": pseudo_text(200_000, 1234), "valid": pseudo_text(20_000, 1235), "test": test,
                     "slice": head}, workdir)  # fmt: skip
    return {"dir": dest, "test_tokens": sum(len(line.encode("utf-8")) + 1 for line in test), "slice_tokens": n}


def train_cmd(s: Dict, data: Path, kind: str, user_dir: Path, save_dir: Path) -> List[str]:
    arch = ["--arch", "xl_small", "--mem-len", str(TRAIN_MEM)] if kind == "xl" else ["--arch", "full_small"]
    return [
        str(BIN / "fairseq-train"), str(data), "--cpu", "--seed", "1", "--num-workers", "0",
        "--user-dir", str(user_dir), "--task", "segment_lm", "--criterion", "aux_cross_entropy", *arch,
        "--decoder-layers", str(s["layers"]), "--decoder-embed-dim", str(s["embed_dim"]),
        "--decoder-ffn-embed-dim", str(s["ffn_dim"]), "--decoder-attention-heads", str(s["heads"]),
        "--tokens-per-sample", str(TRAIN_SEGMENT), "--batch-size", str(TRAIN_BATCH),
        "--optimizer", "adam", "--lr", "0.0005", "--max-update", str(s["train_updates"]),
        "--disable-validation", "--no-epoch-checkpoints", "--save-dir", str(save_dir),
        "--log-format", "json", "--no-progress-bar",
    ]  # fmt: skip


def eval_cmd(data: Path, ckpt: Path, user_dir: Path, method: str, context: int, value: int) -> List[str]:
    """``value``: T_eval for ``memory``, the batch size for ``sliding``, unused for ``default``."""
    base = [str(BIN / "fairseq-eval-lm"), str(data), "--cpu", "--user-dir", str(user_dir), "--path", str(ckpt),
            "--num-workers", "0"]  # fmt: skip
    if method == "memory":
        overrides = f"{{'mem_len': {context}, 'same_length': True}}"
        return base + ["--task", "segment_lm", "--gen-subset", "test", "--tokens-per-sample", str(value),
                       "--batch-size", "1", "--model-overrides", overrides]  # fmt: skip
    if method == "sliding":  # stride 1: blocks of --tokens-per-sample - --context-window = 1 new token
        return base + ["--task", "language_modeling", "--gen-subset", "test1", "--tokens-per-sample", str(context),
                       "--context-window", str(context - 1), "--batch-size", str(value)]  # fmt: skip
    return base + ["--task", "language_modeling", "--gen-subset", "test", "--tokens-per-sample", str(context),
                   "--batch-size", "1"]  # fmt: skip


def _run(cmd: List[str], env: Dict[str, str], log: Path) -> str:
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed (log {log}): {done.stdout.strip().splitlines()[-1:]}")
    return done.stdout


def measure(s: Dict, env: Dict[str, str], run_dir: Path) -> List[Dict]:
    """One row per (C, method, T_eval or batch), with its median tokens/s and ratio to stride 1; raises on a
    failed command (the caller turns it into an error row)."""
    logs = run_dir / "evaluation"
    logs.mkdir(parents=True, exist_ok=True)
    runs: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="suite_evaluation_") as tmp:
        tmp = Path(tmp)
        user_dir = snapshot_plugins(tmp / "snapshot")
        code = tree_hash(user_dir)
        data = make_data(tmp, s["test_tokens"], s["slice_tokens"])
        ckpt = {}
        for kind in ("xl", "full"):
            _run(train_cmd(s, data["dir"], kind, user_dir, tmp / kind), env, logs / f"train-{kind}.log")
            ckpt[kind] = tmp / kind / "checkpoint_last.pt"

        def evaluate(c: int, method: str, value: int, tag: str) -> None:
            cmd = eval_cmd(data["dir"], ckpt["xl" if method == "memory" else "full"], user_dir, method, c, value)
            m = EVAL_RE.search(_run(cmd, env, logs / f"{method}-C{c}-{value}-{tag}.log"))
            if m is None:
                raise RuntimeError(f"no 'Evaluated N tokens' line in {logs / f'{method}-C{c}-{value}-{tag}.log'}")
            runs.append({"context": c, "method": method, "value": value, "tokens_per_s": float(m.group(3)),
                         "tokens": int(m.group(1).replace(",", "")), "command": " ".join(cmd)})  # fmt: skip
            print(f"[evaluation] C={c} {method} {value}: {float(m.group(3)):,.1f} tokens/s", flush=True)

        def cheap(c: int, tag: str) -> None:
            for t in s["eval_segments"]:
                evaluate(c, "memory", t, tag)
            evaluate(c, "default", 1, tag)

        for c in s["contexts"]:
            for k, b in enumerate(s["sliding_batch_sizes"]):
                cheap(c, str(k))
                evaluate(c, "sliding", b, "0")
            cheap(c, "end")
    return rows(runs, data, code)


def rows(runs: List[Dict], data: Dict, code: str) -> List[Dict]:
    out = []
    for key in dict.fromkeys((r["context"], r["method"], r["value"]) for r in runs):
        mine = [r for r in runs if (r["context"], r["method"], r["value"]) == key]
        out.append({"status": "ok", "context": key[0], "method": key[1], "value": key[2], "runs": len(mine),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine), "tokens": mine[0]["tokens"],
                    "command": mine[0]["command"], "plugins_hash": code, "test_tokens": data["test_tokens"],
                    "slice_tokens": data["slice_tokens"]})  # fmt: skip
    for r in out:
        best = max(x["tokens_per_s"] for x in out if x["context"] == r["context"] and x["method"] == "sliding")
        r["vs_stride1"] = r["tokens_per_s"] / best
    return out


def headline(rows: List[Dict]) -> Dict[int, float]:
    """``{C: fastest memory row / fastest stride-1 row}``."""
    return {c: max(r["vs_stride1"] for r in rows if r["context"] == c and r["method"] == "memory")
            for c in dict.fromkeys(r["context"] for r in rows if r["status"] == "ok")}  # fmt: skip


def table(rows: List[Dict]) -> str:
    names = {"memory": "memory (xl, T_eval {v}, mem_len C, same_length)", "sliding": "sliding window stride 1, batch {v}",
             "default": "default windows (blocks of C)"}  # fmt: skip
    lines = ["| context C | method | runs | median tokens/s | vs stride 1 |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| | {r['status']}: {r.get('error', '')} | | | |")
            continue
        lines.append(f"| {r['context']} | {names[r['method']].format(v=r['value'])} | {r['runs']} | "
                     f"{r['tokens_per_s']:,.1f} | {r['vs_stride1']:,.1f}x |")  # fmt: skip
    return "\n".join(lines)

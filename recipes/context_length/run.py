"""The context-length study (issue 11): train every model family at one context length, evaluate it at others.

    python -m recipes.context_length.run        # the whole study: PTB words + chars, 500 updates per model
    python -m recipes.context_length.run --datasets ptb_chars --size tiny --train-length 64 --max-update 400 \
        --eval-max-tokens 10000 --out runs/ctx     # the reduced run of the README

For every dataset (PTB words and PTB characters, binarized from ../shared/data when missing) it trains, at
one training length and matched parameter count (except the Universal Transformer: one shared layer, fewer parameters), with ``fairseq-train`` on ``segment_lm``:

| model | what | sees the past through |
|---|---|---|
| ``lstm`` | ``lstm_stateful_*`` (parameter-matched presets) | (h, c) carried across segments |
| ``full_<pos>`` | full attention with ``--pos-emb`` sinusoidal, learned, rotary, alibi, none, relative | the window only |
| ``xl`` | Transformer-XL: relative attention + ``--mem-len`` = training length | its memory |
| ``universal`` | one shared layer applied at every depth + timestep signal (same FLOPs, fewer parameters) | the window only |
| ``linear`` | HOOK: linear attention (issue: "Transformers are RNNs"), added automatically once ``--attention linear`` is registered | its state |

then evaluates each checkpoint with ``recipes.context_eval`` at 0.25x ... 8x the training length, as fixed
windows and (for the LSTM and XL) as streams with the state carried, and writes ``OUT/results.json``,
``OUT/results.md`` (one table per dataset: metric per model and length) and ``OUT/context_length.png``
(metric vs evaluation length, one line per model; dashed: stream mode).

``--checkpoints NAME=PATH ...`` skips the training and evaluates models trained elsewhere (a checkpoint, or a
``slurm.launch`` run directory: its ``checkpoints/checkpoint_best.pt``), e.g. the word-level studies' models
(docs/studies/context_length.md).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.path.abspath(__file__)).parents[2]
BIN = Path(sys.executable).parent

# Sizes: ``tiny`` (2 layers x 64, ~0.1M parameters: the reduced CPU run) and ``small`` (the study: PTB chars
# 4 x 128 ~0.8M; PTB words 4 x 256 ~5.7M with the word presets). LSTM presets are matched to the full model.
SIZES = {
    "tiny": {"full": "full_tiny", "xl": "xl_tiny", "universal": "universal_tiny", "lstm": "lstm_stateful_tiny"},
    "small": {"full": "full_small", "xl": "xl_small", "universal": "universal_small", "lstm": "lstm_stateful_chars"},
    "ptb": {"full": "full_ptb", "xl": "xl_ptb", "universal": "full_ptb", "lstm": "lstm_stateful_ptb"},
}
DATASETS = {  # name: (data-bin dir name, training length, size used by the full study)
    "ptb_chars": ("ptb-chars", 128, "small"),
    "ptb": ("ptb", 32, "ptb"),
}
POSITIONS = ("sinusoidal", "learned", "rotary", "alibi", "none", "relative")


def model_args(name: str, presets: dict, train_length: int) -> list:
    """fairseq-train arguments of study model ``name`` at the given preset size."""
    if name == "lstm":
        return ["--arch", presets["lstm"]]  # its --lr comes last (train_command): see --lstm-lr
    if name == "xl":
        return ["--arch", presets["xl"], "--mem-len", str(train_length)]
    if name == "universal":
        return ["--arch", presets["universal"], "--share-layers", "--share-layers-timestep-emb"]
    if name == "full_relative":
        return ["--arch", presets["full"], "--attention", "relative", "--pos-emb", "relative"]
    if name.startswith("full_"):
        return ["--arch", presets["full"], "--pos-emb", name[len("full_") :]]
    if name == "linear":  # HOOK (linear attention is being added): its state plays the role of XL's memory
        return ["--arch", presets["full"], "--attention", "linear", "--pos-emb", "none"]
    raise ValueError(name)


def linear_attention_available() -> bool:
    """HOOK: the ``linear`` model joins the study once ``plugins/attention/linear.py`` is registered."""
    return (ROOT / "plugins" / "attention" / "linear.py").exists()


def all_models() -> list:
    models = ["lstm", *(f"full_{p}" for p in POSITIONS), "xl", "universal"]
    return models + (["linear"] if linear_attention_available() else [])


def ensure_data(name: str, data_root: Path, shared: Path) -> Path:
    """data_root/<dir>, binarized from ../shared/data/ptb with preprocess/ when missing."""
    out = data_root / DATASETS[name][0]
    if (out / "dict.txt").exists():
        return out
    raw = shared / "ptb"
    if not raw.exists():
        raise SystemExit(f"error: {raw} not found: the study needs PTB from ../shared/data (or give --data-root)")
    if name == "ptb":
        cmd = [sys.executable, "-m", "preprocess.ptb", "--raw", raw, "--out", out]
    else:
        import lzma

        text = out.parent / "ptb-raw"
        text.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            (text / f"{split}.txt").write_bytes(lzma.open(raw / f"ptb.{split}.txt.xz").read())
        cmd = [sys.executable, "-m", "preprocess.text", "--level", "char", "--binarizer", "fast", "--out", out,
               *(a for s in ("train", "valid", "test") for a in (f"--{s}", text / f"{s}.txt"))]  # fmt: skip
    print("binarizing:", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
    return out


def train_command(data: Path, save: Path, args_model: list, train_length: int, a) -> list:
    return [
        str(BIN / "fairseq-train"), str(data), "--user-dir", str(ROOT / "plugins"), "--task", "segment_lm",
        "--criterion", "aux_cross_entropy", *args_model, "--tokens-per-sample", str(train_length),
        "--batch-size", str(a.batch_size), "--optimizer", "adam", "--lr", str(a.lr), "--lr-scheduler", "cosine",
        "--warmup-updates", str(max(1, a.max_update // 10)), "--warmup-init-lr", "1e-7", "--clip-norm", "0.5",
        "--max-update", str(a.max_update), "--disable-validation", "--no-epoch-checkpoints", "--save-dir", str(save),
        "--seed", str(a.seed), "--num-workers", "0", "--log-format", "simple", "--log-interval", "50",
        *(["--cpu"] if a.cpu else []),
        *(["--lr", str(a.lstm_lr)] if "lstm_stateful" in " ".join(args_model) else []),  # the last --lr wins
    ]  # fmt: skip


def run_parallel(tasks: list, parallel: int, what: str) -> None:
    """Run (job, command, log file) tasks, ``parallel`` at a time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    pending, running = list(tasks), []
    while pending or running:
        while pending and len(running) < parallel:
            job, cmd, log_path = pending.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"{what}:", " ".join(map(str, cmd)), flush=True)
            log = open(log_path, "w")
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((job, proc, log, log_path, time.time()))
        time.sleep(1)
        for entry in list(running):
            job, proc, log, log_path, start = entry
            if proc.poll() is not None:
                log.close()
                running.remove(entry)
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {log_path}"
                print(f"  {what} {job['dataset']}/{job['model']}: {status} in {time.time() - start:.0f} s", flush=True)


def train_all(jobs: list, parallel: int) -> None:
    """Train every model that has no checkpoint yet."""
    todo = [j for j in jobs if not (j["save"] / "checkpoint_last.pt").exists()]
    run_parallel([(j, j["cmd"], j["save"] / "train.log") for j in todo], parallel, "train")


def eval_command(job: dict, a) -> list:
    cmd = [sys.executable, "-m", "recipes.context_eval", "--path", str(job["checkpoint"]),
           "--data", str(job["data"]), "--length-factors", a.length_factors, "--mode", "both", "--subset", a.subset,
           "--streams", str(a.streams), "--name", job["model"], "--out", str(job["save"] / "context_eval")]  # fmt: skip
    if a.eval_max_tokens:
        cmd += ["--max-tokens", str(a.eval_max_tokens)]
    return cmd + (["--cpu"] if a.cpu else [])


def evaluate_all(jobs: list, a) -> dict:
    """context_eval of every trained model (``parallel`` at a time, one thread each); an evaluation newer
    than its checkpoint with the same command is reused."""
    for job in jobs:
        job["eval_cmd"] = eval_command(job, a)
        job["report"] = job["save"] / "context_eval" / "context_eval.json"
    todo = []
    for job in jobs:
        if not job["checkpoint"].exists():
            continue
        report = job["report"]
        if report.exists() and report.stat().st_mtime > job["checkpoint"].stat().st_mtime:
            if json.loads(report.read_text()).get("command") == job["eval_cmd"][3:]:
                continue
        todo.append(job)
    run_parallel([(job, job["eval_cmd"], job["save"] / "context_eval.log") for job in todo], a.parallel, "eval")
    reports = {}
    for job in jobs:
        if job["report"].exists():
            reports.setdefault(job["dataset"], {})[job["model"]] = json.loads(job["report"].read_text())
    return reports


def write_summary(reports: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(reports, indent=1))
    lines = []
    for dataset, models in reports.items():
        first = next(iter(models.values()))
        metric, L = first["metric"], first["train_length"]
        lengths = sorted({r["length"] for m in models.values() for r in m["results"]})
        lines += [f"### {dataset}: {metric} on {first['subset']} ({first['targets']} {first['unit']}s), trained at "
                  f"{L} tokens", "",
                  "| model | params | mode |" + "".join(f" {n} |" for n in lengths),
                  "|---|---:|---|" + "---:|" * len(lengths)]  # fmt: skip
        for name, rep in models.items():
            for mode in ("window", "stream"):
                at = {r["length"]: r for r in rep["results"] if r["mode"] == mode}
                if all("skipped" in r for r in at.values()) and mode == "stream":
                    continue
                cells = ["—" if "skipped" in at[n] else f"{at[n][metric]:.3f}" for n in lengths]
                lines.append(f"| {name} | {rep['params']:,} | {mode} |" + "".join(f" {c} |" for c in cells))
        lines.append("")
    lines.append("—: not evaluable (learned positions beyond their table).")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(reports, out / "context_length.png")


def plot(reports: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(7 * len(reports), 5), squeeze=False)
    for ax, (dataset, models) in zip(axes[0], reports.items()):
        first = next(iter(models.values()))
        for i, (name, rep) in enumerate(models.items()):
            color = plt.cm.tab10(i % 10)
            for mode, style in (("window", "-"), ("stream", "--")):
                pts = [(r["length"], r[rep["metric"]]) for r in rep["results"] if r["mode"] == mode and "loss" in r]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color,
                            label=name if mode == "window" else f"{name} (stream)")  # fmt: skip
        ax.axvline(first["train_length"], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"evaluation length ({first['unit']}s); dotted: training length")
        ax.set_ylabel(f"test {first['metric']}")
        ax.set_title(f"{dataset}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_jobs(a, out: Path) -> list:
    """One training (then evaluation) job per dataset and model of the study."""
    models = a.models.split(",") if a.models else all_models()
    jobs = []
    for dataset in a.datasets.split(","):
        data = ensure_data(dataset, Path(a.data_root), Path(a.shared))
        _, default_length, default_size = DATASETS[dataset]
        length = a.train_length or default_length
        presets = SIZES[a.size or default_size]
        for name in models:
            save = out / dataset / name
            cmd = train_command(data, save, model_args(name, presets, length), length, a)
            jobs.append({"dataset": dataset, "model": name, "data": data, "save": save, "cmd": cmd,
                         "checkpoint": save / "checkpoint_last.pt"})  # fmt: skip
    return jobs


def checkpoint_jobs(items: list, datasets: str, data_root: Path, shared: Path, out: Path) -> list:
    """Evaluation jobs for ``--checkpoints NAME=PATH ...`` (models trained elsewhere, e.g. by the studies'
    launcher runs), all on the one dataset of ``--datasets``; a bad item stops here, before any work."""
    if "," in datasets:
        raise SystemExit(f"error: --checkpoints evaluates on one dataset; got --datasets {datasets}")
    jobs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --checkpoints expects NAME=PATH items, got '{item}'")
        path = Path(path)
        checkpoint = path / "checkpoints" / "checkpoint_best.pt" if path.is_dir() else path
        if not checkpoint.is_file():
            raise SystemExit(f"error: --checkpoints {item}: {checkpoint} not found (train that run first)")
        jobs.append({"dataset": datasets, "model": name, "save": out / datasets / name, "checkpoint": checkpoint})
    data = ensure_data(datasets, data_root, shared)
    for job in jobs:
        job["data"] = data
    return jobs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ptb_chars,ptb", help="comma-separated: ptb_chars, ptb")
    p.add_argument("--models", default=None, help=f"comma-separated subset of: {', '.join(all_models())}")
    p.add_argument("--size", choices=sorted(SIZES), help="model size for every dataset (default: per dataset)")
    p.add_argument("--train-length", type=int, help="training length (default: 128 chars, 32 words)")
    p.add_argument("--max-update", type=int, default=500, help="updates per model")
    p.add_argument("--batch-size", type=int, default=16, help="streams per batch")
    p.add_argument("--lr", type=float, default=0.002, help="Adam peak learning rate (cosine decay, 10%% warmup)")
    p.add_argument(
        "--lstm-lr",
        type=float,
        default=0.005,
        help="the LSTM's peak learning rate: at the transformers' 0.002 it sits longer on the unigram plateau "
        "(2 x 77 on PTB chars, 150 updates: 3.12 bpc at 0.005, 3.65 at 0.002)",
    )
    p.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="NAME=PATH",
        help="evaluate these trained models instead of training the study's (one dataset in --datasets): "
        "a checkpoint file, or a launcher run directory (its checkpoints/checkpoint_best.pt), e.g. "
        "lstm=runs/study_context_length_ptb_words/lr=0.003",
    )
    p.add_argument("--length-factors", default="0.25,0.5,1,2,4,8", help="evaluation lengths / training length")
    p.add_argument("--subset", default="test", help="evaluation split")
    p.add_argument("--eval-max-tokens", type=int, default=50000, help="score the first N tokens (0: all)")
    p.add_argument("--streams", type=int, default=4, help="stream-mode evaluation: contiguous streams")
    p.add_argument("--parallel", type=int, default=2, help="trainings at a time (one thread each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-root", default=str(ROOT / "data-bin"), help="binarized data (created when missing)")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="raw PTB (../shared/data)")
    p.add_argument("--out", default=str(ROOT / "runs" / "context_length"), help="output directory")
    p.add_argument("--cpu", action="store_true", default=True, help="train and evaluate on CPU (default)")
    p.add_argument("--gpu", dest="cpu", action="store_false", help="use the GPU")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if a.checkpoints:
        jobs = checkpoint_jobs(a.checkpoints, a.datasets, Path(a.data_root), Path(a.shared), out)
    else:
        jobs = training_jobs(a, out)
        train_all(jobs, a.parallel)
        print(f"training: {time.time() - start:.0f} s", flush=True)
    reports = evaluate_all(jobs, a)
    write_summary(reports, out)
    print((out / "results.md").read_text())
    print(f"total: {time.time() - start:.0f} s; figure: {out / 'context_length.png'}")


if __name__ == "__main__":
    main()

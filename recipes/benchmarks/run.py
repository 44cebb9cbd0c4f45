"""The benchmark suite: every registered mechanism side by side, and each mechanism's own cases, in one run.

    python -m recipes.benchmarks.run --quick              # CPU, under 20 min on 2 cores (see docs/benchmarks.md)
    python -m recipes.benchmarks.run                      # the full suite (long; meant for a GPU box)
    python -m recipes.benchmarks.run --smoke              # tiny sizes, in-process, layer + generation + mechanisms (CI)
    python -m recipes.benchmarks.run --only layer,generation --device cuda

Sections (``--only``): ``layer`` (one attention layer fwd+bwd, time and peak memory vs N, with the public
peers installed by ``recipes/benchmarks/install_peers.sh``), ``generation`` (fairseq's generator, ms per
token vs position), ``mechanisms`` (each mechanism against its own alternative: adaptive span's trimming,
compressive vs XL memory over the same past, linear attention's decoding and backward, reversible LSH
models vs depth; ``--mechanism-cases``), ``training`` (``fairseq-train`` tokens/s: ours vs fairseq's
``transformer_lm``, ``xl_small`` vs ``full_small`` with memory 0 / T / 2T, ``linear_tiny`` vs ``full_tiny`` at
4,096-token segments; ``--training-cases``),
``evaluation`` (``fairseq-eval-lm`` with memory vs stride-1 sliding windows), ``quality`` (every ``*_tiny``
preset at ``full_tiny``'s size trained on the same tokens of real data), ``gpu`` (bf16 MFU of
``xl_enwik8_base`` / ``full_enwik8`` at their paper segment length; CUDA only). Every case runs in its own
process under ``--case-timeout`` seconds and ``--mem-cap-gb`` of address space (CPU): a crash, a timeout or
an OOM is a row saying so.

Output in ``<out>/<stamp>/``: ``results.jsonl`` (one line per case, with the settings), ``summary.md``
(tables with ratios and the goals met / not met), ``layer_scaling.png``, ``generation.png``,
``quality_vs_speed.png`` (one panel per dataset). Compare ratios within one run: the machine is shared and
absolute times drift.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional

from recipes.benchmarks.suite import evaluation, generation, layer, mechanisms, plots, quality, training
from recipes.benchmarks.suite.isolate import REPO, failure_status, run_case

SECTIONS = ("layer", "generation", "mechanisms", "training", "evaluation", "quality", "gpu")
SIZES = {  # setting: (full, --quick, --smoke); a flag of the same name overrides it
    "lengths": ([512, 1024, 2048, 4096, 8192, 16384], [512, 1024, 2048, 4096], [64, 128]),
    "gen_tokens": (4096, 1024, 192),
    "quality_data": (list(quality.DATASETS), ["ptb-chars"], ["ptb-chars"]),
    "quality_updates": (3000, 300, 6),
    "quality_batch": (16, 8, 2),
    "quality_segment": (128, 128, 32),
    # test tokens fairseq-eval-lm scores per quality run (0: the whole test split); a prefix of the split
    "quality_test_tokens": (0, 16384, 2048),
}


def _positive_ints(text: str) -> List[int]:
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive integers")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return value


def _names(choices) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(choices))
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"'{text}': choose from {', '.join(choices)}")
        return names

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true",
        help="CPU-sized: N up to 4096, 1k generated tokens, small training/evaluation cases, quality on PTB "
             "characters only (300 updates, test scored on its first --quality-test-tokens)",
    )  # fmt: skip
    p.add_argument(
        "--smoke", action="store_true",
        help="tiny sizes, cases in this process, sections layer,generation,mechanisms unless --only: checks the logic (CI)",
    )  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--summarize", metavar="RUN_DIR", help="only rebuild summary.md and the figures of an earlier run")
    p.add_argument("--out", default="runs/benchmarks/suite", help="output directory (a stamped run dir inside)")
    p.add_argument(
        "--only", type=_names(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all)"
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every case")
    p.add_argument("--case-timeout", type=float, default=600, help="seconds before a case is stopped")
    p.add_argument("--mem-cap-gb", type=float, default=16, help="address-space cap of a CPU case (0: none)")
    p.add_argument("--peers-path", default=str(REPO / "runs" / "peers"), help="folder of install_peers.sh")
    g = p.add_argument_group("layer section")
    g.add_argument(
        "--lengths", dest="lengths_arg", type=_positive_ints,
        help="comma-separated N of the layer section (default: by mode, up to 16384)",
    )  # fmt: skip
    g.add_argument(
        "--mechanisms", type=lambda text: [m for m in text.split(",") if m],
        help="comma-separated attentions of the layer section, with their peers (default: every registered one; "
             "full, the SDPA reference, is always measured)",
    )  # fmt: skip
    g.add_argument("--dim", type=int, default=256, help="model dim of the layer cases (heads: --heads)")
    g.add_argument("--heads", type=int, default=4, help="attention heads of the layer cases")
    g = p.add_argument_group("mechanisms, training and evaluation sections")
    g.add_argument(
        "--mechanism-cases", type=_names(mechanisms.CASES), default=list(mechanisms.CASES),
        help=f"cases of the mechanisms section, of {', '.join(mechanisms.CASES)} (default: all)",
    )  # fmt: skip
    g.add_argument(
        "--training-cases", type=_names(training.CASES), default=list(training.CASES),
        help="comparisons of the training section: fairseq (efficient_lm full vs fairseq transformer_lm), "
             "xl (xl_small with memory 0, T, 2T vs full_small), linear (linear_tiny vs full_tiny at 4,096-token "
             "segments) (default: all)",
    )  # fmt: skip
    g.add_argument(
        "--training-repeats", type=_positive_int,
        help="training: interleaved repeats of every configuration (every configuration, then again); the paired "
             "ratio is the median of the per-repeat ratios (default: 3; 1 with --quick or --smoke)",
    )  # fmt: skip
    g.add_argument("--contexts", type=_positive_ints, help="evaluation: effective contexts C (default: 256,800)")
    g.add_argument("--eval-segments", type=_positive_ints, help="evaluation: segment lengths T_eval of the memory runs")
    g.add_argument("--sliding-batch-sizes", type=_positive_ints, help="evaluation: windows per stride-1 forward")
    g.add_argument("--slice-tokens", type=int, help="evaluation: test tokens of the stride-1 runs")
    g = p.add_argument_group("quality section")
    g.add_argument(
        "--quality-data", type=_names(quality.DATASETS), default=None,
        help=f"datasets, of {', '.join(quality.DATASETS)} (default: all; ptb-chars with --quick)",
    )  # fmt: skip
    g.add_argument("--quality-updates", type=int, help="updates of every preset (default: 3000; 300 with --quick)")
    g.add_argument(
        "--quality-test-tokens", type=int,
        help="score the first this many tokens of the test split (0: all of it; default 0, "
             f"{SIZES['quality_test_tokens'][1]} with --quick)",
    )  # fmt: skip
    g.add_argument(
        "--parallel", type=int, default=None,
        help="quality runs trained at the same time (default: cores / --threads with --quick, else 1)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.only is None:
        a.only = ["layer", "generation", "mechanisms"] if a.smoke else list(SECTIONS)
    a.isolate = not a.smoke
    if a.parallel is None:
        a.parallel = max(1, (os.cpu_count() or 1) // a.threads) if a.quick else 1
    a.level = level = 2 if a.smoke else 1 if a.quick else 0
    for name, values in SIZES.items():
        if getattr(a, name, None) is None:
            setattr(a, name, values[level])
    a.lengths = a.lengths_arg or a.lengths
    a.evaluation = {name: values[level] for name, values in evaluation.SIZES.items()}
    for name in ("contexts", "eval_segments", "sliding_batch_sizes", "slice_tokens"):
        if getattr(a, name) is not None:
            a.evaluation[name] = getattr(a, name)
    if min(a.evaluation["contexts"]) < 2:
        p.error("--contexts must be >= 2")
    if a.quality_test_tokens < 0 or a.quality_updates < 1 or a.evaluation["slice_tokens"] < 1:
        p.error(
            "--quality-test-tokens must be >= 0 (0: the whole test split), --quality-updates and --slice-tokens >= 1"
        )
    if a.smoke:
        a.dim, a.heads = 32, 2
    return a


def layer_section(a, env, emit) -> List[Dict]:
    from recipes.benchmarks.suite.peers import PEERS

    wanted = None if not a.mechanisms else {"full", *a.mechanisms}
    specs = [c for c in layer.cases(a.lengths, a.dim, a.heads, a.device) if not wanted or c["attention"] in wanted]
    for peer, entry in PEERS.items():  # with the option variants of the mechanism it is compared with
        if wanted and entry.mechanism not in wanted:
            continue
        for label, options in layer.VARIANTS.get(entry.mechanism, [("", {})]):
            if entry.variants and label not in entry.variants:
                continue
            for n in a.lengths:
                specs.append(dict(peer=peer, mechanism=entry.mechanism, label=label, N=n, D=a.dim, H=a.heads,
                                  options=layer.resolve(options, n), device=a.device))  # fmt: skip
    # By N: every case runs close in time to its SDPA reference, so the ratios hold when the load changes.
    specs.sort(key=lambda spec: spec["N"])
    rows = []
    for spec in specs:
        row = run_case("layer", spec, a.case_timeout, a.mem_cap_gb if a.device == "cpu" else None, env, a.isolate)
        if row["status"] == "error" and "No module named" in row.get("error", "") and spec.get("peer"):
            row["status"] = "not installed"
        rows.append(emit("layer", row))
    layer.add_ratios(rows)
    return rows


def generation_section(a, env, emit) -> List[Dict]:
    rows = []
    for case in generation.CASES:
        spec = {**case, "tokens": a.gen_tokens, "L": 2, "D": a.dim, "H": a.heads, "device": a.device}
        rows.append(emit("generation", run_case("generation", spec, a.case_timeout, None, env, a.isolate)))
    return rows


def mechanisms_section(a, env, emit) -> List[Dict]:
    cap = a.mem_cap_gb if a.device == "cpu" else None
    return [emit("mechanisms", run_case("mechanism", spec, a.case_timeout, cap, env, a.isolate))
            for spec in mechanisms.specs(a.mechanism_cases, a.level, a.device)]  # fmt: skip


def training_section(a, env, run_dir: Path, emit) -> List[Dict]:
    if a.device != "cpu":
        return [emit("training", {"status": "skipped", "error": "the training section runs fairseq-train --cpu"})]
    rows = training.measure(a.training_cases, a.level, env, run_dir, a.case_timeout, a.training_repeats)
    return [emit("training", r) for r in rows]


def evaluation_section(a, env, run_dir: Path, emit) -> List[Dict]:
    if a.device != "cpu":
        return [emit("evaluation", {"status": "skipped", "error": "the evaluation section runs fairseq-eval-lm --cpu"})]
    try:
        rows = evaluation.measure(a.evaluation, env, run_dir)
    except RuntimeError as e:
        return [emit("evaluation", {"status": "error", "error": str(e)[-300:]})]
    return [emit("evaluation", r) for r in rows]


def quality_section(a, env, run_dir: Path, emit) -> List[Dict]:
    from concurrent.futures import ThreadPoolExecutor

    from fairseq.data import Dictionary

    jobs = []
    for dataset in a.quality_data:
        data = quality.DATASETS[dataset](REPO / "runs" / "benchmarks" / "data")
        quality.test_prefix(data, a.quality_test_tokens)
        dictionary = Dictionary.load(str(data / "dict.txt"))
        target, _ = quality.parameter_count(quality.REFERENCE, dictionary, {}, a.quality_segment)
        for preset in quality.tiny_presets():
            sized = quality.sized_overrides(preset, dictionary, target, a.quality_segment)
            jobs.append((preset, data, run_dir / "quality" / dataset / preset, sized))
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        rows = list(pool.map(lambda job: quality.train_and_eval(*job[:3], a, env, job[3]), jobs))
    quality.add_param_ratios(rows)
    return [emit("quality", r) for r in rows]


def gpu_section(a, env, emit) -> List[Dict]:
    import torch

    if a.device != "cuda" or not torch.cuda.is_available():
        return [emit("gpu", {"status": "skipped", "error": "no CUDA device: MFU is measured on GPU only"})]
    presets = [  # paper sizes and segment lengths (presets/transformer_xl.py, presets/full.py)
        {"attention": "full", "label": "full_enwik8", "options": {"pos_emb": "sinusoidal"}},
        {"attention": "relative", "label": "xl_enwik8_base", "options": {"pos_emb": "relative", "mem_len": 512}},
    ]
    return [emit("gpu", run_case("gpu", {**p, "L": 12, "D": 512, "H": 8, "segment": 512, "batch": 22, "steps": 10,
                                         "device": "cuda"}, a.case_timeout, None, env)) for p in presets]  # fmt: skip


def versions() -> Dict[str, str]:
    """Python, torch, fairseq and numpy versions, and the git commit of this checkout (+dirty if plugins/ is)."""
    out = {"python": platform.python_version()}
    for dist, key in (("torch", "torch"), ("fairseq-fixed", "fairseq"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "plugins"], cwd=REPO, capture_output=True, text=True)
        out["git"] = commit.stdout.strip() + ("+dirty(plugins)" if dirty.stdout.strip() else "")
    except OSError:
        out["git"] = "?"
    return out


def start_run(out_arg: str, threads: int):
    """The stamped run directory ``<out>/<stamp>/`` and the environment of every measured command."""
    out = Path(out_arg) if Path(out_arg).is_absolute() else REPO / out_arg
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    return stamp, run_dir, env


def write_report(rows: Dict[str, List[Dict]], meta: Dict, a, seconds: Optional[float], run_dir: Path) -> str:
    """The figures and ``summary.md`` of a run, from its rows."""
    from recipes.benchmarks.suite.summary import summarize

    if rows["layer"]:
        plots.layer_scaling(rows["layer"], run_dir / "layer_scaling.png")
    if rows["generation"]:
        plots.generation_profile(rows["generation"], run_dir / "generation.png", generation.WINDOW)
    if rows["quality"]:
        plots.quality_vs_speed(rows["quality"], run_dir / "quality_vs_speed.png")
    text = summarize(rows, meta, a, seconds)
    (run_dir / "summary.md").write_text(text)
    return text


def resummarize(run_dir: Path) -> Path:
    """Rebuild ``summary.md`` and the figures of an earlier run from its ``results.jsonl`` (``--summarize``)."""
    results = run_dir / "results.jsonl"
    records = (
        [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    )
    if not records:
        sys.exit(f"error: {results} is missing or empty: pass the directory of a suite run")
    first = records[0]
    a = argparse.Namespace(**first["settings"])
    meta = {key: first[key] for key in ("date", "machine", "versions")}
    rows = {s: [] for s in SECTIONS}
    for record in records:
        row = {k: v for k, v in record.items() if k not in ("settings", *meta)}
        if row["status"] == "error" and row.get("returncode") is not None:  # classified by today's rules
            row["status"] = failure_status(row["returncode"], row.get("error", ""))
        rows.setdefault(row["section"], []).append(row)
    layer.add_ratios(rows["layer"])
    quality.add_param_ratios(rows["quality"])
    a.level = getattr(a, "level", 2 if a.smoke else 1 if a.quick else 0)
    print(write_report(rows, meta, a, None, run_dir))
    return run_dir


def main(argv=None) -> Path:
    a = parse_args(argv)
    if a.summarize:
        return resummarize(Path(a.summarize))
    from fairseq import utils

    utils.import_user_module(argparse.Namespace(user_dir=str(REPO / "plugins")))  # as fairseq-* --user-dir does
    from plugins.attention import ATTENTION_REGISTRY

    unknown = sorted(set(a.mechanisms or []) - set(ATTENTION_REGISTRY))
    if unknown:
        sys.exit(
            f"error: --mechanisms {','.join(unknown)}: not registered; choose from {', '.join(ATTENTION_REGISTRY)}"
        )
    stamp, run_dir, env = start_run(a.out, a.threads)
    if Path(a.peers_path).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), a.peers_path, env.get("PYTHONPATH")]))
        sys.path.append(a.peers_path)  # for the cases run in this process (--smoke)
    import torch

    torch.set_num_threads(a.threads)
    settings = {k: v for k, v in vars(a).items()}
    meta = {
        "date": stamp,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
    }
    results = run_dir / "results.jsonl"

    def emit(section: str, row: Dict) -> Dict:
        row = {"section": section, **row}
        with open(results, "a") as f:
            f.write(json.dumps({**row, "settings": settings, **meta}) + "\n")
        print(f"[{section}] {plots.label(row) if 'attention' in row or 'peer' in row else row.get('preset') or row.get('model') or row.get('case', '')} "
              f"{row.get('N', '')} {row['status']}", flush=True)  # fmt: skip
        return row

    started = time.time()
    rows = {s: [] for s in SECTIONS}
    if "layer" in a.only:
        rows["layer"] = layer_section(a, env, emit)
    if "generation" in a.only:
        rows["generation"] = generation_section(a, env, emit)
    if "mechanisms" in a.only:
        rows["mechanisms"] = mechanisms_section(a, env, emit)
    if "training" in a.only:
        rows["training"] = training_section(a, env, run_dir, emit)
    if "evaluation" in a.only:
        rows["evaluation"] = evaluation_section(a, env, run_dir, emit)
    if "quality" in a.only:
        rows["quality"] = quality_section(a, env, run_dir, emit)
    if "gpu" in a.only:
        rows["gpu"] = gpu_section(a, env, emit)
    text = write_report(rows, meta, a, time.time() - started, run_dir)
    print("\n" + text)
    print(f"\nresults: {results}\nsummary: {run_dir / 'summary.md'}")
    return run_dir


if __name__ == "__main__":
    main()

"""Quality at equal budget: every ``*_tiny`` preset trained on the same real data for the same tokens.

Datasets (``../shared/data``): PTB characters (bits per character) and WikiText-2 words (perplexity).
Each preset runs the real ``fairseq-train`` (``--task segment_lm``, same segment length, batch, optimizer
and number of updates for all, so every model sees the same tokens), then ``fairseq-eval-lm`` on the test
split (or on its first ``--quality-test-tokens`` tokens, the split ``test_first<N>``); the row holds valid and test bpc or perplexity, parameters, train tokens/s (fairseq's ``wps``,
median interval after the first) and the peak resident memory of the training process (``wait4``).

Equal size: a preset whose parameter count (on that dataset's dictionary) is more than 10% away from
``full_tiny``'s is resized by one knob, the width of its feed-forward sublayer (``--decoder-ffn-embed-dim``)
or, for presets without one (all-attention), its persistent slots (``--persistent-mem-size``), to the
value that brings it closest to ``full_tiny``; the row says which (``sized``). Everything else about the
preset (its mechanism, depth, width, heads, memory) is kept.
"""

import lzma
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from recipes.results import parse_log

from .isolate import REPO

BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared" / "data"


def tiny_presets() -> List[str]:
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "efficient_lm" and a.endswith("_tiny"))


def _need(source: Path) -> Path:
    if not source.exists():
        raise SystemExit(f"error: {source} is missing: the quality section needs ../shared/data (see README)")
    return source


def prepare_ptb_chars(dest: Path) -> Path:
    """PTB (Mikolov's text, ../shared/data) at the character level, binarized once."""
    out = dest / "ptb-chars"
    if (out / "dict.txt").exists():
        return out
    raw = dest / "ptb-raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        source = _need(SHARED / "ptb" / f"ptb.{split}.txt.xz")
        (raw / f"{split}.txt").write_bytes(lzma.decompress(source.read_bytes()))
    splits = [a for s in ("train", "valid", "test") for a in (f"--{s}", raw / f"{s}.txt")]
    cmd = [sys.executable, "-m", "preprocess.text", *splits, "--level", "char", "--out", out]
    subprocess.run(list(map(str, cmd)), check=True, cwd=REPO, capture_output=True)
    return out


def prepare_wikitext2(dest: Path) -> Path:
    """WikiText-2 (the official tokenized files in ../shared/data) at the word level, binarized once."""
    out = dest / "wikitext-2"
    if (out / "dict.txt").exists():
        return out
    cmd = [sys.executable, "-m", "preprocess.wikitext", "--variant", "2", "--raw", _need(SHARED / "wikitext-2"),
           "--out", out, "--workers", "1"]  # fmt: skip
    subprocess.run(list(map(str, cmd)), check=True, cwd=REPO, capture_output=True)
    return out


DATASETS = {"ptb-chars": prepare_ptb_chars, "wikitext-2": prepare_wikitext2}
SIZE_KNOBS = ("decoder_ffn_embed_dim", "persistent_mem_size")  # the first one a preset sets > 0 is resized
REFERENCE = "full_tiny"


def parameter_count(preset: str, dictionary, overrides: Dict, segment: int) -> Tuple[int, object]:
    """Parameters of ``preset`` built on ``dictionary`` (as fairseq builds it), and its config."""
    from types import SimpleNamespace

    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    args = SimpleNamespace(**overrides)
    ARCH_CONFIG_REGISTRY[preset](args)  # presets only fill what is not set
    model_cls = ARCH_MODEL_REGISTRY[preset]
    cfg = model_cls.__dataclass()
    for name, value in vars(args).items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    cfg.tokens_per_sample = cfg.max_target_positions = segment
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    model = model_cls.build_model(cfg, task)
    return sum(p.numel() for p in model.parameters()), cfg


def sized_overrides(preset: str, dictionary, target: int, segment: int, tolerance: float = 0.10) -> Dict:
    """``{knob: value}`` that brings ``preset`` within ``tolerance`` of ``target`` parameters ({} if it is)."""
    params, cfg = parameter_count(preset, dictionary, {}, segment)
    knob = next((k for k in SIZE_KNOBS if getattr(cfg, k, 0) > 0), None)
    if abs(params / target - 1) <= tolerance or knob is None:
        return {}
    start = getattr(cfg, knob)
    per_unit = (parameter_count(preset, dictionary, {knob: start + 64}, segment)[0] - params) / 64  # linear in it
    return {knob: max(1, round(start + (target - params) / per_unit))}


def test_split(test_tokens: int) -> str:
    """The ``--gen-subset`` the quality runs score: ``test``, or ``test_first<N>`` (``test_prefix``)."""
    return f"test_first{test_tokens}" if test_tokens else "test"


def test_prefix(data: Path, test_tokens: int) -> str:
    """Write the split ``test_first<N>`` of ``data``: the test split's first sentences up to ``test_tokens``
    tokens, in order (the streams of ``segment_lm`` read it as they read ``test``); return its name. 0: the
    whole ``test`` split, nothing written."""
    from fairseq.data import Dictionary, data_utils, indexed_dataset

    split = test_split(test_tokens)
    if not test_tokens or (data / f"{split}.idx").exists():
        return split
    dictionary = Dictionary.load(str(data / "dict.txt"))
    test = data_utils.load_indexed_dataset(str(data / "test"), dictionary)
    if test is None:
        raise SystemExit(f"error: {data}/test.bin is missing: re-binarize {data.name} with a test split")
    builder = indexed_dataset.make_builder(str(data / f"{split}.bin"), impl="mmap", vocab_size=len(dictionary))
    total = 0
    for i in range(len(test)):
        if total >= test_tokens:
            break
        item = test[i][: test_tokens - total]
        builder.add_item(item)
        total += item.numel()
    builder.finalize(str(data / f"{split}.idx"))
    return split


def train_and_eval(preset: str, data: Path, run_dir: Path, a, env: Dict[str, str], overrides: Dict = None) -> Dict:
    """Train ``preset`` (with the size ``overrides``) on ``data``, evaluate on test: one row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    device = ["--cpu"] if a.device == "cpu" else []
    common = [str(data), "--user-dir", str(REPO / "plugins"), "--task", "segment_lm", *device, "--num-workers", "0"]
    train = [
        str(BIN / "fairseq-train"), *common, "--arch", preset, "--criterion", "aux_cross_entropy",
        "--tokens-per-sample", str(a.quality_segment), "--batch-size", str(a.quality_batch),
        "--optimizer", "adam", "--lr", "0.002", "--lr-scheduler", "cosine", "--warmup-updates", "20",
        "--clip-norm", "0.25", "--max-update", str(a.quality_updates), "--seed", "1",
        "--log-format", "simple", "--log-interval", "20", "--save-dir", str(run_dir), "--no-epoch-checkpoints",
        *[arg for knob, value in overrides.items() for arg in (f"--{knob.replace('_', '-')}", str(value))],
    ]  # fmt: skip
    sized = ", ".join(f"{knob} {value}" for knob, value in overrides.items())
    row: Dict = {"preset": preset, "dataset": data.name, "sized": sized, "command": " ".join(train)}
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
                "--gen-subset", test_split(a.quality_test_tokens), "--tokens-per-sample", str(a.quality_segment), "--batch-size", "1"]  # fmt: skip
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
    """``params_vs_full``: parameters over ``full_tiny``'s on the same dataset."""
    refs = {r["dataset"]: r["params"] for r in rows if r["preset"] == REFERENCE and r.get("params")}
    for r in rows:
        if refs.get(r["dataset"]) and r.get("params"):
            r["params_vs_full"] = r["params"] / refs[r["dataset"]]

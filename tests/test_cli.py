"""End to end through the real fairseq command-line tools with ``--user-dir plugins``.

fairseq-train -> fairseq-eval-lm (the same loss as validation), sampling with fairseq-interactive,
2-process CPU data parallelism, and bad input that must stop with one clear line before training.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_corpus_bin

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PLUGINS = str(ROOT / "plugins")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAIN = [
    "--user-dir", PLUGINS, "--task", "segment_lm", "--arch", "full_tiny", "--criterion", "aux_cross_entropy",
    "--tokens-per-sample", "32", "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003",
    "--cpu", "--num-workers", "0", "--log-format", "simple", "--log-interval", "5", "--seed", "3",
    "--no-epoch-checkpoints",
]  # fmt: skip


def fairseq(tool, *args, check=True, env=None):
    proc = subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """A small byte-level slice of the embedded corpus, binarized by the project's own script."""
    return byte_corpus_bin(tmp_path_factory.mktemp("cli"))


def last_valid(stdout: str, metric: str) -> float:
    values = re.findall(rf"valid on 'valid' subset \|.* {metric} ([\d.]+)", stdout)
    assert values, stdout[-2000:]
    return float(values[-1])


def eval_lm_loss(stdout_and_err: str) -> float:
    match = re.search(r"Loss \(base 2\): ([\d.]+)", stdout_and_err)
    assert match, stdout_and_err[-2000:]
    return float(match.group(1))


def eval_lm_on_valid(data_bin, checkpoint) -> str:
    """``fairseq-eval-lm`` of ``checkpoint`` on the valid split with the training segment length: its output
    (stdout + stderr), whose loss must equal the last validation of the training run."""
    evaluated = fairseq(
        "fairseq-eval-lm", data_bin, "--user-dir", PLUGINS, "--task", "segment_lm", "--path", checkpoint,
        "--gen-subset", "valid", "--tokens-per-sample", "32", "--batch-size", "4", "--cpu",
    )  # fmt: skip
    return evaluated.stdout + evaluated.stderr


@pytest.mark.parametrize(
    "extra",
    [[], ["--pos-emb", "none", "--mem-len", "48"]],
    ids=["full", "full+memory"],
)
def test_train_then_eval_lm_reports_the_validation_loss(data_bin, tmp_path, extra):
    train = fairseq("fairseq-train", data_bin, *TRAIN, *extra, "--max-update", "25", "--save-dir", tmp_path)
    assert "| train_inner |" in train.stdout and "bpb=" in train.stdout  # byte data is labelled bits per byte
    valid_bpb = last_valid(train.stdout, "bpb")
    output = eval_lm_on_valid(data_bin, tmp_path / "checkpoint_best.pt")
    assert abs(eval_lm_loss(output) - valid_bpb) < 6e-4, (valid_bpb, output[-500:])
    # every byte of the split is scored once: tokens = bytes (newlines are the </s> tokens)
    n_bytes = int(re.search(r"Evaluated ([\d,]+) tokens", output).group(1).replace(",", ""))
    assert n_bytes == len((data_bin.parent / "raw" / "valid.txt").read_bytes())


def test_sampling_with_fairseq_interactive(data_bin, tmp_path):
    fairseq("fairseq-train", data_bin, *TRAIN, "--max-update", "10", "--save-dir", tmp_path)
    prompt = " ".join(str(b) for b in b"ticket 12")  # the symbols of the text typed in (byte data)
    for extra in (["--sampling", "--sampling-topk", "5", "--beam", "1"], ["--beam", "3", "--nbest", "2"]):
        proc = subprocess.run(
            [str(BIN / "fairseq-interactive"), str(data_bin), "--user-dir", PLUGINS, "--task", "segment_lm",
             "--path", str(tmp_path / "checkpoint_last.pt"), "--max-len-b", "20", "--cpu", *extra],
            input="ticket 12\n", capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        hypos = [line.split("\t") for line in proc.stdout.splitlines() if line.startswith("H-0")]
        assert len(hypos) == (1 if "--sampling" in extra else 2), proc.stdout
        tokens = hypos[0][2].split()
        assert tokens[: len(prompt.split())] == prompt.split()  # the output starts with the prompt
        assert len(tokens) > len(prompt.split())


def test_two_process_cpu_data_parallel(data_bin, tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "recipes" / "cpu_distributed.sh"), "2", str(data_bin), *TRAIN,
         "--max-update", "6", "--save-dir", str(tmp_path)],
        capture_output=True, text=True, env={**ENV, "FAIRSEQ_TRAIN": str(BIN / "fairseq-train")}, cwd=ROOT,
        timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "training on 2 devices" in output
    assert "bsz=8" in output  # 2 ranks x 4 streams each
    assert (tmp_path / "checkpoint_last.pt").exists()


BAD_INPUT = {
    "heads do not divide dim": (["--decoder-attention-heads", "3"], "does not divide --decoder-embed-dim"),
    "memory with absolute positions": (["--mem-len", "16"], "--pos-emb sinusoidal is absolute"),
    "negative memory": (["--mem-len", "-1", "--pos-emb", "none"], "--mem-len must be >= 0"),
    "negative segment length": (["--tokens-per-sample", "-5"], "--tokens-per-sample must be positive"),
    "missing split": (["--valid-subset", "nosuchsplit"], "split 'nosuchsplit' not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_training_input_gives_one_clear_line(data_bin, tmp_path, case):
    extra, message = BAD_INPUT[case]
    proc = fairseq("fairseq-train", data_bin, *TRAIN, *extra, "--max-update", "5", "--save-dir", tmp_path, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
    assert not list(tmp_path.glob("*.pt"))  # nothing was trained or saved


def test_unknown_attention_is_rejected_by_the_parser(data_bin, tmp_path):
    proc = fairseq("fairseq-train", data_bin, *TRAIN, "--attention", "nosuch", "--save-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "invalid choice: 'nosuch'" in proc.stderr


def test_context_window_is_rejected_by_eval_lm(data_bin, tmp_path):
    fairseq("fairseq-train", data_bin, *TRAIN, "--max-update", "2", "--save-dir", tmp_path)
    proc = fairseq(
        "fairseq-eval-lm", data_bin, "--user-dir", PLUGINS, "--task", "segment_lm", "--path",
        tmp_path / "checkpoint_last.pt", "--context-window", "16", "--tokens-per-sample", "32", "--cpu",
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--context-window does not apply" in proc.stderr.strip().splitlines()[-1]


def test_transformer_xl_recipe_trains_and_evaluates(data_bin, tmp_path):
    """recipes/transformer_xl/run.sh: the paper-setting launcher, on a tiny byte corpus for 3 updates."""
    env = {**ENV, "DATA": str(data_bin), "SAVE": str(tmp_path), "FAIRSEQ_TRAIN": str(BIN / "fairseq-train"),
           "FAIRSEQ_EVAL_LM": str(BIN / "fairseq-eval-lm")}  # fmt: skip
    recipe = str(ROOT / "recipes" / "transformer_xl" / "run.sh")
    small = ["--max-update", "3", "--batch-size", "2", "--tokens-per-sample", "32"]
    train = subprocess.run(["bash", recipe, "ptb_chars_cpu", "train", *small, "--num-workers", "0"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    evaluated = subprocess.run(["bash", recipe, "ptb_chars_cpu", "eval", "--cpu", "--gen-subset", "valid"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert evaluated.returncode == 0 and "Loss (base 2)" in evaluated.stdout + evaluated.stderr


def test_a_checkpoint_evaluated_on_another_dictionary_is_refused(data_bin, tmp_path):
    fairseq("fairseq-train", data_bin, *TRAIN, "--max-update", "2", "--save-dir", tmp_path / "ckpt")
    other = tmp_path / "words"
    (other / "raw").mkdir(parents=True)
    (other / "raw" / "t.txt").write_text("".join(f"w{i % 7} w{i % 11} w{i % 5}\n" for i in range(2000)))
    subprocess.run(
        [sys.executable, "-m", "preprocess.text", "--train", other / "raw" / "t.txt", "--level", "word",
         "--out", other / "bin"], check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    proc = fairseq(
        "fairseq-eval-lm", other / "bin", "--user-dir", PLUGINS, "--task", "segment_lm", "--path",
        tmp_path / "ckpt" / "checkpoint_last.pt", "--tokens-per-sample", "32", "--cpu", check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trained with a dictionary of" in proc.stderr.strip().splitlines()[-1]


def test_quickstart_runner_end_to_end(tmp_path):
    """recipes/quickstart.py with 4 updates per model: corpus, binarization, two trainings, two
    evaluations, the results table and the loss-curve PNG (the README's first command, shortened)."""
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.quickstart", "--max-update", "4", "--out", tmp_path / "runs",
         "--data", tmp_path / "data-bin", "--corpus-scale", "0.05"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    table = (tmp_path / "runs" / "results.md").read_text()
    rows = [line.split("|")[1:5] for line in table.splitlines() if line.startswith(("| full-64", "| xl-64"))]
    assert [r[0].strip() for r in rows] == ["full-64", "xl-64+mem192"]
    assert all(cell.strip() not in ("", "?") for row in rows for cell in row)  # params, valid and test bpb
    assert (tmp_path / "runs" / "loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "data-bin" / "metadata.json").exists()

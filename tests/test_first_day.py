"""A researcher's first day (issue 17): the mistakes everyone makes, through the real command-line tools
on real PTB characters. Each either does the right thing or stops with one ``error:`` line before any work.
"""

import lzma
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
PLUGINS = str(ROOT / "plugins")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # warnings on: what a user sees is what is tested
TRAIN = [
    "--user-dir", PLUGINS, "--task", "segment_lm", "--tokens-per-sample", "32", "--batch-size", "4",
    "--optimizer", "adam", "--lr", "0.003", "--cpu", "--num-workers", "0", "--log-format", "simple",
    "--log-interval", "1", "--seed", "1", "--no-epoch-checkpoints",
]  # fmt: skip

pytestmark = pytest.mark.cli


def run(command, *args, check=True, env=None):
    """A fairseq-* console script (or ``python -m module`` when ``command`` is ``-m module``)."""
    head = [sys.executable, "-m", command[3:]] if command.startswith("-m ") else [str(BIN / command)]
    proc = subprocess.run(
        [*head, *map(str, args)], capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_error_line(proc) -> str:
    """The command failed with one ``error:`` line, the last one, and no traceback or warning. Before it,
    stderr holds nothing (fairseq-train, python -m) or the tool's own INFO log lines (fairseq-eval-lm)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    before = [line for line in lines[:-1] if not line.startswith(("INFO:", "DEBUG:"))]
    assert not before, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def ptb_chars(tmp_path_factory):
    """The first 30 kB of PTB train and 4 kB of PTB valid, binarized as characters by preprocess.text."""
    if not (SHARED / "ptb" / "ptb.train.txt.xz").exists():
        pytest.skip(f"{SHARED} (the shared PTB data) is not available")
    tmp = tmp_path_factory.mktemp("ptb_chars")
    for split, size in {"train": 30_000, "valid": 4_000}.items():
        text = lzma.open(SHARED / "ptb" / f"ptb.{split}.txt.xz", "rt").read(size)
        (tmp / f"{split}.txt").write_text(text[: text.rfind("\n") + 1])
    run("-m preprocess.text", "--train", tmp / "train.txt", "--valid", tmp / "valid.txt", "--test",
        tmp / "valid.txt", "--level", "char", "--binarizer", "fast", "--out", tmp / "bin")  # fmt: skip
    return tmp / "bin"


@pytest.fixture(scope="module")
def xl_checkpoint(ptb_chars, tmp_path_factory):
    """xl_tiny (memory 64) trained for 3 updates with the project's criterion named explicitly."""
    save = tmp_path_factory.mktemp("xl_ckpt")
    run("fairseq-train", ptb_chars, *TRAIN, "--arch", "xl_tiny", "--criterion", "aux_cross_entropy",
        "--max-update", "3", "--save-dir", save)  # fmt: skip
    return save / "checkpoint_last.pt"


def eval_lm(data, checkpoint, *extra, check=True):
    return run("fairseq-eval-lm", data, "--user-dir", PLUGINS, "--task", "segment_lm", "--path", checkpoint,
               "--gen-subset", "valid", "--tokens-per-sample", "32", "--cpu", *extra, check=check)  # fmt: skip


# ---- 1. the default criterion keeps the auxiliary losses ---------------------------------------------------
def test_default_criterion_adds_the_auxiliary_losses_and_labels_chars_bpc(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "compressive_tiny", "--max-update", "3",
               "--save-dir", tmp_path)  # fmt: skip
    inner = [line for line in proc.stdout.splitlines() if "| train_inner |" in line]
    assert len(inner) == 3 and all("aux_compression=" in line and "bpc=" in line for line in inner), inner
    assert "ppl" not in "".join(inner)
    assert re.search(r"valid on 'valid' subset \|.* aux_compression [\d.]+ \| bpc [\d.]+", proc.stdout)


def test_a_criterion_that_drops_the_auxiliary_losses_is_refused(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "compressive_tiny", "--criterion", "cross_entropy",
               "--max-update", "3", "--save-dir", tmp_path, check=False)  # fmt: skip
    line = only_error_line(proc)
    assert "--criterion cross_entropy cannot add the model's auxiliary losses" in line
    assert "--criterion aux_cross_entropy" in line
    assert not list(tmp_path.glob("*.pt"))


# ---- 4. fairseq-eval-lm reports the unit's metric -------------------------------------------------------------
def test_eval_lm_reports_bits_per_character_on_character_data(ptb_chars, xl_checkpoint):
    output = eval_lm(ptb_chars, xl_checkpoint).stderr
    match = re.search(r"Loss \(base 2\): ([\d.]+), bpc: ([\d.]+)", output)
    assert match and match[1] == match[2], output[-1500:]
    assert "Perplexity" not in output


# ---- 5. --model-overrides: one syntax, unknown keys refused, the memory in force logged ------------------------
def test_eval_lm_refuses_a_mistyped_override(ptb_chars, xl_checkpoint):
    line = only_error_line(eval_lm(ptb_chars, xl_checkpoint, "--model-overrides", "{'mem_lenn': 128}", check=False))
    assert "'mem_lenn'" in line and "did you mean mem_len" in line


@pytest.mark.parametrize(
    "overrides", ["{'mem_len': 128, 'same_length': True}", '{"mem_len": 128, "same_length": true}']
)
def test_eval_lm_takes_python_or_json_overrides_and_logs_the_memory(ptb_chars, xl_checkpoint, overrides):
    output = eval_lm(ptb_chars, xl_checkpoint, "--model-overrides", overrides).stderr
    assert "memory in force: mem_len=128 (override); model overrides: {'mem_len': 128, 'same_length': True}" in output
    assert "Loss (base 2)" in output


def test_context_eval_takes_the_same_overrides_as_eval_lm(ptb_chars, xl_checkpoint, tmp_path):
    common = ["--path", xl_checkpoint, "--data", ptb_chars, "--lengths", "32", "--mode", "stream", "--subset",
              "valid", "--max-tokens", "256", "--cpu", "--out", tmp_path]  # fmt: skip
    proc = run("-m recipes.context_eval", *common, "--model-overrides", "{'mem_len': 96}")
    assert "memory in force: mem_len=96 (override)" in proc.stdout
    line = only_error_line(
        run("-m recipes.context_eval", *common, "--model-overrides", "{'mem_lenn': 96}", check=False)
    )
    assert "'mem_lenn'" in line and "did you mean mem_len" in line


# ---- 2. a segment longer than the streams ------------------------------------------------------------------------
def test_training_segment_longer_than_the_streams_is_refused(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "xl_tiny", "--tokens-per-sample", "100000",
               "--max-update", "3", "--save-dir", tmp_path, check=False)  # fmt: skip
    line = only_error_line(proc)
    # valid (loaded first): 3,992 characters in 4 streams of 998
    assert "--tokens-per-sample 100000 is longer than the streams of the valid split" in line, line
    assert "4 streams (--batch-size 4 x 1 workers) of 998 tokens; use --tokens-per-sample <= 998" in line
    assert not list(tmp_path.glob("*.pt"))


def test_eval_lm_segment_longer_than_the_split_is_refused(ptb_chars, xl_checkpoint):
    line = only_error_line(eval_lm(ptb_chars, xl_checkpoint, "--tokens-per-sample", "200000", check=False))
    assert "1 streams (--batch-size 1 x 1 workers) of 3,992 tokens; use --tokens-per-sample <= 3992" in line, line


# ---- 8. switching a preset's attention -----------------------------------------------------------------------------
def test_switching_a_presets_attention_drops_the_presets_options_of_the_old_one(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "compressive_tiny", "--attention", "relative",
               "--max-update", "2", "--save-dir", tmp_path)  # fmt: skip
    assert "'attention': relative" in proc.stdout and "'cmem_len': 0," in proc.stdout
    assert "'mem_len': 32," in proc.stdout  # the preset's other defaults stay


def test_switching_an_xl_presets_attention_drops_its_relative_positions_and_memory(ptb_chars, tmp_path):
    """xl_tiny's relative positions are computed inside relative attention: with --attention full the model
    takes the default positions (sinusoidal, absolute) and so no memory, saying so; typed values stand."""
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "xl_tiny", "--attention", "full", "--max-update", "2",
               "--save-dir", tmp_path)  # fmt: skip
    assert "'attention': full" in proc.stdout and "'pos_emb': sinusoidal" in proc.stdout
    assert "'mem_len': 0," in proc.stdout and "the preset's --pos-emb relative and --mem-len" in proc.stdout
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "xl_tiny", "--attention", "full", "--pos-emb", "rotary",
               "--max-update", "2", "--save-dir", tmp_path / "rotary")  # fmt: skip
    assert "'pos_emb': rotary" in proc.stdout and "'mem_len': 0," not in proc.stdout


def test_a_typed_option_of_the_old_attention_is_still_refused(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "compressive_tiny", "--attention", "relative",
               "--cmem-len", "16", "--max-update", "2", "--save-dir", tmp_path, check=False)  # fmt: skip
    assert "--cmem-len 16 is an option of --attention compressive" in only_error_line(proc)


# ---- 11. the error line is all a user sees ---------------------------------------------------------------------------
def test_a_mistyped_arch_names_the_closest_presets(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "compressive_tinny", "--max-update", "2",
               "--save-dir", tmp_path, check=False)  # fmt: skip
    line = only_error_line(proc)
    assert (
        line.startswith("error: unknown --arch 'compressive_tinny': did you mean compressive_tiny") and len(line) < 300
    )


def test_no_spurious_shared_parameter_line(ptb_chars, tmp_path):
    proc = run("fairseq-train", ptb_chars, *TRAIN, "--arch", "xl_tiny", "--criterion", "aux_cross_entropy",
               "--max-update", "1", "--save-dir", tmp_path)  # fmt: skip
    shared = [
        line.split("detected shared parameter: ")[1] for line in proc.stdout.splitlines() if "shared param" in line
    ]
    assert shared == [  # tied embeddings and Transformer-XL's u, v (shared across layers): real sharing only
        "decoder.embed_tokens.weight <- decoder.output_projection.weight",
        "decoder.layers.0.attn.u <- decoder.layers.1.attn.u",
        "decoder.layers.0.attn.v <- decoder.layers.1.attn.v",
    ], shared


# ---- 10. compressed text inputs -------------------------------------------------------------------------------------
def test_preprocess_text_and_sentencepiece_take_xz_and_gz_inputs(tmp_path):
    """PTB's valid/test .xz files as they are in shared/data, and a .gz: the same binarized characters as
    from the decompressed files; sentencepiece reads the decompressed text (its sha256 per split)."""
    import gzip
    import hashlib
    import json

    if not (SHARED / "ptb" / "ptb.valid.txt.xz").exists():
        pytest.skip(f"{SHARED} (the shared PTB data) is not available")
    train, valid = SHARED / "ptb" / "ptb.valid.txt.xz", SHARED / "ptb" / "ptb.test.txt.xz"
    text = lzma.open(SHARED / "ptb" / "ptb.test.txt.xz", "rt").read(20_000)
    plain = {"train": tmp_path / "train.txt", "valid": tmp_path / "valid.txt", "test": tmp_path / "test.txt"}
    plain["train"].write_bytes(lzma.open(train).read())
    plain["valid"].write_bytes(lzma.open(valid).read())
    plain["test"].write_text(text[: text.rfind("\n") + 1])
    test_gz = tmp_path / "test.txt.gz"
    test_gz.write_bytes(gzip.compress(plain["test"].read_bytes()))
    compressed = ["--train", train, "--valid", valid, "--test", test_gz]
    uncompressed = ["--train", plain["train"], "--valid", plain["valid"], "--test", plain["test"]]
    char = ["--level", "char", "--binarizer", "fast"]
    run("-m preprocess.text", *compressed, *char, "--out", tmp_path / "chars_xz")
    run("-m preprocess.text", *uncompressed, *char, "--out", tmp_path / "chars")
    for name in ("dict.txt", "train.bin", "valid.bin", "test.bin"):
        assert (tmp_path / "chars_xz" / name).read_bytes() == (tmp_path / "chars" / name).read_bytes(), name
    run("-m preprocess.sentencepiece", *compressed, "--vocab-size", "300", "--workers", "1", "--out", tmp_path / "spm")
    splits = json.loads((tmp_path / "spm" / "metadata.json").read_text())["splits"]
    for split, path in plain.items():  # it read the decompressed text
        assert splits[split]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), split


# ---- 6. the Python hub, from a fresh interpreter ---------------------------------------------------------------------
HUB = """
import json, sys
sys.path.insert(0, {root!r})
from plugins.models.efficient_lm import EfficientLM

lm = EfficientLM.from_pretrained({ckpt_dir!r}, "checkpoint_last.pt", {data!r}, user_dir={plugins!r})
sample = lm.sample("the", beam=1, sampling=True, sampling_topk=5, max_len_b=8)
scored = lm.score({text!r})
print(json.dumps({{"sample": sample, "scores": scored["positional_scores"].tolist()}}))
"""


def test_hub_from_pretrained_in_a_fresh_interpreter_scores_with_memory(ptb_chars, xl_checkpoint):
    """``EfficientLM.from_pretrained(dir, checkpoint, data, user_dir=...)`` in a new Python: it samples, and
    ``score`` reads a text longer than a segment with the memory, as fairseq-eval-lm --batch-size 1 does:
    the valid split (3,992 characters, 125 segments of 32) gets the same loss."""
    import json

    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(ptb_chars / "dict.txt"))
    valid = data_utils.load_indexed_dataset(str(ptb_chars / "valid"), dictionary)
    symbols = [dictionary[int(t)] for i in range(len(valid)) for t in valid[i]]  # newlines are </s>
    text = (ptb_chars.parent / "valid.txt").read_text() + "a"  # the hub drops a trailing newline: one more symbol
    script = HUB.format(root=str(ROOT), ckpt_dir=str(xl_checkpoint.parent), data=str(ptb_chars), plugins=PLUGINS,
                        text=text)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd="/",
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sample"].startswith("the") and len(result["sample"]) > 4  # text in, text out
    assert "needs --task segment_lm" not in proc.stderr
    scores = result["scores"][: len(symbols)]  # nats per character
    hub_bits = -sum(scores) / len(scores) / math.log(2)
    output = eval_lm(ptb_chars, xl_checkpoint, "--batch-size", "1").stderr
    evaluated = float(re.search(r"Loss \(base 2\): ([\d.]+)", output)[1])
    assert int(re.search(r"Evaluated ([\d,]+) tokens", output)[1].replace(",", "")) == len(symbols)
    assert abs(hub_bits - evaluated) < 1e-3, (hub_bits, evaluated)

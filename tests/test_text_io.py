"""Text in, text out on character and byte data (issue 17, item 3), through the real tools on real PTB text.

``preprocess.text --level char|byte`` records the data's text encoder in ``metadata.json``
(``--bpe char_level`` / ``byte_level``, ``plugins/text_encoders.py``); ``fairseq-interactive`` and
``EfficientLM.from_pretrained(...).sample`` then take and give text with no extra flag, and a prompt
symbol the dictionary lacks is named in one warning. Before, ``the company`` became ``<unk> <unk>``.
"""

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fairseq.data import Dictionary, encoders

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
PLUGINS = str(ROOT / "plugins")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Characters that the encoders escape or that take several bytes: "_" and tab are written U+XXXX, "\r"
# too; the rest are 2-4 UTF-8 bytes. Appended to the PTB text so the data holds them.
SPECIAL = "under_score\ttab\rcr é€😀 U+0041 <unk>\n"
WARNING = "not in the dictionary"

pytestmark = pytest.mark.cli


def run(command, *args, stdin=None, env=None):
    head = [sys.executable, "-m", command[3:]] if command.startswith("-m ") else [str(BIN / command)]
    proc = subprocess.run([*head, *map(str, args)], capture_output=True, text=True, env=env or ENV, cwd=ROOT,
                          input=stdin, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def ptb(split: str, size: int | None = None) -> str:
    if not (SHARED / "ptb" / f"ptb.{split}.txt.xz").exists():
        pytest.skip(f"{SHARED} (the shared PTB data) is not available")
    return lzma.open(SHARED / "ptb" / f"ptb.{split}.txt.xz", "rt").read(size)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """The first 30 kB of PTB train (plus the SPECIAL line) and 4 kB of PTB valid, as files."""
    tmp = tmp_path_factory.mktemp("ptb_text")
    for split, size in {"train": 30_000, "valid": 4_000}.items():
        text = ptb(split, size)
        text = text[: text.rfind("\n") + 1] + (SPECIAL if split == "train" else "")
        (tmp / f"{split}.txt").write_bytes(text.encode("utf-8"))  # bytes: keep the "\r" as it is
    return tmp


def binarize_and_train(texts: Path, level: str, tmp: Path) -> tuple[Path, Path]:
    """``preprocess.text --level LEVEL`` (``preprocess.sentencepiece`` for subwords) of ``texts``, then
    xl_tiny trained for 2 updates on it."""
    data = tmp / "bin"
    splits = ["--train", texts / "train.txt", "--valid", texts / "valid.txt", "--test", texts / "valid.txt"]
    if level == "subword":
        run("-m preprocess.sentencepiece", *splits, "--vocab-size", "300", "--workers", "1", "--out", data)
    else:
        run("-m preprocess.text", *splits, "--level", level, "--binarizer", "fast", "--out", data)
    run("fairseq-train", data, "--user-dir", PLUGINS, "--task", "segment_lm", "--arch", "xl_tiny",
        "--tokens-per-sample", "32", "--batch-size", "4", "--optimizer", "adam", "--lr", "0.003", "--cpu",
        "--num-workers", "0", "--seed", "1", "--max-update", "2", "--no-epoch-checkpoints", "--save-dir", tmp / "ckpt")  # fmt: skip
    return data, tmp / "ckpt" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def chars(texts, tmp_path_factory):
    return binarize_and_train(texts, "char", tmp_path_factory.mktemp("chars"))


@pytest.fixture(scope="module")
def bytes_(texts, tmp_path_factory):
    return binarize_and_train(texts, "byte", tmp_path_factory.mktemp("bytes"))


@pytest.fixture(scope="module")
def subwords(texts, tmp_path_factory):
    return binarize_and_train(texts, "subword", tmp_path_factory.mktemp("subwords"))


def interactive(data: Path, checkpoint: Path, *prompts: str, options=()):
    """``fairseq-interactive``, the prompts on stdin; returns (D- lines, S- lines, the output)."""
    proc = run("fairseq-interactive", data, "--user-dir", PLUGINS, "--task", "segment_lm", "--path", checkpoint,
               "--cpu", "--beam", "1", "--sampling", "--sampling-topk", "5", "--max-len-b", "40", "--seed", "1",
               *options, stdin="".join(p + "\n" for p in prompts))  # fmt: skip
    lines = proc.stdout.splitlines()
    detok = [line.split("\t", 2)[2] for line in lines if line.startswith("D-")]
    source = [line.split("\t", 1)[1] for line in lines if line.startswith("S-")]
    return detok, source, proc.stdout + proc.stderr


@pytest.mark.parametrize("level", ["char", "byte"])
def test_preprocess_records_the_text_encoder(level, chars, bytes_):
    data = chars[0] if level == "char" else bytes_[0]
    assert json.loads((data / "metadata.json").read_text())["encoder"] == f"{level}_level"


@pytest.mark.parametrize("name", ["char_level", "byte_level"])
def test_round_trip_of_every_character_of_ptb_train(name):
    """``decode(encode(text)) == text`` on all of PTB's train text (5.1M characters) and the SPECIAL ones."""
    bpe = encoders.build_bpe(name)
    for text in (ptb("train"), SPECIAL, "a\n\nb\n", " lead and trail "):
        assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("level", ["char", "byte"])
def test_the_encoder_writes_exactly_the_symbols_of_the_data(level, texts, chars, bytes_):
    """Encoding train.txt and looking the symbols up in dict.txt gives train.bin, token for token
    (spaces, newlines, escapes, multi-byte characters included)."""
    data = chars[0] if level == "char" else bytes_[0]
    dictionary = Dictionary.load(str(data / "dict.txt"))
    text = (texts / "train.txt").read_bytes().decode("utf-8")
    symbols = encoders.build_bpe(f"{level}_level").encode(text)
    ids = dictionary.encode_line(symbols, add_if_not_exist=False, append_eos=False).numpy()
    stored = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert dictionary.unk() not in ids
    np.testing.assert_array_equal(ids, stored)


def test_interactive_on_characters_reads_and_prints_text_and_names_unknown_symbols(chars):
    """No --bpe: the task builds the data's encoder (metadata.json)."""
    detok, source, output = interactive(*chars, "the company", "the Qompany ß")
    assert source[0] == "t h e _ c o m p a n y", output[-3000:]  # before: <unk> <unk>
    assert detok[0].startswith("the company") and len(detok[0]) > len("the company"), detok
    assert "<unk>" not in detok[0] and " _ " not in detok[0]
    warnings = [line for line in output.splitlines() if WARNING in line]
    assert len(warnings) == 1, output[-3000:]  # the second prompt only, one line naming both
    assert "'Q'" in warnings[0] and "'ß'" in warnings[0], warnings


def test_interactive_on_bytes_reads_and_prints_text(bytes_):
    """``--bpe byte_level`` given explicitly (the hub test covers bytes without it)."""
    detok, source, output = interactive(*bytes_, "the company é", options=["--bpe", "byte_level"])
    assert source[0] == "116 104 101 32 99 111 109 112 97 110 121 32 195 169", output[-3000:]
    assert detok[0].startswith("the company é"), detok  # before: <unk> <unk> <unk>
    assert WARNING not in output


def test_interactive_on_sentencepiece_subwords_reads_text_with_no_flag(subwords):
    """Subword data: the data's spm.model (metadata.json) is used with no --bpe/--sentencepiece-model."""
    assert json.loads((subwords[0] / "metadata.json").read_text())["encoder"] == "sentencepiece"
    detok, source, output = interactive(*subwords, "the company")
    assert "<unk>" not in source[0] and "\u2581" in source[0], output[-3000:]  # before: <unk> <unk>
    assert detok[0].startswith("the company"), detok
    assert WARNING not in output


HUB = """
import json, sys
sys.path.insert(0, {root!r})
from plugins.models.efficient_lm import EfficientLM
from plugins.errors import UserError

out = {{}}
for level, (ckpt_dir, data) in {models!r}.items():
    lm = EfficientLM.from_pretrained(ckpt_dir, "checkpoint_last.pt", data, user_dir={plugins!r})
    out[level] = lm.sample("the company é", beam=1, sampling=True, sampling_topk=5, max_len_b=40)
    out[level + "_scores"] = len(lm.score("ab\\ncd")["positional_scores"])
lm.sample("the Qompany", beam=1)  # the byte model knows every byte: no warning
chars = EfficientLM.from_pretrained({models[char][0]!r}, "checkpoint_last.pt", {models[char][1]!r}, user_dir={plugins!r})
out["unknown"] = chars.sample("the Qompany", beam=1, max_len_b=20)
try:
    chars.sample("one line\\ntwo", beam=1)
except UserError as e:
    out["newline"] = str(e)
print(json.dumps(out))
"""


def test_hub_sample_takes_and_returns_text(chars, bytes_):
    """From a fresh interpreter, no bpe= given: ``sample`` continues text and returns text; a newline is a
    symbol when scoring; an unknown character is named once; a prompt with a newline inside is refused
    (fairseq's generator would stop at it)."""
    models = {"char": [str(chars[1].parent), str(chars[0])], "byte": [str(bytes_[1].parent), str(bytes_[0])]}
    script = HUB.format(root=str(ROOT), models=models, plugins=PLUGINS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd="/",
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["byte"].startswith("the company é"), out  # before: 116 104 101 ... decimal ids
    assert out["char"].startswith("the company é"), out  # before: <unk> <unk> <unk>
    assert (out["char_scores"], out["byte_scores"]) == (5, 5), out  # a, b, newline, c, d
    assert out["unknown"].startswith("the <unk>ompany"), out
    warnings = [line for line in proc.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "'Q'" in warnings[0], proc.stderr[-3000:]  # é is in the train text
    assert "newline" in out.get("newline", ""), out

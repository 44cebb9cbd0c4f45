"""Tests of the ``preprocess`` scripts, run as ``python -m preprocess.X`` subprocesses, as a user would.

Real PTB and WikiText-2 come from ``shared/data`` beside the repository (skipped when absent); the other
inputs are small generated files. The slow runs (those that call the real fairseq-preprocess) are started
together, in the background, when the first test needs one, so that they share the CPU cores.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_ptb = pytest.mark.skipif(not (SHARED / "ptb").is_dir(), reason=f"no {SHARED}/ptb")
needs_wt2 = pytest.mark.skipif(not (SHARED / "wikitext-2").is_dir(), reason=f"no {SHARED}/wikitext-2")
SPLITS = ("train", "valid", "test")
EOS, UNK, N_SPECIAL = 2, 3, 4


def cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", f"preprocess.{module}", *map(str, args)]


def run(module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(module, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def assert_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2 and exactly one stderr line, starting with 'error: ' and mentioning ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def no_leftovers(out: Path) -> None:
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def metadata(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def dict_symbols(out: Path) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in (out / "dict.txt").read_text(encoding="utf-8").splitlines()]


def same_files(a: Path, b: Path) -> None:
    for name in ["dict.txt"] + [f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------------
# generated inputs


def words_text(rng: random.Random, lines: int, extra: str = "") -> str:
    vocab = ["".join(rng.choice("abcdefghijklmnopqrs") for _ in range(rng.randint(1, 7))) for _ in range(400)]
    out = []
    for i in range(lines):
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 14)))
        out.append(line + (extra if extra and i % 50 == 7 else "") + "\n")
    return "".join(out)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    rng = random.Random(1234)
    files = {}

    # enwik8 format: a zip with a member named enwik8; arbitrary (non-UTF-8) bytes, every value present
    raw = bytes(range(256)) + bytes(rng.getrandbits(8) for _ in range(60_000)) + b"<page>\n\n\xff\xfe\x80 end"
    (d / "enwik8").write_bytes(raw)
    with zipfile.ZipFile(d / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", raw)
    (d / "enwik8.xz").write_bytes(lzma.compress(raw))
    files.update(enwik8_bytes=d / "enwik8", enwik8_zip=d / "enwik8.zip", enwik8_xz=d / "enwik8.xz")

    # text8 format: one line of a-z and space (no newline)
    text8 = " " + " ".join(w for w in words_text(rng, 3000).split())
    text8 = "the quick brown fox jumps over a lazy dog " + text8[: 80_000 - 42]
    with zipfile.ZipFile(d / "text8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text8)
    files["text8_zip"] = d / "text8.zip"

    # any text: words, plus tabs, CR, underscores, non-ASCII and an over-long word line
    (d / "corpus.txt").write_text(words_text(rng, 4000, extra="\tsnake_case\r ß é 中文"), encoding="utf-8")
    files["corpus"] = d / "corpus.txt"
    for split, n in (("train", 3000), ("valid", 200), ("test", 200)):
        (d / f"spm.{split}.txt").write_text(words_text(rng, n), encoding="utf-8")
        files[f"spm_{split}"] = d / f"spm.{split}.txt"

    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    files["latin1"] = d / "latin1.txt"

    # PTB-shaped archives: a tgz holding simple-examples/data/ptb.*.txt, and a zip lacking ptb.valid.txt
    with tarfile.open(d / "fake-simple-examples.tgz", "w:gz") as tf:
        for split in SPLITS:
            data = words_text(rng, 30).encode()
            info = tarfile.TarInfo(f"./simple-examples/data/ptb.{split}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    files["ptb_tgz"] = d / "fake-simple-examples.tgz"
    with zipfile.ZipFile(d / "ptb-no-valid.zip", "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"ptb/ptb.{split}.txt", words_text(rng, 30))
    files["ptb_no_valid"] = d / "ptb-no-valid.zip"
    (d / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    files["broken_zip"] = d / "broken.zip"
    return files


# ----------------------------------------------------------------------------------------------------
# the slow runs, started together in the background


class Job:
    def __init__(self, module: str, args: list, out: Path):
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        self.started = time.time()
        with open(self.log, "w") as stdout, open(f"{self.log}.err", "w") as stderr:
            self.proc = subprocess.Popen(cmd(module, *args), cwd=REPO, stdout=stdout, stderr=stderr, text=True)
        self.seconds: float | None = None

    def result(self) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=600)
        if self.seconds is None:
            self.seconds = time.time() - self.started
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self.log.read_text(), Path(f"{self.log}.err").read_text()
        )


JOBS = {  # test name -> jobs it uses
    "test_ptb_real": ["ptb"],
    "test_wikitext2_real": ["wt2"],
    "test_enwik8": ["enwik8"],
    "test_text_char_matches_fairseq": ["text_char"],
    "test_text_word": ["text_word"],
    "test_sentencepiece": ["spm"],
}


def spm_files(inputs) -> list:
    return [a for s in SPLITS for a in (f"--{s}", inputs[f"spm_{s}"])]


@pytest.fixture(scope="session")
def jobs(request, inputs, tmp_path_factory) -> dict[str, Job]:
    d = tmp_path_factory.mktemp("jobs")
    specs = {
        "ptb": ("ptb", ["--raw", SHARED / "ptb"]),
        "wt2": ("wikitext", ["--variant", "2", "--raw", SHARED / "wikitext-2"]),
        "enwik8": ("enwik8", ["--raw", inputs["enwik8_zip"], "--valid-bytes", 6000, "--test-bytes", 5000]),
        "text_char": ("text", ["--train", inputs["corpus"], "--level", "char", "--binarizer", "fairseq"]),
        "text_word": ("text", ["--train", inputs["corpus"], "--level", "word", "--split", "0.9,0.05,0.05"]),
        "spm": ("sentencepiece", ["--vocab-size", 300, "--model-type", "bpe", *spm_files(inputs)]),
    }
    wanted = {job for item in request.session.items for job in JOBS.get(item.originalname, [])}
    wanted -= {name for name, folder in (("ptb", "ptb"), ("wt2", "wikitext-2")) if not (SHARED / folder).is_dir()}
    started = {}
    for name in sorted(wanted, key=list(specs).index):
        module, args = specs[name]
        started[name] = Job(module, [*args, "--out", d / name], d / name)
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            job.proc.kill()


@pytest.fixture(scope="session")
def fairseq_data():
    from fairseq.data import Dictionary, data_utils

    return Dictionary, data_utils


def load_splits(fairseq_data, out: Path):
    """Load dict.txt and every split the way the training task does."""
    Dictionary, data_utils = fairseq_data
    d = Dictionary.load(str(out / "dict.txt"))
    sets = {s: data_utils.load_indexed_dataset(str(out / s), d) for s in SPLITS}
    for split, ds in sets.items():
        assert ds is not None, split
        assert int(np.sum(ds.sizes)) == metadata(out)["splits"][split]["tokens"]
    return d, sets


def flat(ds) -> np.ndarray:
    return np.concatenate([ds[i].numpy() for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------------
# real data


@needs_ptb
def test_ptb_real(jobs, fairseq_data):
    job = jobs["ptb"]
    assert_ok(job.result())
    print(f"PTB preprocess: {job.seconds:.1f}s")
    out = job.out
    meta = metadata(out)
    assert meta["dataset"] == "ptb" and meta["unit"] == "word"
    assert meta["vocab_size"] == 10000
    assert {s: meta["splits"][s]["tokens"] for s in SPLITS} == {"train": 929589, "valid": 73760, "test": 82430}
    assert meta["splits"]["valid"]["oov"] == 0 and meta["splits"]["test"]["oov"] == 0
    assert meta["splits"]["train"]["chars"] == 5101618
    symbols = [s for s in dict_symbols(out) if not s.startswith("madeupword")]
    assert len(symbols) == 9998  # 9999 words, <unk> being fairseq's own symbol
    assert "<unk>" not in symbols
    d, sets = load_splits(fairseq_data, out)
    assert len(d) % 8 == 0 and len(d) == 10008
    first = lzma.open(SHARED / "ptb" / "ptb.train.txt.xz", "rt").readline()
    assert d.string(sets["train"][0]) == " ".join(first.split())
    assert all(int(sets[s][i][-1]) == EOS for s in SPLITS for i in (0, len(sets[s]) - 1))
    assert "identical to the official PTB file" in job.result().stdout
    no_leftovers(out)


@needs_wt2
def test_wikitext2_real(jobs, fairseq_data):
    job = jobs["wt2"]
    assert_ok(job.result())
    print(f"WikiText-2 preprocess: {job.seconds:.1f}s")
    meta = metadata(job.out)
    assert meta["dataset"] == "wikitext-2" and meta["unit"] == "word"
    assert meta["vocab_size"] == 33278
    assert {s: meta["splits"][s]["tokens"] for s in SPLITS} == {"train": 2088628, "valid": 217646, "test": 245569}
    assert meta["splits"]["valid"]["oov"] == 0 and meta["splits"]["test"]["oov"] == 0
    d, sets = load_splits(fairseq_data, job.out)
    assert len(sets["train"]) == 36718 and len(sets["valid"]) == 3760 and len(sets["test"]) == 4358
    assert d.string(sets["train"][1]) == "= Valkyria Chronicles III ="
    assert len(sets["train"][0]) == 1  # empty first line: only </s>
    assert int(np.count_nonzero(flat(sets["valid"]) == UNK)) == 11718  # the literal <unk> tokens of the file


@needs_wt2
def test_wikitext_missing_raw_train_split(tmp_path):
    out = tmp_path / "wt2raw"
    err = assert_error(run("wikitext", "--variant", "2", "--raw-text", "--raw", SHARED / "wikitext-2", "--out", out))
    assert "train split missing" in err and "wiki.train.raw" in err
    assert not out.exists()
    no_leftovers(out)


# ----------------------------------------------------------------------------------------------------
# generated data


def test_enwik8(jobs, inputs, tmp_path, fairseq_data):
    job = jobs["enwik8"]
    assert_ok(job.result())
    raw = inputs["enwik8_bytes"].read_bytes()
    meta = metadata(job.out)
    assert meta["unit"] == "byte" and meta["binarizer"] == "fairseq"
    assert meta["split_bytes"] == {"train": len(raw) - 11000, "valid": 6000, "test": 5000}
    assert meta["vocab_size"] == len(set(raw[:-11000]))
    assert meta["fairseq_dict_size"] == 260
    assert dict_symbols(job.out) == [str(i) for i in range(256)]
    d, sets = load_splits(fairseq_data, job.out)
    assert len(d) == 260
    parts = {"train": raw[:-11000], "valid": raw[-11000:-5000], "test": raw[-5000:]}
    for split, ds in sets.items():
        ids = flat(ds)
        assert not np.any(ids == UNK), split  # 0% <unk>
        decoded = bytes(10 if t == EOS else t - N_SPECIAL for t in ids.tolist())
        expected = parts[split] + (b"" if parts[split].endswith(b"\n") else b"\n")  # fairseq ends the last line
        assert decoded == expected, split
        assert meta["splits"][split]["chars"] == len(parts[split])
        assert meta["splits"][split]["tokens"] == len(expected)

    # the in-process binarizer writes the very same files; .xz and plain-file inputs work too
    for name, source in (("fast_zip", inputs["enwik8_zip"]), ("fast_xz", inputs["enwik8_xz"])):
        out = tmp_path / name
        assert_ok(
            run(
                "enwik8",
                "--raw",
                source,
                "--out",
                out,
                "--valid-bytes",
                6000,
                "--test-bytes",
                5000,
                "--binarizer",
                "fast",
            )
        )
        same_files(out, job.out)
    out = tmp_path / "plain"
    assert_ok(
        run(
            "enwik8",
            "--raw",
            inputs["enwik8_bytes"],
            "--out",
            out,
            "--valid-bytes",
            6000,
            "--test-bytes",
            5000,
            "--binarizer",
            "fast",
        )
    )
    same_files(out, job.out)


def test_text8(inputs, tmp_path, fairseq_data):
    out = tmp_path / "text8"
    result = run("text8", "--raw", inputs["text8_zip"], "--out", out, "--valid-chars", 5000, "--test-chars", 4000)
    assert_ok(result)
    text = zipfile.ZipFile(inputs["text8_zip"]).read("text8").decode()
    meta = metadata(out)
    assert meta["unit"] == "char" and meta["binarizer"] == "fast"  # text8's default (one 90M-character line)
    assert meta["vocab_size"] == 27
    parts = {"train": text[:-9000], "valid": text[-9000:-4000], "test": text[-4000:]}
    d, sets = load_splits(fairseq_data, out)
    assert sorted(dict_symbols(out)[:27]) == sorted("abcdefghijklmnopqrstuvwxyz_")
    for split, ds in sets.items():
        assert len(ds) == 1  # one line
        assert meta["splits"][split]["tokens"] == len(parts[split]) + 1  # + the </s> fairseq appends
        assert meta["splits"][split]["chars"] == len(parts[split])
        ids = ds[0].tolist()
        assert ids[-1] == EOS and UNK not in ids
        assert "".join(d[t] for t in ids[:-1]).replace("_", " ") == parts[split]


def test_text_char_matches_fairseq(jobs, inputs, tmp_path, fairseq_data):
    """text.py --level char: real fairseq-preprocess and the in-process binarizer give identical files,
    with tabs, CR, underscores and non-ASCII characters in the text."""
    job = jobs["text_char"]
    assert_ok(job.result())
    out = tmp_path / "fast"
    assert_ok(run("text", "--train", inputs["corpus"], "--level", "char", "--binarizer", "fast", "--out", out))
    same_files(out, job.out)
    meta = metadata(job.out)
    assert meta["unit"] == "char" and meta["dataset"] == "text_char"
    symbols = dict_symbols(job.out)
    assert {"_", "U+0009", "U+000D", "U+005F", "ß", "中"} <= set(symbols)
    text = inputs["corpus"].read_bytes().decode()  # (read_text would turn the CRs into newlines)
    train = text.encode()[: meta["split"]["bytes"]["train"]].decode()
    assert train.endswith("\n")  # cut at a line start
    assert meta["vocab_size"] == len(set(train))
    d, sets = load_splits(fairseq_data, job.out)
    names = {"_": " ", "U+0009": "\t", "U+000D": "\r", "U+005F": "_"}
    for i in (0, 7):  # line 7 has the tab, CR, underscore and non-ASCII characters
        tokens = [d[t] for t in sets["train"][i].tolist()]
        assert tokens[-1] == "</s>"
        assert "".join(names.get(t, t) for t in tokens[:-1]) == text.split("\n")[i]


def test_text_word(jobs, inputs, fairseq_data):
    job = jobs["text_word"]
    assert_ok(job.result())
    meta = metadata(job.out)
    data = inputs["corpus"].read_bytes()
    sizes = meta["split"]["bytes"]
    assert sum(sizes.values()) == len(data)
    starts = {"train": 0, "valid": sizes["train"], "test": sizes["train"] + sizes["valid"]}
    for split in SPLITS:
        part = data[starts[split] : starts[split] + sizes[split]].decode()
        assert part.endswith("\n")
        lines = part.split("\n")[:-1]  # (the text has \r inside lines: not a line end for fairseq)
        assert meta["splits"][split]["tokens"] == sum(len(line.split()) + 1 for line in lines)
        if split == "train":
            assert meta["vocab_size"] == len({w for line in lines for w in line.split()}) + 1
    d, sets = load_splits(fairseq_data, job.out)
    assert d.string(sets["train"][0]) == " ".join(data.decode().split("\n")[0].split())


def test_text_byte_accepts_any_bytes(inputs, tmp_path, fairseq_data):
    out = tmp_path / "bytes"
    result = run(
        "text",
        "--train",
        inputs["latin1"],
        "--valid",
        inputs["enwik8_bytes"],
        "--test",
        inputs["latin1"],
        "--level",
        "byte",
        "--binarizer",
        "fast",
        "--out",
        out,
        "--name",
        "mixed",
    )
    assert_ok(result)
    meta = metadata(out)
    assert meta["dataset"] == "mixed" and meta["unit"] == "byte"
    assert meta["splits"]["valid"]["oov"] == 0  # fixed byte dictionary: nothing is <unk>
    _, sets = load_splits(fairseq_data, out)
    assert not np.any(flat(sets["valid"]) == UNK)


def test_sentencepiece(jobs, inputs, fairseq_data):
    import sentencepiece as spm

    job = jobs["spm"]
    assert_ok(job.result())
    out = job.out
    meta = metadata(out)
    assert meta["unit"] == "subword" and meta["sentencepiece"]["model_type"] == "bpe"
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert sp.get_piece_size() == 300
    d, sets = load_splits(fairseq_data, out)
    for split in SPLITS:
        text = inputs[f"spm_{split}"].read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]
        stats = meta["splits"][split]
        assert stats["tokens"] == sum(len(sp.encode(line)) + 1 for line in lines)
        assert stats["chars"] == len(text)
        assert stats["words"] == sum(len(line.split()) + 1 for line in lines)
    first = inputs["spm_train"].read_text(encoding="utf-8").split("\n")[0]
    pieces = d.string(sets["train"][0]).split()
    assert sp.decode_pieces(pieces) == first


# ----------------------------------------------------------------------------------------------------
# bad input: one "error:" line, exit code 2, nothing written


def test_missing_raw_path(tmp_path):
    out = tmp_path / "ptb"
    assert_error(run("ptb", "--raw", tmp_path / "nope.tgz", "--out", out), "does not exist", "--raw")
    assert not out.exists()


def test_checksum_mismatch_raw(inputs, tmp_path):
    out = tmp_path / "e"
    result = run("enwik8", "--raw", inputs["enwik8_zip"], "--sha256", "0" * 64, "--out", out)
    assert_error(result, "checksum mismatch")
    assert not out.exists()
    no_leftovers(out)


def test_checksum_mismatch_download(inputs, tmp_path):
    """The download path, offline: a file:// mirror whose content is not the official enwik8.zip."""
    out = tmp_path / "e"
    result = run("enwik8", "--url", inputs["enwik8_zip"].as_uri(), "--out", out)
    assert_error(result, "checksum mismatch", "547994d9")
    assert not out.exists()
    no_leftovers(out)
    # PTB has no published archive checksum: the split files are checked after the download
    result = run("ptb", "--url", inputs["ptb_tgz"].as_uri(), "--out", out)
    assert_error(result, "checksum mismatch", "train split")
    assert not out.exists()
    no_leftovers(out)


def test_existing_output_untouched(inputs, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "dict.txt").write_text("precious\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    for result in (
        run("ptb", "--raw", inputs["ptb_tgz"], "--out", out),
        run("text", "--train", inputs["corpus"], "--level", "byte", "--out", out),
        run(
            "sentencepiece",
            *[a for s in SPLITS for a in (f"--{s}", inputs["corpus"])],
            "--vocab-size",
            50,
            "--out",
            out,
        ),
    ):
        assert_error(result, "already exists", "choose another --out or delete it")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    no_leftovers(out)
    (tmp_path / "file").write_text("x")
    assert_error(run("enwik8", "--raw", inputs["enwik8_zip"], "--out", tmp_path / "file"), "not a directory")


def test_empty_output_dir_is_used(inputs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    files = [a for s in SPLITS for a in (f"--{s}", inputs["latin1"])]
    assert_ok(run("text", *files, "--level", "byte", "--binarizer", "fast", "--out", out))
    assert (out / "metadata.json").is_file()
    no_leftovers(out)


def test_not_utf8_for_word_and_char_levels(inputs, tmp_path):
    out = tmp_path / "t"
    for level in ("word", "char"):
        assert_error(
            run("text", "--train", inputs["latin1"], "--level", level, "--out", out), "not valid UTF-8", "byte"
        )
    raw = tmp_path / "wt"
    raw.mkdir()
    for split in SPLITS:
        (raw / f"wiki.{split}.tokens").write_bytes(inputs["latin1"].read_bytes())
    assert_error(run("wikitext", "--variant", "2", "--raw", raw, "--out", out), "wiki.train.tokens", "not valid UTF-8")
    latin1 = [a for s in SPLITS for a in (f"--{s}", inputs["latin1"])]
    assert_error(run("sentencepiece", *latin1, "--vocab-size", 50, "--out", out), "not valid UTF-8")
    assert not out.exists()
    no_leftovers(out)


def test_split_missing_from_archive(inputs, tmp_path):
    out = tmp_path / "ptb"
    assert_error(run("ptb", "--raw", inputs["ptb_no_valid"], "--out", out), "valid split missing", "ptb.valid.txt")
    assert not out.exists()
    no_leftovers(out)
    raw = tmp_path / "dir"
    raw.mkdir()
    (raw / "ptb.train.txt").write_text("a b\n")
    assert_error(run("ptb", "--raw", raw, "--out", out), "valid split missing")


def test_other_bad_input(inputs, tmp_path):
    out = tmp_path / "x"
    corpus = inputs["corpus"]
    assert_error(run("enwik8", "--raw", inputs["broken_zip"], "--out", out), "cannot read zip")
    assert_error(
        run("enwik8", "--raw", inputs["enwik8_zip"], "--out", out), "not more than --valid-bytes + --test-bytes"
    )
    assert_error(
        run("text", "--train", corpus, "--valid", corpus, "--level", "word", "--out", out), "both --valid and --test"
    )
    assert_error(run("text", "--train", corpus, "--split", "0.5,0.6", "--level", "word", "--out", out), "--split")
    assert_error(run("text", "--train", corpus, "--level", "words", "--out", out), "--level")
    assert_error(run("ptb", "--out", out, "--no-such-option"), "unrecognized arguments")
    spm_args = [a for s in SPLITS for a in (f"--{s}", inputs["spm_valid"])]
    assert_error(run("sentencepiece", *spm_args, "--vocab-size", 100000, "--out", out), "--vocab-size")
    assert not out.exists()
    no_leftovers(out)


def test_sigterm_swallowed_by_a_fork_hook_still_stops_the_commit(tmp_path, monkeypatch):
    """A SIGTERM whose KeyboardInterrupt Python ignored (logging's at-fork hook swallows it when the
    signal lands during a fork) must still keep the build from being published."""
    from preprocess import common

    out = tmp_path / "out"
    monkeypatch.setattr(common, "_terminated", False)
    with pytest.raises(KeyboardInterrupt):
        with common.Build(out) as build:
            (build.dest / "dict.txt").write_text("a 1\n")
            try:
                common._terminate(signal.SIGTERM, None)
            except KeyboardInterrupt:
                pass  # what the at-fork hook does with it
            build.commit()
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_interrupted_run_leaves_nothing(inputs, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        cmd("text", "--train", inputs["corpus"], "--level", "word", "--out", out),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".interrupted.tmp-*/work/*.tok")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().startswith("error: interrupted")
    assert not out.exists()
    no_leftovers(out)

"""Hostile input, property-based (hypothesis), in bounded time.

- ``preprocess.text`` at the byte and char levels, on random bytes / random text (empty files, mixed
  ``\\n``/``\\r\\n``/``\\r`` newlines, every kind of whitespace, non-BMP characters, long lines): it either
  writes a data-bin whose tokens decode back to exactly the input, with the counts of ``metadata.json``,
  or stops with one ``error:`` line; never a traceback. Word and char levels on invalid UTF-8: one line.
- ``dict.txt`` with duplicates or garbage: one ``error:`` line from ``segment_lm``.
- ``efficient_lm`` configuration: random combinations of the public flags, including every option of
  every registered attention (drawn from its config dataclass, so a new mechanism is fuzzed with no new
  test code), either build a model that passes a forward/backward over two consecutive segments with
  finite loss and gradients, or are rejected with ``UserError``; never another exception.

The examples are derandomized (the same cases on every CI run, each run < 40 s on one core);
``HYPOTHESIS_PROFILE=explore`` draws 20x more, new ones each time. The long-line case uses 3 MB (a real
corpus line, e.g. text8's, is 100 MB: same code path, longer).
"""

import dataclasses
import io
import json
import os
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plugins.attention import ATTENTION_REGISTRY
from plugins.errors import UserError
from plugins.modules.positional import POSITIONAL_REGISTRY
from preprocess import common, text

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile("explore", parent=settings.get_profile("ci"), max_examples=600, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = settings.default.max_examples


# ---- preprocess ------------------------------------------------------------------------------------
def preprocess(tmp: Path, level: str, splits: dict, binarizer: str = "fast"):
    """Run ``python -m preprocess.text`` in process; returns (out dir or None, stderr)."""
    argv = []
    for split, content in splits.items():
        path = tmp / f"{split}.txt"
        path.write_bytes(content)
        argv += [f"--{split}", str(path)]
    out = tmp / "out"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            common.main(text.run, [*argv, "--level", level, "--binarizer", binarizer, "--out", str(out)])
        except SystemExit as e:
            assert e.code == 2, e.code
            return None, err.getvalue()
    return out, err.getvalue()


def decoded(out: Path, split: str, level: str) -> list:
    """The split's symbols (bytes or characters; ``None`` for ``<unk>``), rebuilt from the binarized
    tokens and dict.txt; ``</s>`` is the newline."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    if (out / f"{split}.bin").stat().st_size == 0:  # an empty split (fairseq cannot mmap it)
        return []
    symbols = ["<s>", "<pad>", "\n", None] + [
        line.rsplit(" ", 1)[0] for line in (out / "dict.txt").read_text(encoding="utf-8").splitlines()
    ]
    dataset = MMapIndexedDataset(str(out / split))
    ids = np.concatenate([dataset[i].numpy() for i in range(len(dataset))])
    if level == "byte":
        return [b"\n"[0] if i == 2 else int(symbols[i]) for i in ids]
    tokens = [symbols[i] for i in ids]
    return [" " if s == "_" else chr(int(s[2:], 16)) if s and s.startswith("U+") and len(s) > 2 else s for s in tokens]


def expected_symbols(content: bytes, level: str, train: bytes) -> list:
    """What the split must decode to: fairseq ends the last line with </s> even without a final newline;
    characters not in train are <unk> (valid/test)."""
    if content and not content.endswith(b"\n"):
        content += b"\n"
    if level == "byte":
        return list(content)
    seen = set(train.decode("utf-8")) | {"\n"}
    return [c if c in seen else None for c in content.decode("utf-8")]


def check_roundtrip(tmp: Path, level: str, splits: dict) -> None:
    out, err = preprocess(tmp, level, splits)
    if out is None:  # refused: exactly one clear line, no traceback
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return
    meta = json.loads((out / "metadata.json").read_text())
    for split, content in splits.items():
        rebuilt, expected = decoded(out, split, level), expected_symbols(content, level, splits["train"])
        assert rebuilt == expected, (split, content[:80], rebuilt[:80])
        assert meta["splits"][split]["tokens"] == len(expected)
        if split != "train":
            assert meta["splits"][split]["oov"] == expected.count(None)


NEWLINES = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\t", " ", "_"])
TEXT = st.lists(st.one_of(st.text(max_size=12), NEWLINES), max_size=20).map("".join)


@settings(max_examples=EXAMPLES)
@given(splits=st.fixed_dictionaries({s: st.binary(max_size=300) for s in ("train", "valid", "test")}))
def test_byte_level_roundtrips_any_bytes(tmp_path_factory, splits):
    check_roundtrip(tmp_path_factory.mktemp("byte"), "byte", splits)


@settings(max_examples=EXAMPLES)
@given(splits=st.fixed_dictionaries({s: TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) for s in ("train", "valid", "test")}))  # fmt: skip
def test_char_level_roundtrips_any_text(tmp_path_factory, splits):
    check_roundtrip(tmp_path_factory.mktemp("char"), "char", splits)


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(max_examples=EXAMPLES)
@given(bad=st.binary(min_size=1, max_size=200).filter(_invalid_utf8), level=st.sampled_from(["char", "word"]))
def test_invalid_utf8_is_one_clear_line(tmp_path_factory, bad, level):
    out, err = preprocess(
        tmp_path_factory.mktemp("utf8"), level, {"train": b"ok\n", "valid": bad, "test": b"x\n"}, "auto"
    )
    assert out is None
    assert err.strip().count("\n") == 0 and "valid.txt is not valid UTF-8" in err, err


def test_a_long_single_line_is_binarized(tmp_path):
    """3 MB on one line (text8 has 100 MB on one): the automatic binarizer streams it in process."""
    rng = np.random.default_rng(0)
    line = bytes(rng.choice(list(b"abcdefghij _"), 3_000_000).astype(np.uint8))
    out, err = preprocess(tmp_path, "char", {"train": line, "valid": b"abc", "test": b"cab\n"}, binarizer="auto")
    assert out is not None, err
    assert json.loads((out / "metadata.json").read_text())["splits"]["train"]["tokens"] == 3_000_001
    assert "".join(decoded(out, "train", "char")).encode() == line + b"\n"


def test_an_empty_split_is_binarized_and_then_refused_by_training_with_one_line(tmp_path):
    from fairseq import options, tasks

    out, err = preprocess(tmp_path, "byte", {"train": b"abc\n" * 50, "valid": b"", "test": b"x"})
    assert out is not None and json.loads((out / "metadata.json").read_text())["splits"]["valid"]["tokens"] == 0
    argv = [str(out), "--user-dir", str(Path(text.__file__).parents[1] / "plugins"), "--task", "segment_lm",
            "--arch", "full_tiny", "--tokens-per-sample", "8", "--batch-size", "2"]  # fmt: skip
    task = tasks.setup_task(options.parse_args_and_arch(options.get_training_parser(), argv))
    task.load_dataset("train")
    with pytest.raises(UserError, match="split 'valid' .* is empty"):
        task.load_dataset("valid")


@pytest.mark.parametrize(
    "content, message",
    [
        ("a 1\nb 2\na 3\n", "Duplicate"),  # a word twice
        ("a 1\nb\n", "Incorrect dictionary format"),  # no count
        ("a x\n", "Incorrect dictionary format"),  # count not a number
    ],
)
def test_a_bad_dictionary_is_one_clear_line(tmp_path, content, message):
    from argparse import Namespace

    from plugins.tasks.segment_lm import SegmentLMTask

    (tmp_path / "dict.txt").write_text(content)
    args = Namespace(data=str(tmp_path), tokens_per_sample=8, sample_break_mode="none", output_dictionary_size=-1)
    with pytest.raises(UserError, match=message):
        SegmentLMTask.setup_task(args)
    (tmp_path / "dict.txt").write_bytes(os.urandom(64) + b"\xff\xfe")  # not even text
    with pytest.raises(UserError, match="dict.txt"):
        SegmentLMTask.setup_task(args)


# ---- model configuration ---------------------------------------------------------------------------
def mostly(valid: list, invalid: list = ()):
    """Valid values three times as often as the invalid ones, so that many combinations get built."""
    return st.sampled_from(list(valid) * 3 + list(invalid))


def _strategy_for(f: dataclasses.Field):
    """Values for one attention option, from its type: its default, edge cases and some invalid ones."""
    kind = f.type
    if typing.get_origin(kind) is typing.Union:
        kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
    choices = getattr(kind, "__members__", None)  # fairseq ChoiceEnum
    if choices:
        return mostly(list(choices), ["nosuch"])
    if kind is bool:
        return mostly([f.default], [not f.default])
    if kind is int:
        return st.one_of(st.just(f.default), st.just(f.default), st.integers(-2, 9))
    if kind is float:
        return st.one_of(st.just(f.default), st.just(f.default), st.floats(-1.0, 2.0, allow_nan=False))
    return st.just(f.default)


ATTENTION_OPTIONS = {f.name: f for e in ATTENTION_REGISTRY.values() for f in dataclasses.fields(e.config)}
CUTOFFS = mostly([None, None, "8", "6,12"], ["12,6", "30", "8,8", "x"])
OTHER_OPTIONS = st.fixed_dictionaries(
    {
        "mem_len": mostly([0, 0, 4, 10], [-1]),
        "decoder_layers": mostly([1, 2, 3], [0]),
        "decoder_embed_dim": mostly([8, 12, 16], [0]),
        "decoder_ffn_embed_dim": mostly([0, 8, 24], [-1]),
        "decoder_attention_heads": mostly([1, 2, 4], [3, -1]),
        "decoder_normalize_before": st.booleans(),
        "share_layers": st.booleans(),
        "share_decoder_input_output_embed": st.booleans(),
        "no_scale_embedding": st.booleans(),
        "adaptive_input": mostly([False, False, True]),
        "adaptive_input_cutoff": CUTOFFS,
        "adaptive_input_factor": st.sampled_from([1, 2, 4]),
        "adaptive_softmax_cutoff": CUTOFFS,
        "adaptive_softmax_factor": st.sampled_from([1, 2, 4]),
        "tie_adaptive_weights": mostly([False, False, True]),
        "tie_adaptive_proj": st.booleans(),
        "tokens_per_sample": st.integers(1, 12),
        "max_target_positions": mostly([None, 64], [4]),
        **{name: _strategy_for(f) for name, f in sorted(ATTENTION_OPTIONS.items())},
    }
)


@st.composite
def CONFIGS(draw):
    """An attention (or an unknown name), positions that mostly suit it, then everything else."""
    attention = draw(mostly(sorted(ATTENTION_REGISTRY), ["nosuch"]))
    cls = ATTENTION_REGISTRY[attention].cls if attention in ATTENTION_REGISTRY else None
    suits = [] if cls is None else list(cls.encodes_positions)
    if cls is not None and not cls.requires_own_positions:
        suits += ["none", "sinusoidal", "learned"]
    pos_emb = draw(mostly(suits or ["none"], sorted(POSITIONAL_REGISTRY)))
    return {"attention": attention, "pos_emb": pos_emb, **draw(OTHER_OPTIONS)}


@settings(max_examples=8 * EXAMPLES)
@given(options=CONFIGS(), seed=st.integers(0, 3))
def test_any_flag_combination_trains_or_is_rejected_with_a_message(lm, options, seed):
    try:
        model = lm(seed=seed, **options)
    except UserError:
        event("rejected with UserError")
        return
    event("built, trained two segments")
    model.train()
    T = options["tokens_per_sample"]
    tokens = torch.randint(4, len(model.decoder.dictionary), (2, 2 * T + 1), generator=torch.Generator().manual_seed(seed))  # fmt: skip
    from plugins.criterions.aux_cross_entropy import AuxCrossEntropyCriterion

    criterion = AuxCrossEntropyCriterion(_Task(model.decoder.dictionary), sentence_avg=False)
    for offset in (0, T):  # two consecutive segments: the second one uses the memory, if any
        sample = {
            "net_input": {"src_tokens": tokens[:, offset : offset + T], "stream_offset": offset},
            "target": tokens[:, offset + 1 : offset + T + 1],
            "ntokens": 2 * T,
        }
        model.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        assert torch.isfinite(loss), options
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), options


class _Task:
    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = dictionary
        self.token_unit = "word"

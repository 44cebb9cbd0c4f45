"""Any text file(s) at the byte, character or word level.

    python -m preprocess.text --train T --valid V --test S --level word --out data-bin/NAME
    python -m preprocess.text --train ALL --split 0.98,0.01,0.01 --level byte --out data-bin/NAME

Without ``--valid``/``--test`` the train file is cut into three contiguous parts by ``--split`` (default
0.98,0.01,0.01; in that order, like enwik8's split), each cut moved forward to the next line start (to
the next UTF-8 character if no newline follows). Levels (see :mod:`preprocess.common`):

- ``byte``: any bytes; decimal byte tokens, newline = ``</s>``, fixed 256-entry dictionary (no ``<unk>``).
- ``char``: UTF-8; one token per character, space written ``_``, newline = ``</s>``; dictionary from train.
- ``word``: UTF-8; whitespace-separated words, ``</s>`` at each line end; dictionary from train (all words).

Inputs may be ``.xz``/``.gz``/``.bz2`` compressed. Valid/test symbols not seen in train become ``<unk>`` (``oov`` in metadata.json). ``--name`` (default:
the ``--out`` directory name) is the dataset name in metadata.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preprocess import common


def parse_split(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise common.PreprocessError(
            f"--split {value!r} must be three positive fractions summing to 1, e.g. 0.98,0.01,0.01"
        )
    return parts  # type: ignore[return-value]


def line_cut(path: Path, offset: int) -> int:
    """The first line start at or after ``offset`` (else the next UTF-8 character start)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        if f.read(1) == b"\n":
            return offset
        pos = offset
        for chunk in iter(lambda: f.read(common.CHUNK), b""):
            i = chunk.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(chunk)
        f.seek(offset)
        head = f.read(4)
    skip = 0
    while skip < len(head) and head[skip] & 0xC0 == 0x80:
        skip += 1
    return offset + skip


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("text", __doc__)
    parser.add_argument("--train", required=True, metavar="FILE", help="train text (or all text, with --split)")
    parser.add_argument("--valid", metavar="FILE", help="valid text (give --valid and --test, or neither)")
    parser.add_argument("--test", metavar="FILE", help="test text")
    parser.add_argument(
        "--split", help="fractions cut from --train when --valid/--test are not given (default 0.98,0.01,0.01)"
    )
    parser.add_argument("--level", choices=("byte", "char", "word"), required=True, help="token unit")
    parser.add_argument("--name", help="dataset name for metadata.json (default: the --out directory name)")
    common.add_binarizer_arg(parser)
    args = parser.parse_args(argv)

    if (args.valid is None) != (args.test is None):
        raise common.PreprocessError("give both --valid and --test, or neither (then --split cuts them from --train)")
    if args.valid is not None and args.split is not None:
        raise common.PreprocessError("--split cuts valid/test from --train; it cannot be combined with --valid/--test")
    if args.level == "word" and args.binarizer == "fast":
        raise common.PreprocessError("--binarizer fast is for --level byte or char; word level always uses fairseq")
    given = {"train": args.train, "valid": args.valid, "test": args.test}
    files = {s: common.check_exists(p, f"--{s}", "an existing text file") for s, p in given.items() if p is not None}
    for split, path in files.items():
        if not path.is_file():
            raise common.PreprocessError(f"--{split} {path} is not a file; pass a text file")
    common.check_out(Path(args.out))  # before decompressing anything
    with common.plain_files(files) as plain:  # .xz/.gz/.bz2 inputs, decompressed
        build_from(args, given, plain)


def build_from(args, given: dict, files: dict[str, Path]) -> None:
    """Check ``files`` (uncompressed) and binarize them into ``args.out``."""
    for split, path in files.items():
        if args.level != "byte":
            common.check_utf8(path, str(given[split]))
    ranges: dict[str, tuple[int, int]] | None = None
    fractions = None
    if args.valid is None:
        fractions = parse_split(args.split or "0.98,0.01,0.01")
        size = files["train"].stat().st_size
        cut1 = line_cut(files["train"], round(fractions[0] * size))
        cut2 = line_cut(files["train"], max(cut1, round((fractions[0] + fractions[1]) * size)))
        ranges = {"train": (0, cut1), "valid": (cut1, cut2 - cut1), "test": (cut2, size - cut2)}
        for split, (_, n) in ranges.items():
            if n <= 0:
                raise common.PreprocessError(
                    f"--split {args.split or '0.98,0.01,0.01'} leaves the {split} split of {given['train']} empty "
                    "(too few lines); use other fractions or pass --valid and --test"
                )
    common.check_out(Path(args.out))
    common.check_fairseq()

    with common.Build(Path(args.out)) as build:
        if ranges is not None:  # cut --train into three files
            src = files["train"]
            files = {}
            for split, (start, n) in ranges.items():
                files[split] = build.work / f"{split}.txt"
                with open(files[split], "wb") as out:
                    for chunk in common.iter_bytes(src, start, n):
                        out.write(chunk)
            common.log("cut " + ", ".join(f"{s} {n:,} bytes" for s, (_, n) in ranges.items()) + f" from {src}")
        used = "fairseq"
        if args.level == "word":
            labels = {
                s: str(given["train"] if ranges else given[s]) + (f" ({s} part)" if ranges else "") for s in files
            }
            stats, vocab_size = common.preprocess_words(build, files, args.workers, labels)
        else:
            if args.level == "byte":
                sources = {s: (lambda p=p: common.iter_bytes(p)) for s, p in files.items()}
            else:
                sources = {s: (lambda p=p: common.iter_text(p, str(p))) for s, p in files.items()}
            stats, vocab_size, used = common.preprocess_stream(build, args.level, sources, args.workers, args.binarizer)
        extra = {"files": {s: str(Path(p).absolute()) for s, p in given.items() if p is not None}}
        if fractions is not None:
            extra["split"] = {"fractions": fractions, "bytes": {s: n for s, (_, n) in ranges.items()}}  # type: ignore[union-attr]
        common.write_metadata(
            build,
            dataset=args.name or Path(args.out).name,
            unit=args.level,
            vocab_size=vocab_size,
            stats=stats,
            source=str(Path(args.train).absolute()),
            sha256=common.sha256_file(Path(args.train)),
            binarizer=used,
            **extra,
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

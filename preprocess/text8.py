"""text8 at the character level: 10^8 characters of Wikipedia text, lowercase ``a-z`` and space, one line.

Source: http://mattmahoney.net/dc/text8.zip, member ``text8`` (100,000,000 characters); Matt Mahoney's
cleaning of enwik9 (http://mattmahoney.net/dc/textdata.html).

Standard split (Mikolov et al. 2012, "Subword language modeling with neural networks"; Transformer-XL's
``prep_text8.py``): the first 90M characters are train, the next 5M valid, the last 5M test. Each
character is a token and a space is written ``_``, as Transformer-XL does (it additionally strips each
split's leading/trailing space; we keep them, so the splits are exactly 90M/5M/5M characters). Each split
is one line, so fairseq appends one ``</s>`` to it (train: 90,000,001 tokens); ``vocab_size`` is 27.
Report bits per character (bpc).

Binarizing: fairseq-preprocess's binarizer holds a whole line as a Python list of strings. On a 90M
character line it needed more than 1.6 GB and was still running after 9 CPU-minutes, so by default
(``--binarizer fast``) the splits are binarized in-process, streaming, into the same files fairseq would
write (same ``dict.txt``, ``.bin`` and ``.idx``, byte for byte; the tests compare both binarizers).
``--binarizer fairseq`` runs the real fairseq-preprocess instead.

    python -m preprocess.text8 --out data-bin/text8                # download (31 MB)
    python -m preprocess.text8 --raw text8.zip --out data-bin/text8
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preprocess import common
from preprocess.common import Download

DOWNLOAD = Download(
    "http://mattmahoney.net/dc/text8.zip",
    # No sha256 is published. The size is the one TensorFlow's word2vec tutorial checks
    # (maybe_download('text8.zip', 31344016)); the member must also hold exactly 10^8 characters.
    size=31_344_016,
)
OFFICIAL_CHARS = 100_000_000


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("text8", __doc__, DOWNLOAD)
    parser.add_argument("--valid-chars", type=int, default=5_000_000, help="characters held out for valid (default 5M)")
    parser.add_argument("--test-chars", type=int, default=5_000_000, help="last characters, for test (default 5M)")
    common.add_binarizer_arg(parser, default="fast")
    args = parser.parse_args(argv)
    common.check_positive(args, "valid_chars", "test_chars")
    common.check_input_args(args)
    common.check_out(Path(args.out))
    common.check_fairseq()

    with common.Build(Path(args.out)) as build:
        inp = common.fetch_input(args, DOWNLOAD, build.work)
        path = common.locate_members(
            inp, {"text8": ["text8"]}, build.work, "text8.zip (member text8) or the text8 file", single_file_ok=True
        )["text8"]
        text = "".join(common.iter_text(path, str(args.raw or "text8")))
        if len(text) != OFFICIAL_CHARS:
            if not args.raw and not args.sha256:  # the official file (an explicit --sha256 vouches for another)
                raise common.PreprocessError(
                    f"the downloaded text8 has {len(text):,} characters, not {OFFICIAL_CHARS:,}; "
                    "the download is corrupt or changed upstream: retry, or pass a copy you trust with --raw"
                )
            common.log(f"note: {len(text):,} characters, not the official {OFFICIAL_CHARS:,}")
        if "\n" in text or not set(text) <= set("abcdefghijklmnopqrstuvwxyz "):
            common.log("note: not only a-z and space (the official text8 is); other characters are kept as tokens")
        ranges = common.tail_split(len(text), args.valid_chars, args.test_chars, "char")

        def chunks(start: int, length: int):
            return (text[i : min(i + common.CHUNK, start + length)] for i in range(start, start + length, common.CHUNK))

        sources = {s: (lambda a=a, n=n: chunks(a, n)) for s, (a, n) in ranges.items()}
        stats, vocab_size, used = common.preprocess_stream(build, "char", sources, args.workers, args.binarizer)
        common.write_metadata(
            build,
            dataset="text8",
            unit="char",
            vocab_size=vocab_size,
            stats=stats,
            source=inp.source,
            sha256=inp.sha256,
            split_chars={s: n for s, (_, n) in ranges.items()},
            binarizer=used,
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

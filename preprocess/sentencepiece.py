"""Subword language-modeling data: train a sentencepiece model on train, encode every split, binarize.

Sentencepiece: Kudo & Richardson 2018 (https://github.com/google/sentencepiece); ``--model-type unigram``
(Kudo 2018, the default) or ``bpe`` (Sennrich et al. 2016). The model is trained with the Python
``sentencepiece`` package on the train file only; each line of each split is encoded to pieces, written
space-separated (fairseq-preprocess does not apply sentencepiece itself), and binarized with
fairseq-preprocess (dictionary: every piece seen in train; every line ends with ``</s>``).
The model is copied to ``--out/spm.model`` (for ``--bpe sentencepiece --sentencepiece-model``
at generation time).

``metadata.json`` records per split the pieces (``tokens``), the characters (``chars``, newlines included)
and the word-level token count (``words``: whitespace-separated words + one end of line per line), so
that subword losses can be reported per character or per word.

    python -m preprocess.sentencepiece --train T --valid V --test S --vocab-size 8000 --out data-bin/NAME
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from preprocess import common


def _lines(path: Path) -> Iterator[str]:
    for _, line in common.iter_lines(path, str(path)):
        line = line.rstrip("\n")
        if line.strip():
            yield line


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("sentencepiece", __doc__)
    for split in common.SPLITS:
        parser.add_argument(f"--{split}", required=True, metavar="FILE", help=f"{split} text (UTF-8)")
    parser.add_argument("--vocab-size", type=int, required=True, help="sentencepiece vocabulary size")
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="default: unigram")
    parser.add_argument(
        "--character-coverage", type=float, default=1.0, help="characters covered by the model (default 1.0)"
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train sentencepiece on this many randomly sampled lines (default 0: all lines)",
    )
    parser.add_argument("--name", help="dataset name for metadata.json (default: the --out directory name)")
    args = parser.parse_args(argv)
    common.check_positive(args, "vocab_size")
    if not 0 < args.character_coverage <= 1:
        raise common.PreprocessError(f"--character-coverage must be in (0, 1], got {args.character_coverage}")
    files = {s: common.check_exists(getattr(args, s), f"--{s}", "an existing UTF-8 text file") for s in common.SPLITS}
    for split, path in files.items():
        if not path.is_file():
            raise common.PreprocessError(f"--{split} {path} is not a file; pass a UTF-8 text file")
    given = dict(files)
    common.check_out(Path(args.out))  # before decompressing anything
    with common.plain_files(files) as plain:  # .xz/.gz/.bz2 inputs, decompressed
        build_from(args, given, plain)


def build_from(args, given: dict[str, Path], files: dict[str, Path]) -> None:
    """Check ``files`` (uncompressed), train the sentencepiece model and binarize them into ``args.out``."""
    for split, path in files.items():
        common.check_utf8(path, str(given[split]))
    common.check_out(Path(args.out))
    common.check_fairseq()
    try:
        import sentencepiece as spm
    except ImportError:
        raise common.PreprocessError(
            "the sentencepiece package is missing; install it into this Python: pip install sentencepiece"
        ) from None

    with common.Build(Path(args.out)) as build:
        common.log(
            f"training a {args.model_type} sentencepiece model, vocabulary {args.vocab_size}, on {files['train']}"
        )
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(files["train"]),
                model_writer=model,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                shuffle_input_sentence=True,
                bos_id=-1,  # fairseq adds its own </s>; sentences are lines
                eos_id=-1,
                num_threads=max(1, args.workers),
                minloglevel=2,
            )
        except RuntimeError as exc:
            reason = re.sub(r"^.*?\] ", "", str(exc).strip())
            raise common.PreprocessError(
                f"sentencepiece training failed: {reason} (lower --vocab-size or give more training text)"
            ) from None
        (build.dest / "spm.model").write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

        def encode(batch: list[str]) -> list[list[str]]:
            return sp.encode(batch, out_type=str, num_threads=max(1, args.workers))

        stats, vocab_size = common.preprocess_words(build, files, args.workers, encode=encode)
        common.write_metadata(
            build,
            dataset=args.name or Path(args.out).name,
            unit="subword",
            vocab_size=vocab_size,
            stats=stats,
            source=str(given["train"].absolute()),
            sha256=common.sha256_file(given["train"]),
            files={s: str(p.absolute()) for s, p in given.items()},
            sentencepiece={
                "model": "spm.model",
                "model_type": args.model_type,
                "vocab_size": args.vocab_size,
                "character_coverage": args.character_coverage,
            },
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

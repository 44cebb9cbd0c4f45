"""Penn Treebank at the word level, in Mikolov's preprocessed version (10k vocabulary).

Source: Tomas Mikolov's RNNLM toolkit examples, http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz,
files ``simple-examples/data/ptb.{train,valid,test}.txt`` (Mikolov et al. 2010/2011; the split used by
Zaremba et al. 2014, Merity et al. 2018 (AWD-LSTM) and Transformer-XL): sections 0-20 train, 21-22
valid, 23-24 test; lowercase, numbers replaced by ``N``, rare words by ``<unk>``.

Words are whitespace-separated and every line (sentence) ends with fairseq's ``</s>`` (``<eos>`` in the
papers); the dictionary holds every train word. Expected: vocab_size 10000 (9999 words + end of
sentence); tokens 929,589 / 73,760 / 82,430. Report word-level perplexity.

    python -m preprocess.ptb --out data-bin/ptb                          # download (34 MB)
    python -m preprocess.ptb --raw simple-examples.tgz --out data-bin/ptb
    python -m preprocess.ptb --raw DIR --out data-bin/ptb                # DIR holds ptb.*.txt (or .txt.xz)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preprocess import common
from preprocess.common import Download

# No checksum of simple-examples.tgz is published, so after a download the three split files are
# checked instead: the sha256 below are of the uncompressed ptb.*.txt files, identical to
# pytorch/examples word_language_model/data/penn/{train,valid,test}.txt @ c456de8a (git blobs 04d78dc9,
# 7b3d9d9f, 8079cdf3), measured from the project's shared copy (shared/data/MANIFEST.md).
DOWNLOAD = Download("http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz")
SPLIT_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
EXPECTED_VOCAB = 10000


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("ptb", __doc__, DOWNLOAD)
    args = parser.parse_args(argv)
    common.check_input_args(args)
    common.check_out(Path(args.out))
    common.check_fairseq()

    with common.Build(Path(args.out)) as build:
        inp = common.fetch_input(args, DOWNLOAD, build.work)
        files = common.locate_members(
            inp,
            {s: [f"ptb.{s}.txt"] for s in common.SPLITS},
            build.work,
            "simple-examples.tgz or a directory holding ptb.{train,valid,test}.txt (optionally .xz/.gz)",
        )
        common.report_known(files, SPLIT_SHA256, "PTB", strict=not args.raw)
        stats, vocab_size = common.preprocess_words(build, files, args.workers, {s: f"ptb.{s}.txt" for s in files})
        if vocab_size != EXPECTED_VOCAB:
            common.log(f"note: vocab_size {vocab_size}, the official PTB has {EXPECTED_VOCAB}")
        common.write_metadata(
            build,
            dataset="ptb",
            unit="word",
            vocab_size=vocab_size,
            stats=stats,
            source=inp.source,
            sha256=inp.sha256,
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

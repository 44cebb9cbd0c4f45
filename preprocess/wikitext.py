"""WikiText-2 / WikiText-103 at the word level (Merity et al. 2016, "Pointer Sentinel Mixture Models").

Source: the official archives at https://s3.amazonaws.com/research.metamind.io/wikitext/ :
``wikitext-2-v1.zip`` / ``wikitext-103-v1.zip`` with ``wiki.{train,valid,test}.tokens`` (tokenized, rare
words replaced by ``<unk>``), or with ``--raw-text`` ``wikitext-{2,103}-raw-v1.zip`` with
``wiki.{train,valid,test}.raw``. The splits are the official ones (Wikipedia Good/Featured articles).

Words are whitespace-separated and every line ends with fairseq's ``</s>`` (``<eos>`` in the papers; empty
lines included); the dictionary holds every train word. Expected (tokenized files): WikiText-2
vocab_size 33278 and 2,088,628 / 217,646 / 245,569 tokens; WikiText-103 vocab_size 267735 and
103,227,021 / 217,646 / 245,569 tokens. Report word-level perplexity.

    python -m preprocess.wikitext --variant 103 --out data-bin/wikitext-103          # download (181 MB)
    python -m preprocess.wikitext --variant 2 --raw wikitext-2-v1.zip --out data-bin/wikitext-2
    python -m preprocess.wikitext --variant 2 --raw DIR --out data-bin/wikitext-2    # DIR: wiki.*.tokens(.xz)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preprocess import common
from preprocess.common import Download

BASE = "https://s3.amazonaws.com/research.metamind.io/wikitext/"
# sha256 and sizes of the archives as recorded by HuggingFace datasets (huggingface/datasets,
# datasets/wikitext/dataset_infos.json, "download_checksums"); not verifiable offline when this was written.
DOWNLOADS = {
    ("2", False): Download(
        BASE + "wikitext-2-v1.zip", "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c", 4_475_746
    ),
    ("2", True): Download(
        BASE + "wikitext-2-raw-v1.zip", "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", 4_721_645
    ),
    ("103", False): Download(
        BASE + "wikitext-103-v1.zip", "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590", 190_229_076
    ),
    ("103", True): Download(
        BASE + "wikitext-103-raw-v1.zip",
        "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
        191_984_949,
    ),
}
# sha256 of the uncompressed split files, measured from the project's shared copies (shared/data/MANIFEST.md:
# identical to pytorch/examples word_language_model/data/wikitext-2/*.txt, which are the official files).
SPLIT_SHA256 = {
    ("2", False): {
        "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
    ("2", True): {
        "valid": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
        "test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    },
}
EXPECTED_VOCAB = {("2", False): 33278, ("103", False): 267735}


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("wikitext", __doc__, Download(BASE + "wikitext-{2,103}[-raw]-v1.zip"))
    parser.add_argument("--variant", choices=("2", "103"), required=True, help="WikiText-2 or WikiText-103")
    parser.add_argument("--raw-text", action="store_true", help="the raw (untokenized, no <unk>) files wiki.*.raw")
    args = parser.parse_args(argv)
    key = (args.variant, args.raw_text)
    download = DOWNLOADS[key]
    common.check_input_args(args)
    common.check_out(Path(args.out))
    common.check_fairseq()

    ext = "raw" if args.raw_text else "tokens"
    name = f"wikitext-{args.variant}" + ("-raw" if args.raw_text else "")
    with common.Build(Path(args.out)) as build:
        inp = common.fetch_input(args, download, build.work)
        files = common.locate_members(
            inp,
            {s: [f"wiki.{s}.{ext}"] for s in common.SPLITS},
            build.work,
            f"{download.url.rsplit('/', 1)[-1]} or a directory holding wiki.{{train,valid,test}}.{ext} (optionally .xz/.gz)",
        )
        common.report_known(files, SPLIT_SHA256.get(key, {}), name, strict=False)
        labels = {s: f"wiki.{s}.{ext}" for s in files}
        stats, vocab_size = common.preprocess_words(build, files, args.workers, labels)
        if key in EXPECTED_VOCAB and vocab_size != EXPECTED_VOCAB[key]:
            common.log(f"note: vocab_size {vocab_size}, the official {name} has {EXPECTED_VOCAB[key]}")
        common.write_metadata(
            build,
            dataset=name,
            unit="word",
            vocab_size=vocab_size,
            stats=stats,
            source=inp.source,
            sha256=inp.sha256,
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

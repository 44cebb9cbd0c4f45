"""enwik8 at the byte level: the first 10^8 bytes of the English Wikipedia XML dump of March 2006.

Source: http://mattmahoney.net/dc/enwik8.zip, member ``enwik8`` (100,000,000 bytes), from the Hutter Prize
(http://prize.hutter1.net, http://mattmahoney.net/dc/textdata.html).

Standard split, as in Al-Rfou et al. 2019 ("Character-Level Language Modeling with Deeper Self-Attention")
and Transformer-XL's ``prep_enwik8.py`` (Dai et al. 2019): the first 90M bytes are train, the next 5M
valid, the last 5M test. Every byte is one token, written as its decimal value; the newline byte ends the
line, so fairseq's ``</s>`` stands for ``"\\n"``. The dictionary is the fixed 256-byte one: no ``<unk>``.
Report bits per byte (bpb).

    python -m preprocess.enwik8 --out data-bin/enwik8                 # download (36 MB)
    python -m preprocess.enwik8 --raw enwik8.zip --out data-bin/enwik8

``--raw`` also takes the unzipped ``enwik8`` file (or ``enwik8.xz``/``.gz``). ``--valid-bytes`` and
``--test-bytes`` change the held-out sizes (for small test files in the same format). Binarizing the 90M
train bytes with fairseq-preprocess takes a few minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from preprocess import common
from preprocess.common import Download

DOWNLOAD = Download(
    "http://mattmahoney.net/dc/enwik8.zip",
    # As recorded by HuggingFace datasets (huggingface/datasets, datasets/enwik8/dataset_infos.json,
    # "download_checksums"); not verifiable offline when this was written.
    sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    size=36_445_475,
)
OFFICIAL_BYTES = 100_000_000


def run(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser("enwik8", __doc__, DOWNLOAD)
    parser.add_argument("--valid-bytes", type=int, default=5_000_000, help="bytes held out for valid (default 5M)")
    parser.add_argument("--test-bytes", type=int, default=5_000_000, help="last bytes, for test (default 5M)")
    common.add_binarizer_arg(parser)
    args = parser.parse_args(argv)
    common.check_positive(args, "valid_bytes", "test_bytes")
    common.check_input_args(args)
    common.check_out(Path(args.out))
    common.check_fairseq()

    with common.Build(Path(args.out)) as build:
        inp = common.fetch_input(args, DOWNLOAD, build.work)
        data = common.locate_members(
            inp,
            {"enwik8": ["enwik8"]},
            build.work,
            "enwik8.zip (member enwik8) or the enwik8 file",
            single_file_ok=True,
        )["enwik8"]
        size = data.stat().st_size
        if size != OFFICIAL_BYTES:
            common.log(f"note: {size:,} bytes, not the official {OFFICIAL_BYTES:,}")
        ranges = common.tail_split(size, args.valid_bytes, args.test_bytes, "byte")
        sources = {s: (lambda a=a, n=n: common.iter_bytes(data, a, n)) for s, (a, n) in ranges.items()}
        stats, vocab_size, used = common.preprocess_stream(build, "byte", sources, args.workers, args.binarizer)
        common.write_metadata(
            build,
            dataset="enwik8",
            unit="byte",
            vocab_size=vocab_size,
            stats=stats,
            source=inp.source,
            sha256=inp.sha256,
            split_bytes={s: n for s, (_, n) in ranges.items()},
            binarizer=used,
        )
        build.commit()


if __name__ == "__main__":
    common.main(run)

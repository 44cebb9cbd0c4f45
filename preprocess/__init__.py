"""Turn raw corpora into fairseq binary datasets (``data-bin/<name>``), one script per dataset.

Run from the repository root; every script writes ``train/valid/test.{bin,idx}``, ``dict.txt`` and
``metadata.json`` into ``--out`` and refuses to overwrite a non-empty directory.

- ``python -m preprocess.enwik8 --out data-bin/enwik8``: bytes, 90M/5M/5M split.
- ``python -m preprocess.text8 --out data-bin/text8``: characters, 90M/5M/5M split.
- ``python -m preprocess.wikitext --variant 103 --out data-bin/wikitext-103``: words (``--raw-text`` for the raw files).
- ``python -m preprocess.ptb --out data-bin/ptb``: words, Mikolov's 10k-vocabulary Penn Treebank.
- ``python -m preprocess.text --train F --level byte|char|word --out data-bin/NAME``: any text file.
- ``python -m preprocess.sentencepiece --train F --valid F --test F --vocab-size N --out data-bin/NAME``: subwords.

Without ``--raw`` the official archive is downloaded and its checksum checked; ``--raw PATH`` takes a
local archive, file or directory instead. Bad input ends with one ``error: ...`` line and exit code 2.
Shared logic lives in :mod:`preprocess.common`.
"""

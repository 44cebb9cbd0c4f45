"""Data that is what the model was trained on: every binarized split checked before any work, and a
fingerprint of the dictionary and of the training data in every checkpoint.

fairseq reads ``<split>.idx`` / ``<split>.bin`` without checking them against each other: one flipped bit
in a size field of ``test.idx`` made ``fairseq-eval-lm`` score 20,257 targets instead of 20,001 with no
warning; a truncated ``.bin`` fails with ``ValueError: buffer is smaller than requested size`` (no file
named), a corrupt element-type byte with ``AttributeError ... _bin_buffer_mmap``. And nothing ties a
checkpoint to its data: a model evaluated on another corpus whose dictionary has the same size scores
garbage silently (ids mean other words).

Checked before any work (:func:`check_data_dir`, from ``segment_lm``'s ``setup_task``), each failure one
``error:`` line naming the file and saying to binarize again:

- ``metadata.json`` (written by ``preprocess/``) parses; a directory without it (plain
  ``fairseq-preprocess`` output) skips the checks that need it;
- ``dict.txt`` is the dictionary the splits were binarized with: its sha256 (``dict_sha256``, recorded
  at preprocess time) or at least its size (``fairseq_dict_size``);
- every split with an mmap index (``MMIDIDX``): a known element type; an index of exactly
  ``26 + 12 n`` bytes for its ``n`` sequences; pointers that are the running sum of the sizes; a ``.bin``
  of exactly ``sum(sizes) x itemsize`` bytes; ``sum(sizes)`` = the split's ``tokens`` in ``metadata.json``.

Every checkpoint the task writes holds ``task_state["data_fingerprint"]`` (:func:`fingerprint`):

- ``dictionary``: sha256 of its symbols in id order (what a token id means; the counts in ``dict.txt``
  do not matter) and its size;
- ``train``: sha256 of the training ``.bin``'s size and its first and last MiB (cheap at any size).

At ``fairseq-eval-lm``, ``fairseq-interactive`` and the hub (the task's ``load_state_dict``) and at a
resume (``plugins/checkpointing.py``) another dictionary is refused with one line (the scores would be
meaningless); another training set with the same dictionary at a resume is one warning line. A checkpoint
older than the fingerprint loads as before.
"""

import hashlib
import json
import logging
import os
import struct
from typing import Optional

import numpy as np

from .errors import UserError

logger = logging.getLogger(__name__)

MMAP_MAGIC = b"MMIDIDX\x00\x00"  # fairseq.data.indexed_dataset.MMapIndexedDataset.Index._HDR_MAGIC
HEADER_BYTES = 9 + 8 + 1 + 8  # magic, version <Q, element type <B, number of sequences <Q
# fairseq.data.indexed_dataset._code_to_dtype: element-type byte -> item size in bytes
ITEM_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}
EDGE_BYTES = 1 << 20  # the training data's fingerprint reads its first and last MiB
REBINARIZE = "binarize the data again (python -m preprocess.<dataset>, or fairseq-preprocess)"


# ---- metadata.json -------------------------------------------------------------------------------
def read_metadata(data_dir: str) -> Optional[dict]:
    """``<data_dir>/metadata.json`` as a dict, ``None`` if absent; a broken file is one ``error:`` line."""
    path = os.path.join(data_dir, "metadata.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({str(e).splitlines()[0]}): restore it from a copy or {REBINARIZE}"
        ) from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object: restore it from a copy or {REBINARIZE}")
    return meta


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the splits ----------------------------------------------------------------------------------
def check_split(prefix: str, expected_tokens: Optional[int] = None) -> Optional[int]:
    """Check ``prefix.idx`` / ``prefix.bin`` (an mmap-indexed split) against each other and against the
    token count recorded for it; returns the token count (``None`` if the index is not mmap-format)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    fix = f"the file is damaged or does not belong to this data: {REBINARIZE}"
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if not header.startswith(MMAP_MAGIC):
        return None  # another fairseq format (cached/lazy): fairseq checks it itself
    if len(header) < HEADER_BYTES:
        raise UserError(f"{idx} is truncated ({len(header)} bytes, shorter than its header): {fix}")
    code, n = header[17], struct.unpack("<Q", header[18:26])[0]
    if code not in ITEM_SIZE:
        raise UserError(f"{idx} has an unknown element-type byte ({code}, at offset 17): {fix}")
    itemsize, idx_bytes = ITEM_SIZE[code], os.path.getsize(idx)
    if idx_bytes != HEADER_BYTES + 12 * n:
        raise UserError(
            f"{idx} has {idx_bytes:,} bytes, not the {HEADER_BYTES + 12 * n:,} of an index of {n:,} sequences: {fix}"
        )
    sizes = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(n,))  # [n]
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * n, shape=(n,))  # [n]
    tokens = int(sizes.astype(np.int64).sum())
    if n and ((sizes < 0).any() or not np.array_equal(_offsets(sizes, itemsize), pointers)):
        other = [s for s in sorted(set(ITEM_SIZE.values())) if np.array_equal(_offsets(sizes, s), pointers)]
        if other and n > 1:
            raise UserError(
                f"{idx} has a damaged element-type byte (offset 17): it says {itemsize}-byte tokens (code {code}) "
                f"but its offsets are of {other[0]}-byte tokens: {fix}"
            )
        raise UserError(f"{idx} has sequence sizes that do not add up to its offsets (a damaged size field): {fix}")
    bin_bytes = os.path.getsize(bin_) if os.path.exists(bin_) else None
    if bin_bytes is not None and bin_bytes != tokens * itemsize:
        what = "truncated" if bin_bytes < tokens * itemsize else "longer than its index says"
        raise UserError(
            f"{bin_} is {what}: {bin_bytes:,} bytes, where {idx} describes {tokens:,} tokens of {itemsize} "
            f"bytes ({tokens * itemsize:,}): {fix}"
        )
    if expected_tokens is not None and tokens != expected_tokens:
        raise UserError(
            f"{prefix}.idx/.bin hold {tokens:,} tokens but metadata.json records {expected_tokens:,} for this "
            f"split: {fix}"
        )
    return tokens


def _offsets(sizes: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of every sequence in the ``.bin``: the running sum of the sizes before it."""
    starts = np.zeros(len(sizes), dtype=np.int64)  # [n]
    np.cumsum(sizes[:-1].astype(np.int64) * itemsize, out=starts[1:])
    return starts


def check_data_dir(data_dir: str, dictionary) -> Optional[dict]:
    """Every check of the module docstring on one data directory, before any work; returns its metadata."""
    meta = read_metadata(data_dir)
    dict_path = os.path.join(data_dir, "dict.txt")
    if meta is not None:
        recorded = meta.get("dict_sha256")
        if recorded and sha256_file(dict_path) != recorded:
            raise UserError(
                f"{dict_path} is not the dictionary this data was binarized with (its sha256 differs from "
                f"metadata.json's dict_sha256): put the data's own dict.txt back, or {REBINARIZE}"
            )
        size = meta.get("fairseq_dict_size")
        if size is not None and size != len(dictionary):
            raise UserError(
                f"{dict_path} has {len(dictionary):,} entries but this data was binarized with a dictionary of "
                f"{size:,} (metadata.json): put the data's own dict.txt back, or {REBINARIZE}"
            )
    recorded_splits = (meta or {}).get("splits") or {}
    names = sorted({f[: -len(".idx")] for f in os.listdir(data_dir) if f.endswith(".idx")})
    for split in names:
        expected = recorded_splits.get(split, {}).get("tokens") if isinstance(recorded_splits, dict) else None
        check_split(os.path.join(data_dir, split), expected)
    return meta


# ---- fingerprints --------------------------------------------------------------------------------
def dictionary_fingerprint(dictionary) -> dict:
    """sha256 of the symbols in id order (one per line) and their number: what every token id means."""
    text = "\n".join(dictionary.symbols).encode("utf-8")
    return {"sha256": hashlib.sha256(text).hexdigest(), "size": len(dictionary)}


def data_fingerprint(bin_path: str) -> Optional[dict]:
    """sha256 of a ``.bin``'s size and its first and last MiB; ``None`` if there is no such file."""
    if not os.path.exists(bin_path):
        return None
    size = os.path.getsize(bin_path)
    h = hashlib.sha256(str(size).encode())
    with open(bin_path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        f.seek(max(size - EDGE_BYTES, 0))
        h.update(f.read(EDGE_BYTES))
    return {"sha256": h.hexdigest(), "bytes": size}


def fingerprint(dictionary, data_dir: str, train_subset: str) -> dict:
    return {
        "dictionary": dictionary_fingerprint(dictionary),
        "train": data_fingerprint(os.path.join(data_dir, train_subset + ".bin")),
    }


def compare(saved: Optional[dict], current: dict, checkpoint: str, data_dir: str, resume: bool) -> None:
    """Refuse another dictionary (one ``error:`` line); at a resume, warn once about other training data.
    ``saved`` is ``None`` for a checkpoint older than the fingerprint: loaded as before, one info line."""
    if not saved:
        logger.info(f"{checkpoint} has no data fingerprint (written by an older version): dictionary not checked")
        return
    old, new = saved.get("dictionary") or {}, current["dictionary"]
    if old.get("sha256") and old["sha256"] != new["sha256"]:
        other_symbols = ", the same number but other symbols" if old.get("size") == new["size"] else ""
        raise UserError(
            f"{checkpoint} was trained with a dictionary of {old.get('size')} entries, another dictionary than "
            f"{os.path.join(data_dir, 'dict.txt')} ({new['size']} entries{other_symbols}): token ids would mean "
            "other symbols and every score would be meaningless. Give the data directory the model was trained "
            "on, or binarize this text with its dictionary (fairseq-preprocess --srcdict <that dict.txt>)"
        )
    old_train, new_train = saved.get("train"), current.get("train")
    if resume and old_train and new_train and old_train["sha256"] != new_train["sha256"]:
        logger.warning(
            f"resuming {checkpoint} on other training data: {data_dir} is not the data it was trained on "
            f"({new_train['bytes']:,} bytes of train data, saved {old_train['bytes']:,}); same dictionary, "
            "so training goes on from the saved position in the new data"
        )

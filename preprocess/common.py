"""Shared machinery of the preprocess scripts.

- :func:`main` runs a script and turns a :class:`PreprocessError` into one ``error: ...`` line on stderr and
  exit code 2 (the parser's own errors too). Progress goes to stdout, so stderr holds only that line.
- :func:`fetch_input` downloads the official file (checking its sha256 or size) or takes ``--raw PATH``;
  :func:`locate_members` finds the split files in a ``.zip``, a tar (``.tgz``, ``.tar.gz``, ...), a
  directory (files may be ``.xz``/``.gz``/``.bz2`` compressed) or a single (compressed) file.
- :class:`Build` builds into a temporary sibling of ``--out`` and renames it into place at the end, so
  an interrupted run never leaves a half-written ``--out``; a non-empty ``--out`` is never touched. What
  a SIGKILLed run leaves (the sibling; its ``fairseq-preprocess`` child dies with it) goes at the next run.
- ``write_*_tokens`` turn text into the token lines fairseq reads, counting tokens/characters on the way.
- :func:`run_fairseq_preprocess` runs the real ``fairseq-preprocess --only-source`` of the active Python,
  then checks that the token count of every split is the one counted here.
- :func:`write_metadata` writes ``metadata.json`` (unit, vocab size, per-split tokens and characters, the
  dictionary's size and sha256: ``segment_lm`` checks the ``.idx``/``.bin``/``dict.txt`` against them; and
  for byte/char/subword data the ``encoder``: the fairseq ``--bpe`` that turns text into these tokens and
  back, which the ``segment_lm`` task uses when no ``--bpe`` is given).

Token conventions (the contract with the training task):

- byte: every byte is written as its decimal value; the newline byte ends the line, so fairseq's
  ``</s>`` stands for ``"\\n"``. A fixed 256-entry dictionary (``--srcdict``) means there is never ``<unk>``.
- char: every character is a token, the newline ends the line, a space is written ``_`` (as
  Transformer-XL's ``prep_text8.py`` does). Tokens must not contain whitespace and ``_`` must stay
  distinct from the space, so ``_`` itself and any other whitespace character are written ``U+XXXX``
  (one token, never produced by a single character).
- word: whitespace-separated words; each line ends with ``</s>`` (``<eos>`` in the papers' counts).

If a split does not end with a newline, fairseq still appends ``</s>`` to its last line, so ``tokens`` can
be one more than the newline-terminated count. ``vocab_size`` counts the distinct symbols of the train
text, the end of line being one of them when train has a newline (word level: whenever it has a line).
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import contextlib
import fcntl
import glob
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
CHUNK = 1 << 20  # bytes read at a time
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")


class PreprocessError(Exception):
    """Something the user can fix; the message says what is wrong and what to do (one line)."""


# ----------------------------------------------------------------------------------------------------
# entry point, arguments, logging


def main(run: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run ``run(argv)``; a :class:`PreprocessError` becomes ``error: <message>`` on stderr and exit code 2.
    SIGTERM unwinds like Ctrl-C, so the temporary build directory is removed."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run(argv)
    except PreprocessError as exc:
        message = " ".join(str(exc).split())  # always exactly one line
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to --out", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


_terminated = False  # set by SIGTERM; checked again before the build is committed


def _terminate(signum, frame):
    # The KeyboardInterrupt can be swallowed where Python ignores exceptions (logging's at-fork hook
    # runs when a worker process is forked); the flag keeps the request until Build.commit sees it.
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error:`` line (via :class:`PreprocessError`)."""

    def error(self, message: str):  # type: ignore[override]
        raise PreprocessError(f"{message} (see: python -m {self.prog} --help)")


def make_parser(name: str, doc: str | None, download: Download | None = None) -> ArgumentParser:
    """A parser with the options every script shares (``--out``, ``--workers``; ``--raw`` & co. if it downloads)."""
    parser = ArgumentParser(
        prog=f"preprocess.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="output directory, e.g. data-bin/NAME (must not exist or be empty)"
    )
    if download is not None:
        parser.add_argument(
            "--raw",
            metavar="PATH",
            help="use this local archive, file or directory instead of downloading " + download.url,
        )
        parser.add_argument("--url", help=f"download from this mirror instead of {download.url}")
        parser.add_argument(
            "--sha256",
            help="expected sha256 of the downloaded file or of the --raw file (default for downloads: the official one)",
        )
        parser.add_argument(
            "--download-dir",
            metavar="DIR",
            help="keep the download here and reuse it next time (default: a temporary directory, deleted)",
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="fairseq-preprocess --workers (default: CPU count, at most 8)",
    )
    return parser


def log(message: str) -> None:
    print(f"[preprocess] {message}", flush=True)


PROGRESS_DELAY_S = 3  # a step shorter than this shows no progress bar


def progress(items: Iterable, desc: str, unit: str, size: Callable = len) -> Iterator:
    """``items`` as they are, with a progress bar on stderr (tqdm: count and rate of ``size(item)`` units)
    once the step has taken ``PROGRESS_DELAY_S``: the steps of a big file take minutes."""
    from tqdm import tqdm

    with tqdm(desc=f"[preprocess] {desc}", unit=unit, unit_scale=True, delay=PROGRESS_DELAY_S, file=sys.stderr,
              mininterval=1.0) as bar:  # fmt: skip
        for item in items:
            yield item
            bar.update(size(item))


# ----------------------------------------------------------------------------------------------------
# checks done before any work


def check_out(out: Path) -> None:
    """Refuse an existing, non-empty output (finished data is never overwritten)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PreprocessError(f"--out {out} exists and is not a directory; choose another --out or delete it")
    if out.is_dir() and any(out.iterdir()):
        raise PreprocessError(
            f"output directory {out} already exists and is not empty; choose another --out or delete it"
        )


def check_exists(path: str | Path, option: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PreprocessError(f"{option} {path} does not exist; pass {what}")
    return p


def check_fairseq() -> None:
    if importlib.util.find_spec("fairseq_cli") is None:
        raise PreprocessError(
            f"fairseq is not installed for {sys.executable}; activate the project's venv or run install.sh"
        )


def check_utf8(path: Path, label: str) -> None:
    """Fail early (before any work) if a word/char-level input is not UTF-8."""
    for _ in iter_text(path, label):
        pass


# ----------------------------------------------------------------------------------------------------
# build directory: temporary sibling, renamed into place at the end


class Build:
    """``with Build(out) as b:`` gives ``b.work`` (scratch) and ``b.dest`` (future ``out``); ``b.commit()``
    renames ``b.dest`` to ``out``. The temporary directory is removed in every case but SIGKILL; the
    directory a killed run left (``.<out>.tmp-*``, its lock free) is removed by the next run."""

    def __init__(self, out: Path):
        self.out = out.expanduser().absolute()
        check_out(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._lock = os.open(self.tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until this process ends, however it ends
        self.work = self.tmp / "work"
        self.dest = self.tmp / "out"
        self.work.mkdir()
        self.dest.mkdir()
        self.started = time.time()

    def __enter__(self) -> Build:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.close(self._lock)

    def commit(self) -> None:
        if _terminated:  # a SIGTERM whose KeyboardInterrupt was swallowed: do not publish the build
            raise KeyboardInterrupt
        check_out(self.out)  # nobody wrote there meanwhile
        if self.out.is_dir():
            self.out.rmdir()  # empty, checked above
        os.rename(self.dest, self.out)
        log(f"done in {time.time() - self.started:.1f}s: {self.out}")


LOCK_NAME = ".build.lock"
STALE_UNLOCKED_S = 60  # a build directory without a lock file is an older version's, or just created


def remove_stale_builds(out: Path) -> None:
    """Remove the temporary build directories of ``out`` left by killed runs (SIGKILL skips every
    cleanup): those whose lock no live process holds; a running build's is left alone."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        try:
            fd = os.open(tmp / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            if time.time() - tmp.stat().st_mtime < STALE_UNLOCKED_S:
                continue
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another run is building it
        finally:
            if fd is not None:
                os.close(fd)
        log(f"removing {tmp}, left by an interrupted run")
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# input: download (with checksum) or --raw


@dataclass(frozen=True)
class Download:
    """An official file. ``sha256`` / ``size`` are checked after downloading; see each module for their source."""

    url: str
    sha256: str | None = None
    size: int | None = None


@dataclass
class Input:
    path: Path  # a file (archive or plain) or a directory
    source: str  # URL or absolute --raw path
    sha256: str | None  # of the file, None for a directory


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm_sha(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise PreprocessError(f"--sha256 {value!r} is not a sha256 (64 hex digits)")
    return value


def check_input_args(args: argparse.Namespace) -> None:
    """Cheap checks of --raw/--sha256 before anything is built or downloaded."""
    if args.sha256:
        args.sha256 = _norm_sha(args.sha256)
    if args.raw:
        raw = check_exists(args.raw, "--raw", "the downloaded archive, file or directory (or omit --raw to download)")
        if args.sha256 and raw.is_dir():
            raise PreprocessError("--sha256 needs --raw to be a file, not a directory")
        if args.url:
            raise PreprocessError("--url and --raw exclude each other; give one")


def fetch_input(args: argparse.Namespace, spec: Download, scratch: Path) -> Input:
    """``--raw`` if given (verified only against an explicit ``--sha256``), else download ``spec`` and verify it."""
    if args.raw:
        raw = Path(args.raw).expanduser()
        digest = sha256_file(raw) if raw.is_file() else None
        if args.sha256 and digest != args.sha256:
            raise PreprocessError(
                f"checksum mismatch for {raw}: sha256 {digest}, expected {args.sha256}; use the right file or fix --sha256"
            )
        return Input(raw, str(raw.absolute()), digest)

    url = args.url or spec.url
    expected = args.sha256 or spec.sha256
    size = None if args.sha256 else spec.size
    folder = Path(args.download_dir).expanduser() if args.download_dir else scratch / "download"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (Path(urllib.request.url2pathname(url.split("?")[0].rsplit("/", 1)[-1])).name or "download")
    if target.is_file() and _verify(target, expected, size, url, raise_error=False):
        log(f"using the earlier download {target}")
    else:
        _download(url, target)
        _verify(target, expected, size, url, raise_error=True)
    return Input(target, url, sha256_file(target))


def _download(url: str, target: Path) -> None:
    log(f"downloading {url}")
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, 0.0
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= shown + 0.1:
                    shown = done / total
                    log(f"  {done / 1e6:.1f} / {total / 1e6:.1f} MB")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise PreprocessError(
            f"could not download {url} ({reason}); check the network, or download it yourself and pass --raw FILE"
        ) from None
    os.replace(part, target)


def _verify(path: Path, sha256: str | None, size: int | None, url: str, raise_error: bool) -> bool:
    """Check the sha256 if one is known, else the size if known (else only note that nothing was checked)."""
    fix = "the download is corrupt or changed upstream: retry, or pass a copy you trust with --raw"
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            if raise_error:
                raise PreprocessError(f"checksum mismatch for {url}: sha256 {digest}, expected {sha256}; {fix}")
            return False
    elif size is not None:
        if path.stat().st_size != size:
            if raise_error:
                raise PreprocessError(f"size mismatch for {url}: {path.stat().st_size} bytes, expected {size}; {fix}")
            return False
    elif raise_error:
        log(f"note: no published checksum for {url}; its sha256 is recorded in metadata.json")
    return True


# ----------------------------------------------------------------------------------------------------
# finding the split files inside an archive / directory / file


def _is_tar(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return True
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, lzma.LZMAError):
        return False


def _compression(path: Path) -> Callable | None:
    return COMPRESSED.get(path.suffix.lower())


def _copy_stream(src, dest: Path) -> None:
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def _decompress(path: Path, dest: Path) -> Path:
    opener = _compression(path)
    if opener is None:
        return path
    try:
        with opener(path, "rb") as src:
            _copy_stream(src, dest)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise PreprocessError(f"cannot decompress {path} ({exc}); is it a complete file?") from None
    return dest


@contextlib.contextmanager
def plain_files(files: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """``files`` with every ``.xz``/``.gz``/``.bz2`` one decompressed into a temporary directory, removed on
    exit (the scripts that take text files read them more than once and seek in them)."""
    with tempfile.TemporaryDirectory(prefix="preprocess-input-") as scratch:
        plain = {}
        for key, path in files.items():
            if _compression(path) is not None:
                log(f"decompressing {path}")
            plain[key] = _decompress(path, Path(scratch) / f"{key}.txt")
        yield plain


def locate_members(
    inp: Input,
    wanted: dict[str, Sequence[str]],
    scratch: Path,
    expected: str,
    single_file_ok: bool = False,
) -> dict[str, Path]:
    """Return a plain (uncompressed) file for every key of ``wanted`` (key -> accepted file names).

    ``inp.path`` may be a zip, a tar (any compression), a directory (files possibly ``.xz``/``.gz``/``.bz2``,
    searched recursively if not at the top), or, when ``single_file_ok`` and one file is wanted, that file
    itself (possibly compressed). All files are looked up before anything is extracted, so a missing split
    fails fast. ``expected`` describes a valid input for the error message.
    """
    path = inp.path
    scratch.mkdir(parents=True, exist_ok=True)

    def missing(key: str) -> PreprocessError:
        names = " or ".join(wanted[key])
        label = f"{key} split" if key in SPLITS else "file"
        return PreprocessError(f"{label} missing: no {names} in {path}; expected {expected}")

    if path.is_dir():
        found: dict[str, Path] = {}
        for key, names in wanted.items():
            candidates = [n + s for n in names for s in ("", *COMPRESSED)]
            hit = next((path / c for c in candidates if (path / c).is_file()), None)
            if hit is None:
                deep = sorted((p for c in candidates for p in path.rglob(c) if p.is_file()), key=lambda p: len(p.parts))
                hit = deep[0] if deep else None
            if hit is None:
                raise missing(key)
            found[key] = hit
        return {key: _decompress(p, scratch / f"{key}.raw") for key, p in found.items()}

    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
                chosen = {key: _pick(members, names) for key, names in wanted.items()}
                for key, member in chosen.items():
                    if member is None:
                        raise missing(key)
                out = {}
                for key, member in chosen.items():
                    log(f"extracting {member} from {path.name}")
                    with zf.open(member) as src:
                        _copy_stream(src, scratch / f"{key}.raw")
                    out[key] = scratch / f"{key}.raw"
                return out
        except (zipfile.BadZipFile, OSError, EOFError, lzma.LZMAError) as exc:
            raise PreprocessError(f"cannot read zip archive {path} ({exc}); is it a complete download?") from None

    if _is_tar(path):
        try:
            with tarfile.open(path, "r:*") as tf:
                members = {m.name: m for m in tf.getmembers() if m.isfile()}
                chosen = {key: _pick(list(members), names) for key, names in wanted.items()}
                for key, member in chosen.items():
                    if member is None:
                        raise missing(key)
                out = {}
                for key, member in chosen.items():
                    log(f"extracting {member} from {path.name}")
                    src = tf.extractfile(members[member])
                    assert src is not None
                    _copy_stream(src, scratch / f"{key}.raw")
                    out[key] = scratch / f"{key}.raw"
                return out
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as exc:
            raise PreprocessError(f"cannot read tar archive {path} ({exc}); is it a complete download?") from None

    if single_file_ok and len(wanted) == 1:
        (key,) = wanted
        return {key: _decompress(path, scratch / f"{key}.raw")}
    raise PreprocessError(f"{path} is a single file, not an archive or directory; expected {expected}")


def _pick(members: Sequence[str], names: Sequence[str]) -> str | None:
    """The member whose base name is the first matching entry of ``names`` (shallowest path wins)."""
    for name in names:
        hits = sorted((m for m in members if m.rsplit("/", 1)[-1] == name), key=lambda m: (m.count("/"), m))
        if hits:
            return hits[0]
    return None


def report_known(paths: dict[str, Path], known: dict[str, str], what: str, strict: bool) -> None:
    """Compare split files with their known official sha256; a mismatch fails when ``strict`` (a download)."""
    for split, path in paths.items():
        if split not in known:
            continue
        digest = sha256_file(path)
        if digest == known[split]:
            log(f"{split}: identical to the official {what} file")
        elif strict:
            raise PreprocessError(
                f"checksum mismatch for the {split} split of {what}: sha256 {digest}, expected {known[split]}; "
                "the download is corrupt or changed upstream: retry, or pass a copy you trust with --raw"
            )
        else:
            log(f"{split}: differs from the official {what} file (sha256 {digest[:12]}...), fine for custom data")


# ----------------------------------------------------------------------------------------------------
# reading


def iter_bytes(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """Chunks of ``path[start:start+length]``."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk


def iter_text(path: Path, label: str, start: int = 0, length: int | None = None) -> Iterator[str]:
    """Decoded UTF-8 chunks; invalid UTF-8 raises :class:`PreprocessError` naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = start
    for chunk in iter_bytes(path, start, length):
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _not_utf8(label, offset + exc.start) from None
        offset += len(chunk)
        if text:
            yield text
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _not_utf8(label, offset) from None
    if tail:
        yield tail


def _not_utf8(label: str, offset: int) -> PreprocessError:
    return PreprocessError(
        f"{label} is not valid UTF-8 (first bad byte at offset {offset}); this level needs UTF-8 text: "
        "convert it (e.g. iconv -f latin1 -t utf-8) or use the byte level"
    )


# ----------------------------------------------------------------------------------------------------
# writing token lines and counting


@dataclass
class SplitStats:
    tokens: int = 0  # what fairseq stores: symbols + one </s> per line
    chars: int = 0  # characters (bytes at byte level) of the split, newlines included
    sha256: str = ""  # of the split's raw text
    oov: int | None = None  # valid/test tokens not in the train vocabulary (become <unk>)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"tokens": self.tokens, "chars": self.chars}
        if self.oov is not None:
            d["oov"] = self.oov
        d.update(self.extra)
        d["sha256"] = self.sha256
        return d


_BYTE_TOKEN = [b"%d" % i for i in range(256)]
_BYTE_TOKEN[10] = b"\n"
_CHAR_SPECIAL = re.compile(r"[^\S\n ]|_")  # whitespace other than space/newline, or "_"
LONG_LINE = 1_000_000  # longer lines are binarized in-process (see preprocess_stream)


def byte_dictionary_text() -> str:
    """The fixed byte dictionary: lines ``0 1`` .. ``255 1`` (fairseq adds its 4 specials: 260 entries)."""
    return "".join(f"{i} 1\n" for i in range(256))


def char_token(c: str) -> str:
    """The token of one character (see the module docstring); the newline stays a line break."""
    if c == " ":
        return "_"
    if c == "\n":
        return c
    if c == "_" or c.isspace():
        return f"U+{ord(c):04X}"
    return c


def char_line(text: str) -> str:
    """The tokens of a text without newlines, space-separated (what fairseq-preprocess reads)."""
    if _CHAR_SPECIAL.search(text):
        return " ".join([char_token(c) for c in text])
    return " ".join(text.replace(" ", "_"))


@dataclass
class _Scan:
    stats: SplitStats
    counts: Counter  # symbol -> count (bytes as ints, chars as str); the newline included
    longest: int  # longest line, in symbols


def scan_stream(chunks: Iterable, dest: Path | None = None) -> _Scan:
    """Count a byte (``bytes`` chunks) or character (``str`` chunks) stream; write its token lines to ``dest``."""
    stats, digest, counts = SplitStats(), hashlib.sha256(), Counter()
    byte_counts = np.zeros(256, dtype=np.int64)
    longest = run = 0
    last = None
    out = open(dest, "wb") if dest is not None else None
    try:
        for chunk in chunks:
            if not chunk:
                continue
            is_bytes = isinstance(chunk, bytes)
            if out is not None:
                if stats.chars:
                    out.write(b" ")
                if is_bytes:
                    out.write(b" ".join([_BYTE_TOKEN[b] for b in chunk]))
                else:
                    out.write(char_line(chunk).encode("utf-8"))
            if is_bytes:
                byte_counts += np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256)
                digest.update(chunk)
            else:
                counts.update(chunk)
                digest.update(chunk.encode("utf-8"))
            parts = chunk.split(b"\n" if is_bytes else "\n")
            if len(parts) == 1:
                run += len(chunk)
            else:
                longest = max(longest, run + len(parts[0]), *map(len, parts[1:-1]))
                run = len(parts[-1])
            longest = max(longest, run)
            stats.chars += len(chunk)
            last = chunk[-1:]
        if out is not None and last is not None and last not in (b"\n", "\n"):
            out.write(b"\n")  # end the last line (an empty file stays empty)
    finally:
        if out is not None:
            out.close()
    if last is not None and isinstance(last, bytes):
        counts = Counter({b: int(n) for b, n in enumerate(byte_counts) if n})
    stats.tokens = stats.chars + (1 if stats.chars and last not in (b"\n", "\n") else 0)
    stats.sha256 = digest.hexdigest()
    return _Scan(stats, counts, longest)


def preprocess_stream(
    build: Build,
    level: str,
    sources: dict[str, Callable[[], Iterable]],
    workers: int,
    binarizer: str = "auto",
) -> tuple[dict[str, SplitStats], int, str]:
    """Byte- or char-level binarization of three splits, each given as a callable returning a fresh chunk
    iterator (``bytes`` chunks for ``level="byte"``, ``str`` for ``"char"``).

    ``binarizer``: ``fairseq`` writes token files and runs the real ``fairseq-preprocess``; ``fast`` writes
    the very same ``dict.txt``/``.bin``/``.idx`` in-process, streaming (fairseq's binarizer holds a whole
    line as a Python list of strings: on text8's single 90M-character line it needed over 1.6 GB and was
    still running after 9 CPU-minutes; this takes seconds and little memory); ``auto`` picks ``fast`` only
    when a line is longer than ``LONG_LINE`` symbols. Returns (stats, vocab_size, binarizer used).
    """
    scans: dict[str, _Scan] = {}
    for split in SPLITS:
        log(f"{split}: counting {level}s")
        scans[split] = scan_stream(progress(sources[split](), f"{split}: counting", level))
    train = scans["train"].counts
    for split in ("valid", "test"):  # bytes: fixed dictionary, nothing is ever <unk>
        unseen = (n for s, n in scans[split].counts.items() if s not in train and s != "\n")  # \n is </s>
        scans[split].stats.oov = sum(unseen) if level == "char" else 0
    vocab_size = len(train)
    longest = max(s.longest for s in scans.values())
    if binarizer == "auto":
        binarizer = "fast" if longest > LONG_LINE else "fairseq"
        if binarizer == "fast":
            log(f"a line has {longest:,} {level}s: binarizing in-process (same output as fairseq-preprocess)")
    stats = {split: scans[split].stats for split in SPLITS}

    if binarizer == "fairseq":
        texts = {}
        for split in SPLITS:
            log(f"{split}: writing {level} tokens")
            texts[split] = build.work / f"{split}.tok"
            scan_stream(progress(sources[split](), f"{split}: writing", level), texts[split])
        srcdict = None
        if level == "byte":
            srcdict = build.work / "bytes.dict"
            srcdict.write_text(byte_dictionary_text())
        run_fairseq_preprocess(build, texts, stats, workers, srcdict)
        return stats, vocab_size, binarizer

    if level == "byte":
        (build.dest / "dict.txt").write_text(byte_dictionary_text())
        lut = np.arange(N_SPECIAL, N_SPECIAL + 256, dtype=np.int64)
        lut[10] = EOS
        dict_len = N_SPECIAL + 256

        def ids(chunk: bytes) -> np.ndarray:
            return lut[np.frombuffer(chunk, dtype=np.uint8)]
    else:
        entries = dictionary_entries(Counter({char_token(c): n for c, n in train.items() if c != "\n"}))
        with open(build.dest / "dict.txt", "w", encoding="utf-8") as f:
            f.writelines(f"{sym} {n}\n" for sym, n in entries)
        index = {sym: N_SPECIAL + i for i, (sym, _) in enumerate(entries)}
        dict_len = N_SPECIAL + len(entries)
        lut = np.full(0x110000, UNK, dtype=np.int64)
        for scan in scans.values():
            for c in scan.counts:
                lut[ord(c)] = index.get(char_token(c), UNK)
        lut[10] = EOS

        def ids(chunk: str) -> np.ndarray:
            return lut[np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)]

    dtype = best_fitting_int_dtype(dict_len)
    for split in SPLITS:
        log(f"{split}: binarizing")
        chunks = progress(sources[split](), f"{split}: binarizing", level)
        write_mmap_dataset(build.dest / split, (ids(c) for c in chunks if c), dtype)
        log(f"[{split}] {stats[split].tokens:,} tokens, {stats[split].oov or 0} replaced by <unk>")
    check_binarized(build.dest, stats)
    return stats, vocab_size, binarizer


# fairseq's file formats, written without importing fairseq (its import takes seconds); the tests check
# that the output is byte-identical to fairseq-preprocess's.
N_SPECIAL, EOS, UNK = 4, 2, 3  # <s> <pad> </s> <unk>
_DTYPE_CODE = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8, np.uint32: 9}


def best_fitting_int_dtype(vocab_len: int):
    """As fairseq.data.indexed_dataset.best_fitting_int_dtype."""
    if vocab_len < 65500:
        return np.uint16
    return np.uint32 if vocab_len < 4294967295 else np.int64


def dictionary_entries(counts: Counter) -> list[tuple[str, int]]:
    """The ``dict.txt`` entries fairseq-preprocess builds from train tokens with these counts: fairseq's
    ``Dictionary.finalize(threshold=0, nwords=-1, padding_factor=8)`` orders by count, ties alphabetically,
    and pads the dictionary (4 specials included) to a multiple of 8 with ``madeupwordNNNN`` entries."""
    entries = sorted(counts.items())
    entries.sort(key=lambda kv: kv[1], reverse=True)  # stable, like Counter.most_common
    pad = -(N_SPECIAL + len(entries)) % 8
    return entries + [(f"madeupword{i:04d}", 0) for i in range(pad)]


def write_mmap_dataset(prefix: Path, id_chunks: Iterable[np.ndarray], dtype) -> int:
    """Write a fairseq mmap dataset (``prefix.bin``/``.idx``, as ``MMapIndexedDatasetBuilder`` does) from a
    stream of token ids in which ``</s>`` ends each item (one item per line; a final ``</s>`` is appended
    if the stream does not end with one). Streams chunk by chunk; returns the token count."""
    sizes: list[int] = []
    run = total = 0
    with open(f"{prefix}.bin", "wb") as out:
        for chunk in id_chunks:
            out.write(chunk.astype(dtype).tobytes(order="C"))
            total += len(chunk)
            ends = np.flatnonzero(chunk == EOS)
            if len(ends):
                sizes.append(run + int(ends[0]) + 1)
                sizes.extend(np.diff(ends).tolist())
                run = len(chunk) - int(ends[-1]) - 1
            else:
                run += len(chunk)
        if run:
            out.write(np.array([EOS], dtype=dtype).tobytes())
            sizes.append(run + 1)
            total += 1
    sizes_arr = np.array(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes_arr[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODE[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(sizes_arr.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
    return total


def iter_lines(path: Path, label: str) -> Iterator[tuple[bytes, str]]:
    """(raw line, decoded line) pairs; lines end at ``\\n`` only (the last one may lack it)."""
    with open(path, "rb") as f:
        for offset_line, raw in enumerate(f):
            try:
                yield raw, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PreprocessError(
                    f"{label} is not valid UTF-8 (line {offset_line + 1}); this level needs UTF-8 text: "
                    "convert it (e.g. iconv -f latin1 -t utf-8) or use the byte level"
                ) from None


def write_word_tokens(
    path: Path,
    dest: Path,
    label: str,
    vocab: Counter | None = None,
    encode: Callable[[list[str]], list[list[str]]] | None = None,
) -> tuple[SplitStats, Counter]:
    """Lines -> whitespace-separated tokens plus ``</s>``. Returns stats and the token counts.

    ``encode`` (a batch of lines -> a list of pieces per line) replaces whitespace splitting, for subwords;
    the stats then also hold ``words``, the word-level token count (words + one ``</s>`` per line).
    """
    counts: Counter = Counter()
    stats, digest, words = SplitStats(), hashlib.sha256(), 0
    batch: list[str] = []

    def flush(out) -> None:
        nonlocal batch
        for pieces in encode(batch):  # type: ignore[misc]
            line = " ".join(pieces).split()  # what fairseq will see
            out.write(" ".join(line) + "\n")
            stats.tokens += len(line) + 1
            counts.update(line)
        batch = []

    with open(dest, "w", encoding="utf-8") as out:
        for raw, line in progress(iter_lines(path, label), label, "line", size=lambda item: 1):
            digest.update(raw)
            stats.chars += len(line)
            if encode is None:
                tokens = line.split()
                out.write(" ".join(tokens) + "\n")
                stats.tokens += len(tokens) + 1
                counts.update(tokens)
            else:
                words += len(line.split()) + 1
                batch.append(line.rstrip("\n"))
                if len(batch) >= 10000:
                    flush(out)
        if encode is not None and batch:
            flush(out)
    stats.sha256 = digest.hexdigest()
    if encode is not None:
        stats.extra["words"] = words
    if vocab is not None:
        stats.oov = sum(n for w, n in counts.items() if w not in vocab)
    return stats, counts


# ----------------------------------------------------------------------------------------------------
# fairseq


def run_fairseq_preprocess(
    build: Build, texts: dict[str, Path], stats: dict[str, SplitStats], workers: int, srcdict: Path | None = None
) -> None:
    """Binarize ``texts`` (split -> token file) into ``build.dest`` with the real ``fairseq-preprocess``.

    Paths are passed relative to the build directory (fairseq splits ``--validpref`` on commas). Its output
    goes to our stdout. Afterwards the token count of each split is checked against ``stats``.
    """
    check_fairseq()

    def rel(p: Path) -> str:
        return os.path.relpath(p, build.tmp)

    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source"]
    cmd += ["--trainpref", rel(texts["train"]), "--validpref", rel(texts["valid"]), "--testpref", rel(texts["test"])]
    cmd += ["--destdir", rel(build.dest), "--workers", str(max(1, workers))]
    if srcdict is not None:
        cmd += ["--srcdict", rel(srcdict)]
    log("running " + " ".join(cmd[2:]))
    started = time.time()
    sys.stdout.flush()
    from slurm.children import die_with_parent

    # killed with us, even by SIGKILL: fairseq-preprocess would otherwise run on to completion (parent 1)
    result = subprocess.run(cmd, cwd=build.tmp, stdout=sys.stdout, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())  # fmt: skip
    if result.returncode != 0:
        raise PreprocessError(f"fairseq-preprocess failed with exit code {result.returncode} (its output is above)")
    log(f"fairseq-preprocess took {time.time() - started:.1f}s")
    (build.dest / "preprocess.log").unlink(missing_ok=True)  # its messages are in our output already
    check_binarized(build.dest, stats)


def binarized_tokens(prefix: Path) -> int:
    """Number of tokens in a fairseq mmap dataset (``prefix.bin`` / ``prefix.idx``)."""
    with open(f"{prefix}.idx", "rb") as f:
        header = f.read(18)
    if header[:9] != b"MMIDIDX\x00\x00":
        raise PreprocessError(f"{prefix}.idx is not a fairseq mmap index")
    (code,) = struct.unpack("<B", header[17:18])
    itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}[code]
    return os.path.getsize(f"{prefix}.bin") // itemsize


def check_binarized(dest: Path, stats: dict[str, SplitStats]) -> None:
    for split, st in stats.items():
        got = binarized_tokens(dest / split)
        if got != st.tokens:
            raise PreprocessError(
                f"internal error: fairseq stored {got} tokens for {split}, expected {st.tokens}; please report this"
            )


# ----------------------------------------------------------------------------------------------------
# metadata


# unit -> the fairseq --bpe that writes text as this unit's tokens and back (byte/char: plugins/text_encoders.py;
# subword: fairseq's sentencepiece with the data's spm.model)
TEXT_ENCODERS = {"byte": "byte_level", "char": "char_level", "subword": "sentencepiece"}


def write_metadata(
    build: Build,
    *,
    dataset: str,
    unit: str,
    vocab_size: int,
    stats: dict[str, SplitStats],
    source: str,
    sha256: str | None,
    **extra,
) -> dict:
    dict_lines = (build.dest / "dict.txt").read_text(encoding="utf-8").count("\n")
    meta = {
        "dataset": dataset,
        "unit": unit,
        "vocab_size": vocab_size,
        "splits": {split: stats[split].as_dict() for split in SPLITS},
        "source": source,
        "sha256": sha256,
        "fairseq_dict_size": dict_lines + 4,  # + <s> <pad> </s> <unk>
        "encoder": TEXT_ENCODERS.get(unit),  # text <-> tokens for fairseq-interactive and the hub; words: None
        "dict_sha256": sha256_file(build.dest / "dict.txt"),  # training checks dict.txt against it
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (build.dest / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    summary = ", ".join(f"{s} {stats[s].tokens:,} tokens" for s in SPLITS)
    log(f"{dataset}: unit {unit}, vocab_size {vocab_size}; {summary}")
    return meta


# ----------------------------------------------------------------------------------------------------
# small shared pieces of the scripts


def add_binarizer_arg(parser: ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--binarizer",
        choices=("auto", "fairseq", "fast"),
        default=default,
        help="fairseq: the real fairseq-preprocess; fast: the same files written in-process, streaming; "
        f"auto: fast only if a line is longer than {LONG_LINE:,} symbols (default: {default})",
    )


def tail_split(total: int, valid: int, test: int, unit: str) -> dict[str, tuple[int, int]]:
    """(start, length) of train/valid/test when valid and test are the last ``valid`` + ``test`` units."""
    if total <= valid + test:
        raise PreprocessError(
            f"the input has {total:,} {unit}s, not more than --valid-{unit}s + --test-{unit}s = {valid + test:,}; "
            f"use the full file or smaller --valid-{unit}s/--test-{unit}s"
        )
    train = total - valid - test
    return {"train": (0, train), "valid": (train, valid), "test": (train + valid, test)}


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            raise PreprocessError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def preprocess_words(
    build: Build,
    files: dict[str, Path],
    workers: int,
    labels: dict[str, str] | None = None,
    encode: Callable[[list[str]], list[list[str]]] | None = None,
) -> tuple[dict[str, SplitStats], int]:
    """Word-level (or, with ``encode``, subword) binarization of three UTF-8 files with fairseq-preprocess;
    the dictionary is built by fairseq from train, keeping every token. Returns (stats, vocab_size)."""
    labels = labels or {s: str(p) for s, p in files.items()}
    for split in SPLITS:
        check_utf8(files[split], labels[split])
    stats: dict[str, SplitStats] = {}
    texts: dict[str, Path] = {}
    train_counts: Counter | None = None
    for split in SPLITS:
        log(f"{split}: tokenizing {labels[split]}")
        texts[split] = build.work / f"{split}.tok"
        stats[split], counts = write_word_tokens(files[split], texts[split], labels[split], train_counts, encode)
        if split == "train":
            train_counts = counts
    assert train_counts is not None
    vocab_size = len(train_counts) + (1 if stats["train"].tokens else 0)  # + end of line
    run_fairseq_preprocess(build, texts, stats, workers)
    return stats, vocab_size

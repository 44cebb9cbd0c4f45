"""Crash-safe checkpoints for ``fairseq-train``: kill it anywhere, restart the same command, lose nothing.

What fairseq 0.12.3 does (``fairseq/checkpoint_utils.py``, read for this patch):

- ``save_checkpoint`` writes the first checkpoint name of a save (``checkpoint_<epoch>_<updates>.pt``,
  ``checkpoint<epoch>.pt``, ``checkpoint_best.pt`` or ``checkpoint_last.pt``, whichever applies first)
  with ``trainer.save_checkpoint`` -> ``torch_persistent_save``: written to ``<name>.tmp`` and renamed,
  so that file is atomic (but never fsync'ed).
- It then **copies** that file to every other name of the save, ``checkpoint_last.pt`` included, with
  ``PathManager.copy`` = ``shutil.copyfile`` (without iopath, as installed here), which truncates the
  destination and rewrites it in place. A SIGKILL, a node preemption or a full disk during that copy
  leaves a truncated ``checkpoint_last.pt`` behind the previous good one.
- ``load_checkpoint`` restarts from ``<save-dir>/checkpoint_last.pt`` whenever it exists. A truncated
  file stops the restart with ``RuntimeError: PytorchStreamReader failed reading zip archive: failed
  finding central directory`` (``torch.load``), and a file with corrupted tensor bytes loads silently
  (``torch.load`` does not check the zip CRCs). Every restart of the job then fails the same way.

What :func:`install` changes (only inside ``fairseq.checkpoint_utils``; everything else is fairseq's):

1. ``torch_persistent_save`` (local files): the ``.tmp`` file is fsync'ed before it is renamed, so a
   rename never publishes a file whose bytes are not on disk yet (fairseq's retries are kept, but each
   starts the file afresh). A full disk (``ENOSPC``, quota, file size limit) while writing or copying
   removes the ``.tmp`` and stops with one ``error:`` line naming the intact ``checkpoint_last.pt``
   (fairseq: five tracebacks ending in ``OSError: [Errno 28]``).
2. ``checkpoint_utils.PathManager`` is replaced by a subclass whose ``copy`` writes ``<dst>.tmp``,
   fsyncs it and renames it over ``<dst>``: every copy (``checkpoint_last.pt``, ``checkpoint_best.pt``)
   is atomic too. Only this module's name is rebound; ``fairseq.file_io.PathManager`` is untouched.
3. Before ``checkpoint_last.pt`` is replaced, the file it replaces is kept as ``checkpoint_last.prev.pt``
   (a hard link, no copy), but only if it is intact: a good checkpoint is never overwritten by a bad one,
   and there are always two complete checkpoints to resume from, whatever ``--keep-interval-updates`` is.
4. ``load_checkpoint`` checks the file it is about to resume from (:func:`checkpoint_problem`: zip
   structure, the CRC of every member, a ``weights_only`` unpickle, a ``model`` entry). If the default
   ``checkpoint_last.pt`` is truncated or corrupt, it logs one warning line naming the problem and
   resumes from the newest intact checkpoint in ``--save-dir`` (``checkpoint_last.prev.pt``, the
   interval/epoch/best checkpoints: newest file first). If none is intact, or an explicit
   ``--restore-file`` is corrupt, it stops with one ``error:`` line (also with a sharded/model-parallel
   checkpoint suffix, where no fallback is attempted). ``.tmp`` files left by an
   interrupted save are deleted. Costs one extra read of the checkpoint at start-up.
   A *missing* ``checkpoint_last.pt`` next to an intact checkpoint (a kill during the first save, after
   ``checkpoint_1_10.pt`` and before its copy) is resumed from the newest intact one too, with one line.
5. A checkpoint with a NaN/inf parameter or validation loss counts as damaged ("non-finite", see
   :func:`nonfinite_problem`): it is never written or copied as ``checkpoint_last.pt`` (one line says
   so; the last finite one stays), and a restart never resumes from it.
6. Around fairseq's load, ``plugins/resume.py`` compares the saved and requested settings (refuse,
   or reset the memory / move the data position, in one line) and ends a restart of a finished run.

The patch is checked against the installed fairseq when installed: if a patched function's signature
changed, or ``save_checkpoint`` no longer copies with ``PathManager.copy``, :func:`install` raises
instead of silently patching something else. Not covered: ``--write-checkpoints-asynchronously`` and
remote (iopath) paths keep fairseq's behaviour (no rename there).

The project's own loader, :func:`load_checkpoint_safely`, never unpickles arbitrary objects
(``weights_only=True``); see README "Reliability" for which fairseq commands still do.
"""

import argparse
import collections
import contextlib
import copy
import errno
import inspect
import logging
import math
import os
import pickle
import re
import shutil
import time
import zipfile
from typing import List, Optional, Tuple

import torch
from fairseq import checkpoint_utils, utils
from fairseq.file_io import PathManager
from omegaconf import OmegaConf, open_dict

from . import data_integrity, resume
from .errors import UserError

logger = logging.getLogger(__name__)

# Parameter names of the fairseq functions this module wraps (fairseq-fixed 0.12.3.1).
PATCHED_SIGNATURES = {
    "torch_persistent_save": ["obj", "filename", "async_write"],
    "load_checkpoint": ["cfg", "trainer", "passthrough_args"],
    "_torch_persistent_save": ["obj", "f"],
}
PREVIOUS_SUFFIX = ".prev"  # checkpoint_last.pt -> checkpoint_last.prev.pt
_ORIGINAL = {}
_KNOWN_GOOD = {}  # path -> (size, mtime) of a file this process wrote and fsync'ed itself, or verified
_KNOWN_BAD = set()  # damaged files already reported when loading
_NONFINITE = {}  # path -> problem, for the non-finite checkpoints this process wrote (never copied to _last)


# ---- detecting a bad checkpoint ------------------------------------------------------------------
def checkpoint_problem(path: str) -> Optional[str]:
    """``None`` if ``path`` is an intact fairseq checkpoint, else a short description of what is wrong."""
    return inspect_checkpoint(path)[0]


def inspect_checkpoint(path: str) -> Tuple[Optional[str], List[str]]:
    """(what is wrong with ``path`` or ``None``, the Python objects beyond tensors it would create).

    Reads the whole file once (the zip CRCs cover every tensor byte) and never unpickles anything but
    tensors and plain containers. A file that holds other Python objects (a legacy ``argparse.Namespace``)
    but is structurally intact counts as intact: whether to trust it is the loader's decision."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})", []
    if size == 0:
        return "empty file", []
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            return f"damaged zip archive ({e})", []
        if bad_member is not None:
            return f"corrupted data (CRC mismatch in {bad_member})", []
    else:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip archive without its end: the write was interrupted
                return f"truncated ({size} bytes, the zip archive has no end)", []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = None
        return (None, unsafe) if unsafe else (f"unreadable ({_first_line(e)})", [])
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {_first_line(e)})", []
    if not isinstance(state, dict) or "model" not in state:
        return "not a fairseq checkpoint (no 'model' entry)", []
    return nonfinite_problem(state), []


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:160]


def nonfinite_problem(state: dict) -> Optional[str]:
    """``"non-finite (...)"`` if the checkpoint ``state`` has a NaN/inf validation loss or parameter, else ``None``.
    Such a checkpoint loads, but a run resumed from it stops at once ("gradients are Nan/Inf")."""
    val_loss = (state.get("extra_state") or {}).get("val_loss")
    try:
        if val_loss is not None and not math.isfinite(float(val_loss)):
            return f"non-finite (validation loss {float(val_loss)})"
    except (TypeError, ValueError):
        pass
    for name, value in (state.get("model") or {}).items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite (NaN/inf in {name})"
    return None


def _updates_in(state: dict) -> str:
    history = state.get("optimizer_history") or [{}]
    return str(history[-1].get("num_updates", "?"))


def _last_finite_kept(last: str, problem: str, updates: str) -> None:
    """One line: the non-finite checkpoint of ``updates`` is not published as ``last``."""
    try:
        kept = f"stays at update {_updates_in(torch.load(last, map_location='cpu', weights_only=True, mmap=True))}"
    except Exception:
        kept = "is not written"
    logger.warning(
        f"not publishing the checkpoint of update {updates} as {last}: it is {problem}; {os.path.basename(last)} "
        f"{kept}, the last finite one (a restart resumes from there: lower --lr, or clip with --clip-norm)"
    )


def newest_intact_checkpoint(save_dir: str, suffix: str = "", exclude: tuple = ()) -> Optional[str]:
    """The most recently written intact checkpoint of ``save_dir`` (files named as fairseq and this module
    name them, with the trainer's checkpoint ``suffix``), or ``None``."""
    pattern = re.compile(
        rf"checkpoint(_last|_\d+_\d+|\d+|_best|\.best_.*){re.escape(suffix)}({re.escape(PREVIOUS_SUFFIX)})?\.pt"
    )
    candidates = [os.path.join(save_dir, f) for f in os.listdir(save_dir) if pattern.fullmatch(f)]
    candidates = [p for p in candidates if os.path.abspath(p) not in {os.path.abspath(x) for x in exclude}]
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


# ---- writing -------------------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)


def _is_last_checkpoint(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith("checkpoint_last") and name.endswith(".pt") and not name.endswith(PREVIOUS_SUFFIX + ".pt")


def previous_path(last: str) -> str:
    """``.../checkpoint_last<suffix>.pt`` -> ``.../checkpoint_last<suffix>.prev.pt``."""
    return last[: -len(".pt")] + PREVIOUS_SUFFIX + ".pt"


def _signature(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _remember_good(path: str) -> None:
    _KNOWN_GOOD[os.path.abspath(path)] = _signature(path)


def _known_good(path: str) -> bool:
    """Verified before and unchanged since (same size, modification time and inode): no need to read it again."""
    return _KNOWN_GOOD.get(os.path.abspath(path)) == _signature(path)


def _keep_previous(last: str) -> None:
    """Keep the intact ``checkpoint_last.pt`` about to be replaced as ``checkpoint_last.prev.pt``."""
    if not os.path.exists(last):
        return
    if not _known_good(last):
        problem = None if os.path.abspath(last) in _KNOWN_BAD else checkpoint_problem(last)
        if problem is not None:
            logger.warning(f"not keeping {last} as the previous checkpoint: it is {problem}")
        if problem is not None or os.path.abspath(last) in _KNOWN_BAD:
            return
    prev, tmp = previous_path(last), previous_path(last) + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(last, tmp)  # same bytes, no copy; later writes replace names, never rewrite files
    except OSError:
        shutil.copyfile(last, tmp)
    os.replace(tmp, prev)
    _remember_good(prev)


def _publish(tmp: str, dst: str) -> None:
    """Make the complete, fsync'ed ``tmp`` visible as ``dst`` in one atomic rename."""
    if _is_last_checkpoint(dst):
        _keep_previous(dst)
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(dst))
    _remember_good(dst)


def plain_data(obj):
    """``obj`` with every ``argparse.Namespace`` replaced by the plain dict of its attributes and every
    OmegaConf container by plain dicts/lists (``to_container(resolve=False)``); other values unchanged.

    Used for what the safe loader (``weights_only``) must read back: the checkpoint's ``cfg`` and what rank 0
    broadcasts (``plugins/distributed.py``). fairseq's legacy optimizers and lr schedulers (registered
    without a dataclass: ``sgd``, ``adafactor``, ``adagrad``, ``adadelta``, ``adamax``, ``lamb``, ``manual``)
    are configured by the whole command line as an ``argparse.Namespace``, which
    ``convert_namespace_to_omegaconf`` stores as ``cfg.optimizer`` / ``cfg.lr_scheduler`` and which the
    saved ``cfg`` keeps as an object. Every loader under torch >= 2.6 (resume, ``fairseq-eval-lm``) refuses
    it (``Weights only load failed ... argparse.Namespace``). The dict holds the same names and values
    (``Namespace(**d)`` rebuilds it); no loader reads these two entries back as a Namespace (a resume
    configures its optimizer and scheduler from its own command line, ``fairseq-eval-lm`` reads only
    ``cfg.task``/``cfg.model``)."""
    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, argparse.Namespace):
        return {k: plain_data(v) for k, v in vars(obj).items()}
    if type(obj) in (dict, collections.OrderedDict):  # exact types: torch.Size, namedtuples stay what they are
        return type(obj)((k, plain_data(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(plain_data(v) for v in obj)
    return obj


def torch_persistent_save(obj, filename, async_write: bool = False):
    """fairseq's ``torch_persistent_save``, with the ``.tmp`` file fsync'ed before the rename, no
    ``argparse.Namespace`` in the saved ``cfg`` (:func:`plain_data`), and no non-finite checkpoint
    published (:func:`_withhold_nonfinite`)."""
    if _withhold_nonfinite(obj, filename):
        return
    if isinstance(obj, dict) and "cfg" in obj:
        obj = {**obj, "cfg": plain_data(obj["cfg"])}
    if async_write or not PathManager.supports_rename(filename):
        return _ORIGINAL["torch_persistent_save"](obj, filename, async_write)
    tmp = filename + ".tmp"
    with _disk_full_is_one_line(tmp, filename):
        with open(tmp, "wb") as f:
            _write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, filename)


def _write(obj, f) -> None:
    """fairseq's ``_torch_persistent_save`` (3 tries, 2.5 s apart, for transient I/O errors), but every try
    starts the file afresh and a full disk is not retried (nothing frees space in 5 s)."""
    for attempt in range(3):
        f.seek(0)
        f.truncate()
        try:
            return torch.save(obj, f)
        except Exception as e:
            if attempt == 2 or _disk_full(e) is not None:
                raise
            logger.warning(f"writing {getattr(f, 'name', 'the checkpoint')} failed ({_first_line(e)}); trying again")
            time.sleep(2.5)


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, quota, file size limit


def _disk_full(exc: BaseException) -> Optional[OSError]:
    """The disk-full ``OSError`` behind ``exc`` (torch.save wraps it in a ``RuntimeError`` of its zip
    writer, ``unexpected pos``, keeping it as the context), or ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _disk_full_is_one_line(tmp: str, filename: str):
    """A full disk while writing ``tmp`` (to become ``filename``): remove ``tmp`` and stop with one
    ``error:`` line saying which checkpoint is intact and what to do (fairseq: five tracebacks)."""
    try:
        yield
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        try:
            os.remove(tmp)
        except OSError:
            pass
        directory = os.path.dirname(os.path.abspath(filename))
        last = os.path.join(directory, "checkpoint_last.pt")
        try:
            updates = _updates_in(torch.load(last, map_location="cpu", weights_only=True, mmap=True))
            kept = f"{last} (update {updates}) is intact"
        except Exception:
            kept = f"no complete checkpoint_last.pt is in {directory}"
        raise UserError(
            f"cannot write {filename}: {os.strerror(full.errno)}; nothing partial was kept and {kept}. Free "
            f"space there (or keep fewer checkpoints: --keep-interval-updates N, --no-epoch-checkpoints; or "
            "give another --save-dir), then run the same command again: it resumes from the last checkpoint"
        ) from None


def _withhold_nonfinite(obj, filename: str) -> bool:
    """Remember a non-finite checkpoint; True (do not write) if it would become ``checkpoint_last.pt``."""
    problem = nonfinite_problem(obj) if isinstance(obj, dict) else None
    if problem is None:
        _NONFINITE.pop(os.path.abspath(filename), None)
        return False
    _NONFINITE[os.path.abspath(filename)] = (problem, _updates_in(obj))
    if _is_last_checkpoint(filename):
        _last_finite_kept(filename, problem, _updates_in(obj))
        return True
    return False


def _copy_withheld(src_path: str, dst_path: str) -> bool:
    """True if ``src_path`` is a non-finite checkpoint and ``dst_path`` is ``checkpoint_last.pt`` (no copy)."""
    found = _NONFINITE.get(os.path.abspath(src_path))
    if found is None or not _is_last_checkpoint(dst_path):
        return False
    _last_finite_kept(dst_path, *found)
    return True


class AtomicCopyPathManager(PathManager):
    """``fairseq.file_io.PathManager`` whose ``copy`` of a local file is atomic (tmp, fsync, rename)."""

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if _copy_withheld(src_path, dst_path):
            return True
        if not (PathManager.supports_rename(src_path) and PathManager.supports_rename(dst_path)):
            return PathManager.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        tmp = dst_path + ".tmp"
        with _disk_full_is_one_line(tmp, dst_path):
            with open(src_path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            _publish(tmp, dst_path)
        return True


# ---- loading -------------------------------------------------------------------------------------
def _warn_unsafe(path: str, unsafe: List[str]) -> None:
    if unsafe:
        logger.warning(
            f"{path} holds Python objects ({', '.join(unsafe)}), not only tensors: loading it can run code; "
            "resume only from checkpoints you trust"
        )


def load_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq's ``load_checkpoint``, resuming from the newest intact checkpoint if the last is damaged."""
    suffix = trainer.checkpoint_suffix or ""
    if getattr(trainer, "data_parallel_rank", 0) == 0 and os.path.isdir(cfg.save_dir):
        for name in os.listdir(cfg.save_dir):
            if name.endswith(".pt.tmp"):  # left by a save that was interrupted; never loaded by fairseq
                logger.info(f"removing {name}, left by an interrupted checkpoint save")
                try:
                    os.remove(os.path.join(cfg.save_dir, name))
                except FileNotFoundError:
                    pass
    if cfg.restore_file == "checkpoint_last.pt":  # fairseq's default: resume from <save-dir>
        last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
        if not suffix and not os.path.exists(last):
            cfg = _fallback_for_missing_last(cfg, last)
        problem, unsafe = inspect_checkpoint(last) if os.path.exists(last) else (None, [])
        if problem is not None:
            fallback = None if suffix else newest_intact_checkpoint(cfg.save_dir, exclude=(last,))
            if fallback is None:
                raise UserError(
                    f"{last} is {problem} and no other checkpoint in {cfg.save_dir} is intact: "
                    "move the directory away to start afresh, or give --restore-file"
                )
            logger.warning(f"{last} is {problem}; resuming from {fallback}, the newest intact checkpoint")
            _KNOWN_BAD.add(os.path.abspath(last))
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                cfg.restore_file = fallback
                cfg.finetune_from_model = None  # fairseq refuses both; a resume never fine-tunes anyway
        elif problem is None and os.path.exists(last):
            _remember_good(last)
            _warn_unsafe(last, unsafe)
    else:
        path = cfg.restore_file.replace(".pt", suffix + ".pt")
        problem, unsafe = inspect_checkpoint(path) if os.path.exists(path) else (None, [])
        if problem is not None:
            raise UserError(f"--restore-file {path} is {problem}: choose another checkpoint")
        _warn_unsafe(path, unsafe)
    return _load_as_planned(cfg, trainer, suffix, passthrough_args)


def _fallback_for_missing_last(cfg, last: str):
    """``checkpoint_last.pt`` is missing but the directory holds an intact checkpoint (a kill during the
    first save, before the copy to ``checkpoint_last.pt``): resume from the newest one, saying so."""
    fallback = newest_intact_checkpoint(cfg.save_dir) if os.path.isdir(cfg.save_dir) else None
    if fallback is None:
        return cfg
    logger.warning(f"{last} is missing; resuming from {fallback}, the newest intact checkpoint")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.restore_file = fallback
        cfg.finetune_from_model = None  # a checkpoint of this directory: a resume, not a fine-tuning start
    return cfg


def _load_as_planned(cfg, trainer, suffix: str, passthrough_args: dict):
    """fairseq's load, with the checks of ``plugins/resume.py`` around it: the saved settings against the
    requested ones before (refuse, or plan a memory reset / data position), a finished run after."""
    if cfg.restore_file == "checkpoint_last.pt":
        path = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
    else:
        path = cfg.restore_file.replace(".pt", suffix + ".pt")
    own = os.path.dirname(os.path.abspath(path)) == os.path.abspath(cfg.save_dir)  # a resume, not a start
    saved = resume.read_saved_state(path) if os.path.exists(path) else None
    if saved is not None and hasattr(trainer.task, "data_fingerprint"):  # another dictionary: refused
        data_dir = utils.split_paths(trainer.task.args.data)[0]
        data_integrity.compare(saved["data_fingerprint"], trainer.task.data_fingerprint(), path, data_dir, resume=own)
    plan = resume.plan_resume(path, saved, trainer.cfg, explicit=not own) if saved is not None else None
    extra_state, epoch_itr = _ORIGINAL["load_checkpoint"](cfg, trainer, **passthrough_args)
    if plan is not None:
        resume.apply_plan(plan, trainer, epoch_itr)
    if extra_state is not None:
        resume.stop_if_finished(trainer, path)
    return extra_state, epoch_itr


def load_checkpoint_safely(path: str) -> dict:
    """Load a checkpoint for inspection (analysis scripts, soak/benchmark records) without running code
    from it: tensors and plain containers only (``torch.load(weights_only=True)``). A file that needs
    anything else is refused with one line naming the objects it wants to create."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        what = f"it would create {', '.join(unsafe)}" if unsafe else _first_line(e)
        raise UserError(
            f"refusing to load {path}: {what}. Checkpoints written by this project hold only tensors and "
            "plain values; load this one only if you trust where it came from"
        ) from None


# ---- installation --------------------------------------------------------------------------------
def _check_fairseq() -> None:
    for name, expected in PATCHED_SIGNATURES.items():
        target = _ORIGINAL.get(name) or getattr(checkpoint_utils, name, None)
        found = None if target is None else list(inspect.signature(target).parameters)
        if found != expected:
            raise RuntimeError(
                f"plugins/checkpointing.py patches fairseq.checkpoint_utils.{name}{tuple(expected)} of fairseq "
                f"0.12.3, but the installed fairseq has {found}: review the patch for this fairseq version"
            )
    if "PathManager.copy(" not in inspect.getsource(checkpoint_utils.save_checkpoint):
        raise RuntimeError(
            "fairseq.checkpoint_utils.save_checkpoint no longer copies checkpoints with PathManager.copy: "
            "review plugins/checkpointing.py for this fairseq version"
        )


def install() -> None:
    """Patch ``fairseq.checkpoint_utils`` (idempotent; see the module docstring)."""
    if _ORIGINAL:
        return
    _check_fairseq()
    _ORIGINAL["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _ORIGINAL["load_checkpoint"] = checkpoint_utils.load_checkpoint
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint = load_checkpoint
    checkpoint_utils.PathManager = AtomicCopyPathManager

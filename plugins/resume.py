"""What a restart of ``fairseq-train`` may do with the ``--save-dir`` it finds: one training per directory,
a finished run stays finished, and a changed setting is either exact, explained in one line, or refused.

fairseq 0.12.3 restarts from ``checkpoint_last.pt`` whatever it holds and whatever the new command asks:

- **finished runs**: ``validate_and_save`` tests ``num_updates >= max_update`` only *after* an update, so
  a run restarted at update ``max_update`` trains update ``max_update + 1`` and saves it over
  ``checkpoint_best.pt`` / ``checkpoint_last.pt``. :func:`stop_if_finished` ends such a restart before
  any update with one line (exit 0, no file touched). ``--max-epoch`` needs nothing: fairseq's epoch loop
  does not start a finished epoch count.
- **two trainings on one directory** overwrite each other's checkpoints. :func:`lock_save_dir` takes an
  advisory ``fcntl`` lock on ``<save-dir>/.train.lock`` for the life of the process (the kernel drops it
  when the process ends, however it ends; it works across hosts on NFS with lockd). The file holds the
  holder's pid and host while it runs and is emptied at a clean exit.
- **changed settings**: the saved configuration (``state["cfg"]``) is compared with the requested one
  (:func:`plan_resume`) before the checkpoint is loaded:

  * training-only settings (``--lr``, the optimizer's and scheduler's options, dropout, loss weights,
    ``--max-update``, logging, ...) go on: the state that is restored is exactly the saved one;
  * a different model (any other model field: attention, sizes, positions, ...) is refused with one
    ``error:`` line naming the fields and the ways out; the preset's name alone is not compared, nor a
    field the checkpoint predates. An explicit ``--restore-file`` from elsewhere (a start from other
    weights, e.g. converting a softmax model to linear attention) only warns;
  * the stream layout of ``segment_lm`` (``--tokens-per-sample``; ``--batch-size`` x workers = the number
    of streams) or the memory (``--mem-len``, ``--cmem-len``, ``--compression-rate``): the saved memory
    is reset (it belongs to other streams, or has another length), and the data position is kept in
    tokens so that no token is skipped. The iterator saves a number of *segments*; with another
    segment length T' the run continues at segment floor(k T / T') of each stream, i.e. at or just
    before the token it had reached (< T' tokens per stream are trained on again). With another
    number of streams, the streams are cut anew, and no position in the new layout has all its
    previous tokens trained on: the epoch restarts at its beginning. A checkpoint saved at the end of
    an epoch (fairseq saves it as the next epoch at position 0) needs no move. One warning line says which.
"""

import atexit
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
# Model fields a resumed run may change: they change how training goes on, not what the saved state means.
TRAINING_ONLY_MODEL_FIELDS = {
    "dropout", "attention_dropout", "activation_dropout", "adaptive_softmax_dropout",  # regularization
    "span_loss_weight", "compression_loss_weight",  # auxiliary loss weights
    "autocast_bf16", "ffn_chunks", "sparse_checkpoint", "linear_chunk_size",  # same math, other schedule
}  # fmt: skip
MEMORY_FIELDS = ("mem_len", "cmem_len", "compression_rate")
LAYOUT_MODEL_FIELDS = {"tokens_per_sample", "max_target_positions"}  # the task's segment length, linked
_HELD = {}  # absolute save dir -> file descriptor of its lock (held until the process ends)


# ---- one training per save directory -------------------------------------------------------------
def try_lock(path: str) -> Tuple[Optional[int], str]:
    """Take an exclusive advisory ``lockf`` lock on ``path`` (created if missing) without waiting. The kernel
    drops it when the process ends, however it ends; it works across hosts on NFS with lockd. Returns
    ``(fd, "")`` once taken (the file then names this process: pid, host, since when), or ``(None, holder)``
    with the line of the process that holds it. Release with :func:`release_lock`. (Also the launcher's lock on
    a run directory, ``slurm/launch.py``.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + "\n").encode(), 0)
    return fd, ""


def release_lock(fd: int) -> None:
    os.ftruncate(fd, 0)  # a clean exit leaves the file empty (a killed holder's line stays: harmless)
    os.close(fd)  # drops the lock


def lock_save_dir(save_dir: str) -> None:
    """Hold an exclusive advisory lock on ``<save_dir>/.train.lock`` until this process ends, or stop with
    one ``error:`` line naming the holder."""
    key = os.path.realpath(save_dir)
    if key in _HELD:
        return
    fd, holder = try_lock(os.path.join(save_dir, LOCK_NAME))
    if fd is None:
        raise UserError(
            f"--save-dir {save_dir} is in use by another training ({holder}): two trainings in one directory "
            "overwrite each other's checkpoints. Wait for it to end or stop it (the lock goes with the "
            "process), or give another --save-dir"
        )
    _HELD[key] = fd
    atexit.register(_release, key)


def _release(key: str) -> None:
    fd = _HELD.pop(key, None)
    if fd is not None:
        release_lock(fd)


# ---- a finished run stays finished ---------------------------------------------------------------
def stop_if_finished(trainer, path: str) -> None:
    """End a restart whose checkpoint has reached ``--max-update``, before any update (exit 0)."""
    max_update = trainer.cfg.optimization.max_update or 0
    done = trainer.get_num_updates()
    if max_update > 0 and done >= max_update:
        logger.info(
            f"finished already: {path} is at update {done} and --max-update is {max_update}; "
            "nothing trained, no file changed (raise --max-update to train on)"
        )
        raise SystemExit(0)


# ---- changed settings ----------------------------------------------------------------------------
@dataclass
class ResumePlan:
    """What loading a checkpoint with the requested settings must do beyond fairseq's load."""

    path: str
    changes: List[str] = field(default_factory=list)  # what differs from the checkpoint, in words
    reset_memory: bool = False
    position: dict = field(default_factory=dict)  # the saved iterator state, when the data layout changed
    saved_segment_len: int = 0
    same_streams: bool = True


def read_saved_state(path: str) -> Optional[dict]:
    """The checkpoint's configuration, iterator position and data fingerprint (tensors memory-mapped,
    nothing but plain values unpickled), or ``None`` when it has no ``cfg`` or cannot be read that way."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("cfg"), dict):
        return None
    return {
        "cfg": state["cfg"],
        "train_iterator": (state.get("extra_state") or {}).get("train_iterator") or {},
        "data_fingerprint": (state.get("task_state") or {}).get("data_fingerprint"),
    }


def _streams(cfg) -> Optional[int]:
    """Streams of a ``segment_lm`` training: rows of a batch (``--batch-size``, or ``--max-tokens`` / T)
    times the number of data-parallel workers."""
    dataset, dist, tps = cfg["dataset"], cfg["distributed_training"], cfg["task"].get("tokens_per_sample")
    rows = dataset.get("batch_size") or (
        dataset.get("max_tokens") // tps if dataset.get("max_tokens") and tps else None
    )
    return None if rows is None else rows * max(dist.get("distributed_world_size") or 1, 1)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def plan_resume(path: str, saved: dict, cfg, explicit: bool = False) -> ResumePlan:
    """Compare the configuration saved in ``path`` with the requested ``cfg`` (the trainer's full config).
    ``explicit``: ``path`` is a ``--restore-file``, not this run's own checkpoint: another model is then
    loaded with a warning (converting weights between mechanisms is a legitimate start), not refused."""
    from omegaconf import OmegaConf

    asked = OmegaConf.to_container(cfg, resolve=True)
    old_model, new_model = saved["cfg"].get("model") or {}, asked.get("model") or {}
    positions_learned = new_model.get("pos_emb") == "learned"
    differing = sorted(
        k
        for k in set(old_model) & set(new_model)  # a field newer than the checkpoint keeps its old behaviour
        if k != "_name"
        and old_model[k] != new_model[k]
        and k not in TRAINING_ONLY_MODEL_FIELDS
        and k not in MEMORY_FIELDS
        and (k not in LAYOUT_MODEL_FIELDS or (positions_learned and k == "max_target_positions"))
    )
    if differing:
        fields = ", ".join(f"{_flag(k)}: {old_model[k]} saved, {new_model[k]} asked" for k in differing)
        what = (
            f"{path} holds another model ({old_model.get('_name')}) than the one asked for ({new_model.get('_name')})"
        )
        if explicit:
            logger.warning(f"{what}: {fields}; loading its weights into the model asked for (--restore-file)")
        else:
            keep = " ".join(f"{_flag(k)} {old_model[k]}" for k in differing)
            raise UserError(
                f"{what}: {fields}. Resume it with its settings ({keep}), or train the new model from scratch "
                "in another --save-dir (or start it from these weights with --restore-file and a new --save-dir)"
            )

    plan = ResumePlan(path)
    memory = [k for k in MEMORY_FIELDS if k in old_model and k in new_model and old_model[k] != new_model[k]]
    plan.changes += [f"{_flag(k)} {new_model[k]} (saved: {old_model[k]})" for k in memory]
    plan.reset_memory = bool(memory)
    if asked["task"].get("_name") == "segment_lm" and saved["cfg"].get("task", {}).get("_name") == "segment_lm":
        old_t, new_t = saved["cfg"]["task"].get("tokens_per_sample"), asked["task"].get("tokens_per_sample")
        old_s, new_s = _streams(saved["cfg"]), _streams(asked)
        if old_s != new_s:
            plan.changes.append(f"{new_s} streams (--batch-size x workers; saved: {old_s})")
        if old_t != new_t:
            plan.changes.append(f"--tokens-per-sample {new_t} (saved: {old_t})")
        if (old_s, old_t) != (new_s, new_t):
            plan.reset_memory = True  # it belongs to other streams, or ends at another offset
            position = saved["train_iterator"]
            if not cfg.checkpoint.reset_dataloader and position.get("iterations_in_epoch", 0) > 0 and old_s:
                plan.position, plan.saved_segment_len = position, old_t
                plan.same_streams = old_s == new_s
    return plan


def _move_position(plan: ResumePlan, epoch_itr) -> Optional[str]:
    """Set the iterator of the new layout at the data position the checkpoint reached; say where."""
    dataset = getattr(epoch_itr, "dataset", None)
    if not plan.position or not hasattr(dataset, "stream_len"):
        return None
    position, epoch = plan.position, plan.position["epoch"]
    # mid-epoch (fairseq saves a complete epoch as the next one at 0): reached < the saved streams' length,
    # so floor(reached / T') < the number of segments of T' (the position exists in the new layout)
    reached = position["iterations_in_epoch"] * plan.saved_segment_len  # tokens per saved stream
    if not plan.same_streams:
        epoch_itr.load_state_dict({**position, "iterations_in_epoch": 0})
        return (
            f"epoch {epoch} restarts at its beginning: the streams are cut anew, so no position of the new "
            f"layout has all its earlier tokens trained on; the first {reached:,} tokens of every saved stream "
            "are trained on again (none skipped)"
        )
    new_t = dataset.segment_len
    epoch_itr.load_state_dict({**position, "iterations_in_epoch": reached // new_t})
    kept = reached // new_t * new_t
    return (
        f"the data position is kept in tokens: stream offset {kept:,} (segment {reached // new_t} of {new_t}) "
        f"where the checkpoint reached {reached:,}, so {reached - kept} tokens per stream are trained on "
        "again and none skipped"
    )


def apply_plan(plan: ResumePlan, trainer, epoch_itr) -> None:
    """After fairseq's load: reset the memory and move the data position as planned, and say so."""
    if not plan.changes:
        return
    effects = []
    if plan.reset_memory:
        had_memory = False
        for module in trainer.model.modules():
            memory = getattr(module, "stream_memory", None)
            if isinstance(memory, dict):
                # a model that carries state across segments: its saved memory (if the load kept any, e.g.
                # not already dropped for another number of processes) belongs to other streams
                had_memory |= bool(getattr(module, "carries_state", False))
                memory.pop("train", None)
        if had_memory:
            effects.append("the saved memory is reset (the next segment starts with none)")
    moved = _move_position(plan, epoch_itr)
    if moved:
        effects.append(moved)
    logger.warning(
        f"resuming {plan.path} with {', '.join(plan.changes)}: {'; '.join(effects) or 'nothing else changes'}"
    )


# ---- installation --------------------------------------------------------------------------------
def install() -> None:
    """Lock ``--save-dir`` where fairseq-train first touches it (``verify_checkpoint_directory``, called by
    the master process before any work)."""
    from fairseq import checkpoint_utils

    original = checkpoint_utils.verify_checkpoint_directory
    if getattr(original, "_locks_save_dir", False):
        return

    def verify_checkpoint_directory(save_dir: str) -> None:
        original(save_dir)
        lock_save_dir(save_dir)

    verify_checkpoint_directory._locks_save_dir = True
    checkpoint_utils.verify_checkpoint_directory = verify_checkpoint_directory

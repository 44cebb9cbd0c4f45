"""Safe object broadcast between data-parallel ranks: a multi-process run can be resumed.

What fairseq 0.12.3 does (``fairseq/distributed/utils.py``, read for this patch): ``Trainer.load_checkpoint``
reads the checkpoint on rank 0 only (``checkpoint_utils.load_checkpoint_to_cpu``, which turns the stored
``cfg`` dict into an ``omegaconf.DictConfig``) and sends it to the other ranks with ``broadcast_object``.
That function replaces every tensor by a ``_TensorPlaceholder(index)``, sends the rest with
``_broadcast_object_slow`` (``torch.save`` on rank 0, a plain ``torch.load(buffer)`` on the others) and the
tensors with ``broadcast_tensors``. With torch >= 2.6 that ``torch.load`` defaults to ``weights_only=True``
and refuses both the ``DictConfig`` and fairseq's own placeholder class: every resume of a run with more than
one process dies (``Unsupported global: GLOBAL omegaconf.dictconfig.DictConfig`` on rank 1, ``Connection
closed by peer`` on rank 0), on CPU/gloo and on GPUs/NCCL alike.

What :func:`install` changes in ``fairseq.distributed.utils._broadcast_object_slow``:

- the sender turns every OmegaConf container (and ``argparse.Namespace``) into plain dicts/lists first
  (``checkpointing.plain_data``, the same conversion the checkpoint writer applies): exactly what the
  checkpoint file itself holds; ``Trainer.load_checkpoint`` reads no config from the broadcast state;
- the receivers unpickle with ``weights_only=True`` and one class allowed beyond torch's defaults:
  ``_TensorPlaceholder``, a frozen dataclass holding one ``int`` (unpickling it sets that attribute and runs
  no code). Any other class is refused, with one line naming the object.

It also wraps ``broadcast_tensors`` (which sends the tensors themselves): the sender's tensors are made
contiguous first. fairseq sends each one with ``dist.broadcast`` and the receivers view the bytes with the
tensor's size; a non-contiguous tensor (a slice of a longer one, e.g. a loaded stream memory) reached the
other ranks as the wrong elements, silently (seen with gloo).

Safe loading is not weakened: no ``weights_only=False``, no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
The patch checks the installed fairseq when installed and raises if the patched function or its caller
changed, instead of patching something else.
"""

import atexit
import inspect
import io
import pickle
import re

import torch
from fairseq.distributed import utils as distributed_utils

from .checkpointing import plain_data
from .errors import UserError

# Parameter names of the fairseq function this module replaces (fairseq-fixed 0.12.3.1).
PATCHED_SIGNATURE = ["obj", "src_rank", "group", "dist_device"]
PATCHED_SIGNATURE_TENSORS = ["tensors", "src_rank", "group", "dist_device"]
_ORIGINAL = {}


def safe_loads(payload: io.BytesIO):
    """Unpickle a broadcast payload: tensors, plain containers and fairseq's tensor placeholders only."""
    with torch.serialization.safe_globals([distributed_utils._TensorPlaceholder]):
        try:
            return torch.load(payload, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f"it would create {unsafe.group(1)}" if unsafe else str(e).splitlines()[0][:160]
            raise UserError(
                f"refusing what rank 0 sent (a checkpoint being loaded): {what}, not only tensors and plain "
                "values; resume from a checkpoint written by this project"
            ) from None


def _broadcast_object_slow(obj, src_rank, group, dist_device):
    """fairseq's ``_broadcast_object_slow`` with plain data on the wire and a ``weights_only`` unpickle."""
    broadcast = distributed_utils.broadcast
    if distributed_utils.get_rank(group) == src_rank:
        buffer = io.BytesIO()
        torch.save(plain_data(obj), buffer)
        buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
        length = torch.LongTensor([len(buffer)]).to(dist_device)
        broadcast(length, src=src_rank, group=group)
        broadcast(buffer, src=src_rank, group=group)
        return obj
    length = torch.LongTensor([0]).to(dist_device)
    broadcast(length, src=src_rank, group=group)
    buffer = torch.ByteTensor(int(length.item())).to(dist_device)
    broadcast(buffer, src=src_rank, group=group)
    return safe_loads(io.BytesIO(buffer.cpu().numpy()))


def broadcast_tensors(tensors, src_rank, group, dist_device=None):
    """fairseq's ``broadcast_tensors`` with the sender's tensors made contiguous (see the module docstring)."""
    if tensors is not None:
        tensors = [t.contiguous() for t in tensors]
    return _ORIGINAL["broadcast_tensors"](tensors, src_rank, group, dist_device)


def _check_fairseq() -> None:
    target = _ORIGINAL.get("_broadcast_object_slow") or getattr(distributed_utils, "_broadcast_object_slow", None)
    found = None if target is None else list(inspect.signature(target).parameters)
    problems = []
    if found != PATCHED_SIGNATURE:
        problems.append(f"_broadcast_object_slow{tuple(PATCHED_SIGNATURE)} is {found}")
    else:
        source = inspect.getsource(target)
        if "torch.save(obj, buffer)" not in source or "torch.load(buffer" not in source:
            problems.append("_broadcast_object_slow no longer pickles with torch.save/torch.load")
    target = _ORIGINAL.get("broadcast_tensors") or getattr(distributed_utils, "broadcast_tensors", None)
    found = None if target is None else list(inspect.signature(target).parameters)
    if found != PATCHED_SIGNATURE_TENSORS:
        problems.append(f"broadcast_tensors{tuple(PATCHED_SIGNATURE_TENSORS)} is {found}")
    if not hasattr(distributed_utils, "_TensorPlaceholder"):
        problems.append("_TensorPlaceholder is gone")
    elif not {"_broadcast_object_slow(", "broadcast_tensors("} <= _calls(distributed_utils.broadcast_object):
        problems.append("broadcast_object no longer calls _broadcast_object_slow and broadcast_tensors")
    if problems:
        raise RuntimeError(
            f"plugins/distributed.py patches fairseq.distributed.utils of fairseq 0.12.3, but in the installed "
            f"fairseq {'; '.join(problems)}: review the patch for this fairseq version"
        )


def _calls(function) -> set:
    source = inspect.getsource(function)
    return {name for name in ("_broadcast_object_slow(", "broadcast_tensors(") if name in source}


def release_process_group() -> None:
    """At interpreter exit: tear the default process group down while Python still runs. fairseq leaves it
    to the interpreter's teardown, where gloo's threads can abort the process after a complete run
    ("terminate called without an active exception", exit -6: seen on 2-process CPU runs, once in a plain
    2-rank broadcast and once on a 2-node Slurm job, after their work had finished)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def install() -> None:
    """Patch ``fairseq.distributed.utils`` (idempotent; see the module docstring) and release the process
    group at exit (``release_process_group``)."""
    if _ORIGINAL:
        return
    atexit.register(release_process_group)
    _check_fairseq()
    _ORIGINAL["_broadcast_object_slow"] = distributed_utils._broadcast_object_slow
    _ORIGINAL["broadcast_tensors"] = distributed_utils.broadcast_tensors
    distributed_utils._broadcast_object_slow = _broadcast_object_slow
    distributed_utils.broadcast_tensors = broadcast_tensors

"""Every data-parallel rank's stream state in the checkpoint, so a resumed N-process run continues exactly.

Each rank of a ``segment_lm`` run trains its own streams and carries its own recurrent state from one
segment to the next (``StreamStateMixin.stream_memory["train"]``: the Transformer-XL memory, compressive
memory, linear-attention state, adaptive-span cache or LSTM (h, c), with the stream offset it ended at).
fairseq saves checkpoints on rank 0 only (``Trainer.save_checkpoint`` builds the state dict there), so the
other ranks' states were lost and after a resume their streams started with no memory.

What :func:`install` changes (only ``fairseq.checkpoint_utils.save_checkpoint``, which ``fairseq-train``
calls on every rank at every save, before it returns early on ranks that do not write): before the save,
every rank sends the training state of each stream-state module to rank 0 (:func:`gather_to_first`, a
``torch.save`` payload per rank, unpickled on rank 0 with ``weights_only=True``). Rank 0 puts the list, one
entry per rank, into the module's ``_extra_state`` (``"ranks"``) next to its own state (``"train_memory"``,
what single-process tools read). On resume, rank 0 loads the checkpoint and fairseq sends it to every rank
(``plugins/distributed.py``); each rank takes its own entry (``set_extra_state``). A resume with another
number of ranks starts every stream with no memory and says so in one warning line.

Cost: each save gathers the states on rank 0 (a Transformer-XL memory is B x M x D per layer per rank), and
the checkpoint holds N of them instead of one.
"""

import inspect
import io
from typing import List, Optional

import torch
from fairseq import checkpoint_utils

PATCHED_SIGNATURE = ["cfg", "trainer", "epoch_itr", "val_loss"]
_ORIGINAL = {}


def gather_to_first(obj, group, device: torch.device) -> Optional[List]:
    """``obj`` of every rank of ``group`` (plain data: tensors, numbers, strings, containers), as a list in
    rank order on the group's first rank; ``None`` on the others. Unpickled with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    length = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch.distributed.all_gather(lengths, length, group=group)
    size = int(max(n.item() for n in lengths))
    padded = torch.zeros(size, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    first = torch.distributed.get_global_rank(group, 0) if group is not None else 0
    received = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    torch.distributed.gather(padded, received, dst=first, group=group)
    if rank != 0:
        return None
    return [
        torch.load(io.BytesIO(t[: int(n.item())].cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
        for t, n in zip(received, lengths)
    ]


def stream_state_modules(model) -> list:
    from .models.stream_state import StreamStateMixin

    return [m for m in model.modules() if isinstance(m, StreamStateMixin)]


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    """fairseq's ``save_checkpoint``, with every rank's stream state gathered on rank 0 first."""
    modules = stream_state_modules(trainer.model)
    if cfg.no_save or trainer.data_parallel_world_size == 1 or not modules:
        return _ORIGINAL["save_checkpoint"](cfg, trainer, epoch_itr, val_loss)
    states = [m.train_state_dict() for m in modules]
    gathered = gather_to_first(states, trainer.data_parallel_process_group, trainer.device)
    try:
        if gathered is not None:
            for i, module in enumerate(modules):
                module.rank_train_states = [per_rank[i] for per_rank in gathered]
        return _ORIGINAL["save_checkpoint"](cfg, trainer, epoch_itr, val_loss)
    finally:
        for module in modules:
            module.rank_train_states = None


def _check_fairseq() -> None:
    target = _ORIGINAL.get("save_checkpoint") or checkpoint_utils.save_checkpoint
    found = list(inspect.signature(target).parameters)
    source = inspect.getsource(target)
    if found != PATCHED_SIGNATURE or "should_save_checkpoint_on_current_rank" not in source:
        raise RuntimeError(
            f"plugins/rank_states.py wraps fairseq.checkpoint_utils.save_checkpoint{tuple(PATCHED_SIGNATURE)} of "
            f"fairseq 0.12.3, called on every rank; the installed fairseq has {found}: review the patch"
        )


def install() -> None:
    """Wrap ``fairseq.checkpoint_utils.save_checkpoint`` (idempotent; see the module docstring)."""
    if _ORIGINAL:
        return
    _check_fairseq()
    _ORIGINAL["save_checkpoint"] = checkpoint_utils.save_checkpoint
    checkpoint_utils.save_checkpoint = save_checkpoint

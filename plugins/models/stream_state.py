"""``StreamStateMixin``: the bookkeeping of state carried across the segments of ``segment_lm`` streams.

Shared by every decoder that carries a recurrent state from one segment to the next (``EfficientDecoder``'s
memory with ``--mem-len``, ``lstm_stateful``'s (h, c)). The rules, in one place:

- one state per mode (``"train"`` / ``"eval"``), so validation never leaks into training;
- a kept state is used only if it ended exactly where the new segment starts (``stream_offset``, given by
  ``segment_lm`` in ``net_input``) and holds the same number of streams: a new epoch or pass (offset 0),
  another stream layout or a skipped segment start afresh;
- it is detached when kept (no gradient into the previous segment: truncated BPTT);
- the training state is saved in checkpoints (``get_extra_state``), every rank's in a run of several
  processes, so a resumed run continues exactly;
  the task resets the evaluation state at validation start (``reset_memory("eval")``).

A state is a ``TensorState`` with an integer ``position`` (the stream position of its next token).
"""

import logging
from typing import Dict, Optional, Type

import torch
from torch import Tensor

from ..memory import TensorState

logger = logging.getLogger(__name__)


def data_parallel_position():
    if not torch.distributed.is_initialized():
        return [0, 1]
    return [torch.distributed.get_rank(), torch.distributed.get_world_size()]


class StreamStateMixin:
    """Mix into a ``FairseqIncrementalDecoder`` (before it in the bases); call ``init_stream_state`` in
    ``__init__`` and use ``previous_stream_state`` / ``keep_stream_state`` around the forward pass."""

    stream_state_type: Type[TensorState]  # how the saved state is rebuilt (its ``from_dict``)

    def init_stream_state(self) -> None:
        self.stream_memory: Dict[str, TensorState] = {}

    @property
    def carries_state(self) -> bool:
        """True when segments of a stream see their past through the kept state (evaluation tools ask)."""
        return True

    @property
    def stream_mode(self) -> str:
        return "train" if self.training else "eval"

    def previous_stream_state(self, tokens: Tensor, stream_offset: int) -> Optional[TensorState]:
        """The state left by the segment of these streams that ended at ``stream_offset``, else ``None``."""
        state = self.stream_memory.get(self.stream_mode)
        if state is not None and (state.position != stream_offset or state.batch_size != tokens.size(0)):
            return None
        if state is not None and state.device != tokens.device:  # restored from a CPU-loaded checkpoint
            state = state.to(tokens.device)
        return state

    def keep_stream_state(self, state: TensorState) -> None:
        # no gradient into the previous segment (detach); compact tensors (contiguous), so that the state
        # computed on is the same, in value and in memory layout, as the one a checkpoint restores or
        # fairseq's broadcast delivers (a slice of a longer tensor would be saved whole, sent as raw
        # memory, and computed on with other kernels than its restored contiguous copy: 1e-16 apart)
        self.stream_memory[self.stream_mode] = state.detach().contiguous()

    def reset_memory(self, mode: Optional[str] = None) -> None:
        """Forget the stream state of ``mode`` ("train" / "eval"), or of both."""
        if mode is None:
            self.stream_memory.clear()
        else:
            self.stream_memory.pop(mode, None)

    def train_state_dict(self) -> Optional[dict]:
        """The training state as plain data (tensors and numbers), or ``None``."""
        state = self.stream_memory.get("train")
        return None if state is None else state.to_dict()

    def get_extra_state(self) -> dict:
        """Saved in checkpoints: the training state, so a resumed run continues exactly. Each process holds
        its own streams: ``train_memory`` is the saving process's state (tagged with its ``[rank, world
        size]``); in a run of several processes ``ranks`` holds every rank's, gathered on the saving rank
        before the save (``plugins/rank_states.py``)."""
        extra = {"train_memory": self.train_state_dict(), "rank": data_parallel_position()}
        if getattr(self, "rank_train_states", None) is not None:
            extra["ranks"] = self.rank_train_states
        return extra

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints saved before the state was part of the state dict load with no state."""
        state_dict.setdefault(f"{name}._extra_state" if name else "_extra_state", {"train_memory": None})
        return super().upgrade_state_dict_named(state_dict, name)

    def set_extra_state(self, extra: dict) -> None:
        """Take this process's own training state back: ``ranks[rank]`` when the checkpoint was saved by
        as many processes as run now, ``train_memory`` when it was saved by this same rank alone; else start
        afresh and say so (the streams of another number of processes are other streams)."""
        self.stream_memory.clear()
        if not extra:
            return
        rank, world = data_parallel_position()
        saved_rank, saved_world = extra.get("rank") or [0, 1]
        ranks = extra.get("ranks")
        if ranks is not None and len(ranks) == world:
            state = ranks[rank]
        elif saved_world == world and saved_rank == rank:
            state = extra.get("train_memory")
        else:
            if saved_world != world and (
                extra.get("train_memory") is not None or any(r is not None for r in ranks or [])
            ):
                # info, not warning: a different number of streams is what the user must hear about, in
                # the one warning line of plugins/resume.py (memory reset, where the data resumes)
                logger.info(
                    f"the checkpoint's stream memory was saved by {saved_world} process(es), this run has {world}: "
                    "the streams are cut anew, so every stream starts with no memory (reset)"
                )
            elif saved_world == world and extra.get("train_memory") is not None:
                logger.warning(
                    f"the checkpoint holds the stream memory of rank {saved_rank} only (saved before every rank's "
                    f"was kept): the streams of rank {rank} start with no memory"
                )
            return
        if state is not None:
            self.stream_memory["train"] = self.stream_state_type.from_dict(state)

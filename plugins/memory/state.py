"""Typed, explicit recurrent state.

Every piece of state that survives a forward call is a ``TensorState``: a dataclass of tensors that
knows how to ``detach`` (segment boundary: no gradient flows into the past) and ``index_select``
(beam search reorders the batch). Nothing below the decoder keeps state in module attributes: a layer
receives its state and returns the next one (``forward(x, mem) -> (y, new_mem)``).

Shapes: B = batch (streams), M = memory length, D = model dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

STATE_TYPES: Dict[str, type] = {}


class TensorState:
    """Mixin for dataclasses whose fields are tensors (or ``None``) with the batch on dim 0."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        STATE_TYPES[cls.__name__] = cls

    def to_dict(self) -> dict:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {"type": type(self).__name__, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_dict(d: dict) -> TensorState:
        d = dict(d)
        return STATE_TYPES[d.pop("type")](**d)

    def _map(self, fn):
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            values[f.name] = fn(v) if isinstance(v, Tensor) else v
        return dataclasses.replace(self, **values)

    def detach(self):
        return self._map(lambda t: t.detach())

    def index_select(self, order: Tensor):
        return self._map(lambda t: t.index_select(0, order))

    def to(self, device):
        return self._map(lambda t: t.to(device))

    def contiguous(self):
        return self._map(lambda t: t.contiguous())

    @property
    def device(self) -> Optional[torch.device]:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                return v.device
        return None

    @property
    def batch_size(self) -> int:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                return v.size(0)
        raise ValueError(f"{type(self).__name__} holds no tensor")


@dataclass
class HiddenMemory(TensorState):
    """The inputs an attention layer received for the last M positions (Transformer-XL's memory).

    In training, keys and values are recomputed from them with the current weights, as in Dai et al.
    2019, Sec. 3.2 (the memory is detached, but W_k and W_v still get gradient from the memory
    positions). Without gradients (validation, evaluation, generation) the weights are fixed, so the
    keys and values computed for the memory positions are cached as well and reused: exactly the same
    result without projecting the memory again at every segment or generated token.
    """

    hidden: Tensor  # B x M x D
    keys: Optional[Tensor] = None  # B x H x M x Dh, only when built without gradients
    values: Optional[Tensor] = None  # B x H x M x Dh

    @property
    def length(self) -> int:
        return self.hidden.size(1)

    @staticmethod
    def extend(
        mem: Optional[HiddenMemory],
        x: Tensor,
        keep: Optional[int],
        keys: Optional[Tensor] = None,
        values: Optional[Tensor] = None,
    ) -> Optional[HiddenMemory]:
        """Append this segment's inputs ``x`` (B x T x D) and keep the last ``keep`` positions
        (``None``: keep all, as incremental decoding of a full-context model does; 0: no memory).
        ``keys``/``values`` (B x H x S x Dh, over memory and segment) are kept only without gradients."""
        if keep == 0:
            return None
        ctx = x if mem is None else torch.cat([mem.hidden, x], dim=1)  # B x (M+T) x D
        cache = keys is not None and not torch.is_grad_enabled()
        if keep is not None:
            ctx = ctx[:, -keep:]
            if cache:
                keys, values = keys[:, :, -keep:], values[:, :, -keep:]
        return HiddenMemory(ctx, keys if cache else None, values if cache else None)


@dataclass
class DecoderState(TensorState):
    """The decoder's whole recurrent state: one entry per layer application, plus the number of
    positions consumed so far (absolute positions of the next token)."""

    layers: List[Optional[TensorState]]
    position: int = 0

    def to_dict(self) -> dict:
        return {"position": self.position, "layers": [None if s is None else s.to_dict() for s in self.layers]}

    @staticmethod
    def from_dict(d: dict) -> DecoderState:
        return DecoderState([None if s is None else TensorState.from_dict(s) for s in d["layers"]], d["position"])

    def detach(self):
        return DecoderState([None if s is None else s.detach() for s in self.layers], self.position)

    def index_select(self, order: Tensor):
        return DecoderState([None if s is None else s.index_select(order) for s in self.layers], self.position)

    def to(self, device):
        return DecoderState([None if s is None else s.to(device) for s in self.layers], self.position)

    def contiguous(self):
        return DecoderState([None if s is None else s.contiguous() for s in self.layers], self.position)

    @property
    def device(self) -> Optional[torch.device]:
        return next((s.device for s in self.layers if s is not None), None)

    @property
    def batch_size(self) -> Optional[int]:
        for s in self.layers:
            if s is not None:
                return s.batch_size
        return None

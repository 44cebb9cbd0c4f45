"""Contiguous streams of segments, the data layout of models with memory (Dai et al. 2019, Sec. 3.2).

The split is one flat token sequence x_1..x_N (fairseq's binarized stream, ``</s>`` at line ends),
preceded by ``</s>`` as the context of the first token, so every one of the N tokens is a target
exactly once. The N targets are cut into ``S = batch_size x world_size`` contiguous streams of
nearly equal length (the first N mod S streams get one more), and this rank owns ``batch_size`` of
them. Batch i holds the i-th segment of ``tokens_per_sample`` positions of each stream: row b of
batch i+1 continues row b of batch i, which is what makes memory across segments meaningful.
Consecutive streams overlap by one token (the last target of a stream's segment is the input of the
next segment), so nothing falls between segment boundaries. The last segment may be shorter and is
padded at the end; pad targets are ignored.
"""

import math
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..errors import UserError


class SegmentStreamDataset(FairseqDataset):
    """Item i is the whole batch i (the iterator feeds batches in order, never shuffled)."""

    def __init__(
        self,
        tokens: np.ndarray,  # N flat tokens of the split (a memmap for large data)
        eos: int,
        pad: int,
        segment_len: int,
        streams_per_rank: int,
        world_size: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        self.tokens, self.eos, self.pad = tokens, eos, pad
        self.segment_len, self.streams_per_rank = segment_len, streams_per_rank
        self.world_size, self.rank = world_size, rank
        n_targets, n_streams = len(tokens), streams_per_rank * world_size
        if n_targets < n_streams:
            raise UserError(
                f"the split has {n_targets} tokens, fewer than the {n_streams} streams asked for "
                f"(batch size {streams_per_rank} x {world_size} workers): use a smaller --batch-size"
            )
        base, extra = divmod(n_targets, n_streams)
        streams = np.arange(rank * streams_per_rank, (rank + 1) * streams_per_rank)
        self.stream_len = base + (streams < extra)  # targets per stream, on this rank
        self.stream_start = streams * base + np.minimum(streams, extra)  # in the eos-prefixed stream
        self.num_segments = math.ceil((base + (extra > 0)) / segment_len)
        self.num_targets = int(self.stream_len.sum())

    def with_streams(self, streams_per_rank: int) -> "SegmentStreamDataset":
        """The same split laid out as another number of streams (e.g. eval-lm's --batch-size)."""
        return SegmentStreamDataset(
            self.tokens, self.eos, self.pad, self.segment_len, streams_per_rank, self.world_size, self.rank
        )

    def _window(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of the eos-prefixed stream (position 0 is the prepended eos)."""
        lo = max(start - 1, 0)
        out = np.asarray(self.tokens[lo : stop - 1], dtype=np.int64)
        return np.concatenate([[self.eos], out]) if start == 0 else out

    def __getitem__(self, index: int):
        B, T = self.streams_per_rank, self.segment_len
        src = torch.full((B, T), self.pad, dtype=torch.long)  # B x T
        tgt = torch.full((B, T), self.pad, dtype=torch.long)  # B x T
        lengths = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            offset = index * T
            n = int(min(T, self.stream_len[b] - offset))
            if n <= 0:
                continue
            start = int(self.stream_start[b]) + offset
            window = torch.from_numpy(self._window(start, start + n + 1))  # inputs and targets
            src[b, :n], tgt[b, :n], lengths[b] = window[:-1], window[1:], n
        width = max(int(lengths.max()), 1)
        return {
            "id": torch.arange(B) + index * B,
            "nsentences": B,
            "ntokens": int(lengths.sum()),
            "net_input": {"src_tokens": src[:, :width], "src_lengths": lengths, "stream_offset": index * T},
            "target": tgt[:, :width],
        }

    def __len__(self) -> int:
        return self.num_segments

    def collater(self, samples):
        return samples[0] if samples else {}

    def num_tokens(self, index: int) -> int:
        return self.segment_len * self.streams_per_rank

    def size(self, index: int) -> int:
        return self.segment_len

    @property
    def sizes(self) -> np.ndarray:
        return np.full(len(self), self.segment_len)

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self))

    @property
    def supports_prefetch(self) -> bool:
        return False


def flat_tokens(dataset, bin_path: Optional[str] = None) -> np.ndarray:
    """The split as one flat array: a memmap of fairseq's ``.bin`` when it is mmap-binarized (instant,
    no copy; the format stores tokens back to back in order), else the concatenated items."""
    dtype = getattr(getattr(dataset, "_index", None), "dtype", None)
    if bin_path is not None and dtype is not None:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        if len(tokens) == int(np.sum(dataset.sizes)):
            return tokens
    return torch.cat([dataset[i] for i in range(len(dataset))]).numpy()

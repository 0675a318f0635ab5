"""An append-only Python list of ids mirrored as a tensor, extended by diff: what a step reads of a sequence's growing
state without rebuilding it from the list every step.

The sampler's penalties read every token a sequence has seen, and the runner every sequence's block table. Rebuilt
from the lists at every step that is O(length) host work (and, on a GPU, an O(length) upload) per sequence per step;
mirrored here, a step converts only the ids appended since the last one. A list replaced by another object (the KV
cache manager gives a preempted sequence a new, empty block table) or cut shorter starts the mirror over.
"""

from __future__ import annotations

import torch


class GrowingIds:
    def __init__(self, device: torch.device, dtype: torch.dtype = torch.long) -> None:
        self.buffer = torch.empty(0, dtype=dtype, device=device)  # [capacity]: the ids, the first `length` valid
        self.length = 0
        self._source: list[int] | None = None  # the list mirrored
        self._view = self.buffer[:0]  # buffer[:length], kept for the steps that add nothing

    def update(self, ids: list[int]) -> torch.Tensor:
        """The ids [len(ids)] as a view of the buffer, after converting those appended since the last call."""
        n = len(ids)
        if ids is self._source and n == self.length:  # nothing new: the step's common case for block tables
            return self._view
        if ids is not self._source or n < self.length:
            self._source, self.length = ids, 0
        if n > self.buffer.numel():
            # made outside inference mode (the runner's steps run in it): a normal tensor, updatable in place anywhere
            with torch.inference_mode(False):
                grown = torch.empty(
                    max(n, 2 * self.buffer.numel(), 64), dtype=self.buffer.dtype, device=self.buffer.device
                )
                grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        if n > self.length:
            new = torch.tensor(ids[self.length :], dtype=self.buffer.dtype)  # [n - length]
            self.buffer[self.length : n].copy_(new, non_blocking=True)
            self.length = n
        self._view = self.buffer[:n]
        return self._view

"""Decides which sequences run in the next step and how many tokens of each.

One token budget per step is shared by decodes (one token each) and prefills (a chunk of the prompt each):
running sequences are served first, then waiting ones in arrival order. When the KV cache runs out of blocks, the
most recently admitted running sequence is preempted: its blocks are freed and it goes back to the front of the
waiting queue, to be recomputed from its tokens so far (prompt and output), so no output token is lost or repeated.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from moeserve.engine.config import SchedulerConfig
from moeserve.engine.kv_cache_manager import KVCacheManager
from moeserve.engine.sequence import Sequence, SequenceStatus


class AdapterSlots(Protocol):
    """Where the scheduler gets device slots for the adapters of the sequences it admits."""

    def assign_slot(self, ref: Hashable, busy: set[int]) -> int | None:
        """A slot holding ref, never taking one in `busy`; None when there is no room this step."""
        ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens of seq computed this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    """The scheduler -> model runner contract for one step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting in this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, slots: AdapterSlots | None = None) -> None:
        self.config = config
        self.kv = kv
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # Running sequences first, oldest first; preempt from the newest end when blocks run short.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: nothing newer is left to run

        # Then waiting sequences in order, while there is budget, room and memory (not in a step that had to
        # preempt: memory is short, and the preempted sequence would come straight back). A sequence whose adapter
        # finds no device slot this step stays waiting and the next one is tried, so one step never holds more
        # distinct adapters than there are slots.
        busy = {s.adapter_slot for s in self.running if s.adapter_slot}
        skipped: list[Sequence] = []
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter_ref is not None:
                slot = self.slots.assign_slot(seq.adapter_ref, busy) if self.slots is not None else None
                if slot is None:
                    skipped.append(self.waiting.popleft())
                    continue
                seq.adapter_slot = slot
                busy.add(slot)
            self.kv.use_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq, seq.num_computed_tokens + num_new):
                self.kv.free(seq)  # give back the prefix blocks it took; it retries next step
                break
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))  # back in their places, ahead of the rest
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq (stop, length or abort) wherever it is and frees its blocks."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

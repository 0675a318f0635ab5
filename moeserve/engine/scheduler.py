"""Decides which sequences run in the next step and how many tokens of each, and applies what the step produced.

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
from moeserve.engine.core_messages import EngineCoreOutput
from moeserve.engine.kv_cache_manager import KVCacheManager
from moeserve.engine.sequence import Sequence, SequenceStatus, TokenLogprobs
from moeserve.engine.structured_output import grammar_finished
from moeserve.errors import kind_of


class AdapterSlots(Protocol):
    """Where the scheduler gets device slots for the adapters of the sequences it admits."""

    def assign_slot(self, ref: Hashable, busy: set[int]) -> int | None:
        """A slot holding ref, never taking one in `busy`; None when there is no room this step."""
        ...

    def release(self, ref: Hashable) -> None:
        """The sequence that acquired ref has finished."""
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
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """The model runner -> scheduler contract: what the step sampled."""

    request_ids: list[str]  # the sequences that sampled a token this step (their prompt or recomputation is done)
    sampled_token_ids: list[int]  # one per request id
    logprobs: list[TokenLogprobs | None]  # one per request id; None where not asked for
    # request id -> (first prompt position, logprobs of the prompt tokens from there) for the sequences that asked
    # and whose prefill ran this step (sampled or not)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        slots: AdapterSlots | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.slots = slots
        self.max_model_len = max_model_len or config.max_model_len
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence, by request id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Cumulative counts for /metrics: prompt tokens looked up in the prefix cache and found there (per
        # admission, recomputations after preemption included, as vLLM counts them), and preemptions.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.failed: list[EngineCoreOutput] = []  # sequences failed since the last step's outputs (take_failed)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
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
                try:
                    slot = self.slots.assign_slot(seq.adapter_ref, busy) if self.slots is not None else None
                except Exception as exc:  # its adapter cannot be placed (files changed, ...): this request fails
                    self.fail(self.waiting.popleft(), exc)
                    continue
                if slot is None:
                    skipped.append(self.waiting.popleft())
                    continue
                seq.adapter_slot = slot
                busy.add(slot)
            cached = self.kv.use_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq, seq.num_computed_tokens + num_new):
                self.kv.free(seq)  # give back the prefix blocks it took; it retries next step
                break
            self.waiting.popleft()
            if self.kv.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += cached
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
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Applies one step: computed tokens, prefix-cache registration, the sampled tokens, stop checks on tokens
        (stop token ids, EOS, max_tokens, the context), finishing (blocks and adapter released).

        Returns one output per sequence that sampled. Stop strings are the front end's: it detokenizes and aborts.
        """
        for item in sched.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(item.seq)
        for request_id, (first, entries) in result.prompt_logprobs.items():
            seq = self.requests[request_id]
            seq.prompt_logprobs[first : first + len(entries)] = entries
        outputs = []
        for request_id, token, logprobs in zip(result.request_ids, result.sampled_token_ids, result.logprobs):
            seq = self.requests[request_id]
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent once, with the first token
            params = seq.params
            if params.max_tokens == 0:  # the prompt only: the token sampled after it is not part of the answer
                self.finish(seq, "length")
                outputs.append(self._output(seq, [], None, "length", None, prompt_logprobs))
                continue
            seq.append_token(token)
            reason, stop_token = None, None
            if seq.grammar is not None and grammar_finished(seq.grammar, token):
                reason = "stop"  # the output is complete under its grammar (it may only end here)
            elif token in params.stop_token_ids:
                reason, stop_token = "stop", token
            elif not params.ignore_eos and token in seq.eos_token_ids:
                reason = "stop"
            elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
                self.max_model_len is not None and seq.num_tokens >= self.max_model_len
            ):
                reason = "length"
            if reason is not None:
                seq.stop_reason = stop_token
                self.finish(seq, reason)
            outputs.append(self._output(seq, [token], logprobs, reason, stop_token, prompt_logprobs))
        return outputs

    @staticmethod
    def _output(seq: Sequence, tokens, logprobs, reason, stop_token, prompt_logprobs) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_logprobs=None if logprobs is None else [logprobs],
            finish_reason=reason,
            stop_reason=stop_token,
            num_cached_tokens=seq.num_prefix_cached_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            prompt_logprobs=prompt_logprobs,
        )

    def fail(self, seq: Sequence, exc: BaseException) -> None:
        """Ends seq with an error that is its own (its adapter, its step): blocks and adapter freed, the error
        reported in the next outputs (take_failed), every other sequence untouched."""
        self.finish(seq, "error")
        self.failed.append(EngineCoreOutput(seq.request_id, [], error=str(exc), error_kind=kind_of(exc)))

    def take_failed(self) -> list[EngineCoreOutput]:
        failed, self.failed = self.failed, []
        return failed

    def abort(self, request_id: str) -> bool:
        """Ends the request now (stop string found, client gone); False for unknown or finished ids."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, "abort")
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq (stop, length, abort or error) wherever it is, frees its blocks and releases its adapter."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        self.requests.pop(seq.request_id, None)
        if seq.adapter_ref is not None and self.slots is not None:
            self.slots.release(seq.adapter_ref)

"""The messages between the front end (tokenizer, detokenizer, API) and the engine core (scheduler, model, sampler).

They are plain dataclasses of lists and ints, so the same objects serve the in-process engine and the core running
in its own process (pickled over a pipe). Outputs carry only what a step added: a request's new tokens and their
logprobs, never the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import TokenLogprobs
from moeserve.errors import ErrorKind


class StepFailedError(RuntimeError):
    """The step a request was part of failed (not the request's own fault): the server's error, a 500."""

    kind = ErrorKind.ENGINE


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]  # already tokenized and validated by the front end
    params: SamplingParams
    adapter: str | None = None  # a registered adapter's name; None: the base model
    arrival_time: float = 0.0  # time.monotonic() at the front end (CLOCK_MONOTONIC is shared across processes)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (one, or none for an error)
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, where the request asked for logprobs
    finish_reason: str | None = None  # "stop", "length", "abort"; None while it runs
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_scheduled_time: float | None = None
    error: str | None = None  # the request failed in the core (an unknown adapter, ...): it is finished
    error_kind: ErrorKind | None = None  # what kind of failure error is (its HTTP status at the front end)
    # The prompt's logprobs (one per prompt token, the first None), once, with the request's first output.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class SchedulerStats:
    """The core's state after a step, for /metrics and the adapter-aware gateway labels."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    max_adapter_slots: int = 0
    resident_adapters: int = 0
    adapter_loads: int = 0  # cumulative
    adapter_evictions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative: prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative: of those, tokens found there
    num_preemptions: int = 0  # cumulative


@dataclass
class EngineCoreOutputs:
    """One step's outputs plus the state they leave the core in."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None

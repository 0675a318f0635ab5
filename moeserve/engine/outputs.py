"""What the engine returns for a request after each step: the delta for streaming, and the request so far.

The cumulative fields (`token_ids`, `logprobs`) are the request's own growing state, shared rather than copied at
every step, so streaming costs O(new tokens): read them, do not mutate them. `text`, which would have to be joined
anew at every step, is the whole text on the request's final output and "" before it: a stream reads `new_text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.engine.sequence import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int  # which of the prompt's n completions
    text: str  # the whole text on the final output, "" before it (streams read RequestOutput.new_text)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() when the request was added
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_text: str = ""  # text added since the previous output of this request
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of new_token_ids, where asked for
    # One per prompt token (the first None), where asked for; from the request's first output on.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = None  # the engine failed this request (it is finished, with no completion)
    adapter: str | None = None  # the adapter it ran with; None: the base model

"""Turns the core's per-step outputs into what users read: text released incrementally, stop strings, RequestOutputs.

It runs beside the tokenizer (in the front end's process when the core has its own), keeps each request's growing
output, and tells the caller which requests a stop string ended so the core can drop them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from moeserve.engine.core_messages import EngineCoreOutput, EngineCoreRequest
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeserve.engine.sequence import TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    request: EngineCoreRequest
    prompt: str | None
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    first_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add(self, request: EngineCoreRequest, prompt: str | None = None, index: int = 0) -> None:
        p = request.params
        detok = IncrementalDetokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens)
        logprobs = [] if p.logprobs is not None else None
        self.requests[request.request_id] = _RequestState(request, prompt, index, detok, logprobs=logprobs)

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, outputs: list[EngineCoreOutput], now: float) -> tuple[list[RequestOutput], list[str]]:
        """The RequestOutputs of one step, and the ids of requests a stop string ended (to abort in the core).

        Outputs for requests no longer tracked (aborted here first) are dropped.
        """
        results, stopped = [], []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue
            if out.error is not None:  # the core refused or failed this request alone
                del self.requests[out.request_id]
                results.append(_failed(state, out.error))
                continue
            try:
                results.append(self._update(state, out, now))
            except Exception as exc:  # detokenizing this request failed: it ends here, the others go on
                logger.exception("output processing failed for request %s", out.request_id)
                results.append(_failed(state, f"processing this request's output failed: {type(exc).__name__}"))
                del self.requests[out.request_id]
                if out.finish_reason is None:
                    stopped.append(out.request_id)
                continue
            if results[-1].finished:
                del self.requests[out.request_id]
                if out.finish_reason is None:
                    stopped.append(out.request_id)
        return results, stopped

    def _update(self, state: _RequestState, out: EngineCoreOutput, now: float) -> RequestOutput:
        params = state.request.params
        state.token_ids.extend(out.new_token_ids)
        if state.logprobs is not None and out.new_logprobs:
            state.logprobs.extend(out.new_logprobs)
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = out.prompt_logprobs
        if state.first_token_time is None and out.new_token_ids:
            state.first_token_time = now
        reason, stop_reason = out.finish_reason, out.stop_reason
        text_ids = out.new_token_ids
        if reason == "stop" and not params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # the stop token or EOS that ended it is not text
        new_text, stop_str = state.detokenizer.add_tokens(text_ids, finished=reason is not None)
        if stop_str is not None:
            reason, stop_reason = "stop", stop_str
        request = state.request
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=state.index,
                    text=state.detokenizer.text if reason is not None else "",  # joined once, at the end
                    token_ids=state.token_ids,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    logprobs=state.logprobs,
                )
            ],
            finished=reason is not None,
            new_text=new_text,
            new_token_ids=out.new_token_ids,
            new_logprobs=out.new_logprobs or [],
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=out.num_cached_tokens,
            metrics=RequestMetrics(request.arrival_time, out.first_scheduled_time, state.first_token_time),
            adapter=request.adapter,
        )


def _failed(state: _RequestState, error: str) -> RequestOutput:
    r = state.request
    return RequestOutput(r.request_id, state.prompt, r.prompt_token_ids, [], True, error=error, adapter=r.adapter)

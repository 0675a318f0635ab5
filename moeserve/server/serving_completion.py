"""/v1/completions: prompts (text, token ids, or a batch of either) -> engine requests -> OpenAI's completion response
or its stream of chunks, with echo and logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.server import unsupported
from moeserve.server.errors import APIError
from moeserve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from moeserve.server.serving import OpenAIServing


class CompletionServing(OpenAIServing):
    # --- /v1/completions ---

    async def _completion_prompts(self, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """(token ids, text or None) of each prompt, tokenized and checked against the context."""
        p = req.prompt
        if isinstance(p, str):
            raw: list = [p]
        elif all(isinstance(x, int) for x in p):
            raw = [list(p)]
        else:
            raw = list(p)
        prompts = []
        for item in raw:
            ids, text = (await self._tokenize(item), item) if isinstance(item, str) else (list(item), None)
            self._check_prompt(ids, req.max_tokens)
            prompts.append((ids, text))
        return prompts

    def _check_completion(self, req: CompletionRequest) -> None:
        self._check_fields(req, unsupported.COMPLETION)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", "best_of")

    def _completion_params(self, req: CompletionRequest) -> SamplingParams:
        params = self._params(req, req.max_tokens, req.logprobs)
        # echo + logprobs: the prompt's logprobs come from the prefill, as many alternatives as logprobs asks.
        asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
        return replace(params, prompt_logprobs=max(asked)) if asked else params

    def _echo(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        self._check_completion(req)
        adapter = self.resolve_adapter(req.model)
        params = self._completion_params(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        prompts = await self._completion_prompts(req)
        finals: dict[tuple[int, int], RequestOutput] = {}

        async def run(p_index: int, prompt: tuple[list[int], str | None]) -> None:
            ids, text = prompt
            async for out in self._stream_choices(f"{request_id}-{p_index}", ids, params, adapter, text):
                if out.finished:
                    finals[(p_index, out.outputs[0].index)] = out

        await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        choices, usage = [], UsageInfo()
        for p_index in range(len(prompts)):
            for i in range(params.n):
                out = finals[(p_index, i)]
                c = out.outputs[0]
                text, logprobs = c.text, None
                if req.echo:
                    text = self._echo(out) + text
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(out, req) if req.echo else None
                    logprobs = self.logprobs.completion(c.logprobs, len(text) - len(c.text), result=logprobs)
                choices.append(
                    CompletionChoice(
                        index=p_index * params.n + i,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                        prompt_logprobs=self.logprobs.prompt_logprobs(out.prompt_logprobs, req.prompt_logprobs),
                    )
                )
                usage.completion_tokens += len(c.token_ids)
            usage.prompt_tokens += len(finals[(p_index, 0)].prompt_token_ids)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=req.model or self.model_name, choices=choices, usage=usage)

    def _completion_logprobs(self, out: RequestOutput, req: CompletionRequest) -> CompletionLogprobs:
        """With echo: the prompt's logprobs, the first token without one."""
        return self.logprobs.echoed_prompt(out.prompt_token_ids, out.prompt_logprobs, req.logprobs)

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        self._check_completion(req)
        adapter = self.resolve_adapter(req.model)
        params = self._completion_params(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompts = await self._completion_prompts(req)
        if len(prompts) != 1:
            raise APIError(400, "streaming supports one prompt per request", "prompt")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._sse(
            self._completion_chunks(request_id, created, req, prompts[0], params, adapter, include_usage)
        )

    async def _completion_chunks(self, request_id, created, req, prompt, params, adapter, include_usage):
        usage = UsageInfo()
        offsets = [0] * params.n
        started = [False] * params.n  # the choice's first chunk is out (with the echo and the prompt logprobs)
        prompt_tokens = 0
        async for out in self._stream_choices(request_id, prompt[0], params, adapter, prompt[1]):
            c = out.outputs[0]
            prompt_tokens = len(out.prompt_token_ids)
            text, logprobs, prompt_logprobs = out.new_text, None, None
            first = not started[c.index]
            if first and req.echo:
                text = self._echo(out) + text
            if req.logprobs is not None:
                lp = self._completion_logprobs(out, req) if first and req.echo else None
                echoed = len(text) - len(out.new_text)
                logprobs = self.logprobs.completion(out.new_logprobs, offsets[c.index] + echoed, result=lp)
            if first:
                prompt_logprobs = self.logprobs.prompt_logprobs(out.prompt_logprobs, req.prompt_logprobs)
            offsets[c.index] += len(text)
            if text or out.finished or logprobs or prompt_logprobs:
                started[c.index] = True
                choice = CompletionStreamChoice(
                    index=c.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason if out.finished else None,
                    stop_reason=c.stop_reason if out.finished else None,
                    prompt_logprobs=prompt_logprobs,
                )
                yield CompletionStreamResponse(
                    id=request_id, created=created, model=req.model or self.model_name, choices=[choice]
                )
            if out.finished:
                usage.completion_tokens += len(c.token_ids)
        if include_usage:
            usage.prompt_tokens = prompt_tokens
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield CompletionStreamResponse(
                id=request_id, created=created, model=req.model or self.model_name, choices=[], usage=usage
            )

"""The completion and chat-completion handlers: request -> engine requests -> OpenAI responses or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from moeserve.engine.input_processor import PromptTooLongError
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import TokenLogprobs
from moeserve.server import unsupported
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.chat_tools import ToolPlan, plan_tools
from moeserve.server.errors import APIError, api_error_of, error_body
from moeserve.server.logprobs import LogprobFormatter
from moeserve.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FieldError,
    TopLogprob,
    UsageInfo,
)

logger = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a worker thread, so the event loop keeps streaming others.
TOKENIZE_INLINE_CHARS = 4096


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_name: str, tool_call_parser: str | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.tool_call_parser = tool_call_parser  # parses "auto" tool calls (None: tool_choice auto is refused)
        self.logprobs = LogprobFormatter(self.tokenizer)
        template = self.tokenizer.chat_template
        self.template_renders_tools = isinstance(template, str) and "tools" in template

    # --- shared ---

    def resolve_adapter(self, model: str | None) -> str | None:
        """The adapter a request's `model` field names (None: the base model, also when `model` is omitted); 404
        for an unknown name."""
        if model is None or model == self.model_name:
            return None
        if self.engine.is_registered(model):
            return model
        raise APIError(404, f"the model {model!r} does not exist", "model")

    def _check_fields(self, req, table) -> None:
        """400 naming the first field set to something we cannot honour; logs who the request is for."""
        refused = unsupported.refused_field(req, table)
        if refused is not None:
            name, why = refused
            raise APIError(400, f"{name}: {why}", name)
        who = req.user or getattr(req, "safety_identifier", None)
        if who:
            logger.info("request for model %s from user %s", req.model or self.model_name, who)

    def _params(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's sampling parameters, each checked against the model (the ranges are the protocol's)."""
        vocab = self.engine.info.vocab_size
        if req.top_k is not None and req.top_k > vocab:
            raise APIError(400, f"top_k must be -1 (off) or in [1, {vocab}] (the vocabulary), got {req.top_k}", "top_k")
        if any(t >= vocab for t in req.stop_token_ids or ()):
            raise APIError(400, f"stop_token_ids must be token ids in [0, {vocab})", "stop_token_ids")
        try:
            params = req.sampling_params(max_tokens, logprobs)
        except FieldError as exc:
            raise APIError(400, str(exc), exc.field) from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), self.engine.inputs.vocab_size, "logit_bias")
        return params

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt, after the cheap size bound; long texts in a worker thread."""
        inputs = self.engine.inputs
        try:
            if len(text) <= TOKENIZE_INLINE_CHARS:
                return inputs.tokenize(text, add_special_tokens)
            inputs.check_text_size(text)
            return await asyncio.to_thread(inputs.tokenize, text, add_special_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), "prompt") from exc

    def _check_context(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "max_tokens") -> None:
        """A prompt and completion that cannot fit the context are a 400, as in vLLM (never silently cut short)."""
        limit = self.engine.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens and at least one must be left to generate.",
                "prompt" if param == "max_tokens" else "messages",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or the completion length.",
                param,
            )

    async def _stream_choices(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        adapter: str | None,
        prompt_text: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of all n choices of one prompt, interleaved as they come (choice i has index i)."""
        gen = self.engine.generate
        choices = params.choices(request_id)
        if len(choices) == 1:  # one engine request: its outputs as they are, with no task and queue in between
            ((choice_id, choice_params),) = choices
            try:
                async for out in gen(choice_id, prompt, choice_params, adapter, index=0, prompt_text=prompt_text):
                    yield out
            except Exception as exc:
                mapped = _api_error(exc)
                if mapped is exc:
                    raise
                raise mapped from exc
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, choice_id: str, choice_params: SamplingParams) -> None:
            try:
                async for out in gen(choice_id, prompt, choice_params, adapter, index=i, prompt_text=prompt_text):
                    await queue.put(out)
            except BaseException as exc:
                await queue.put(exc)
                raise
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, *choice)) for i, choice in enumerate(choices)]
        done = 0
        try:
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise _api_error(item)
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

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
        vocab = self.engine.info.vocab_size
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids, text = await self._tokenize(item), item
            else:
                ids, text = list(item), None
                if any(t >= vocab for t in ids):
                    raise APIError(400, f"prompt token ids must be integers in [0, {vocab})", "prompt")
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            self._check_context(len(ids), req.max_tokens)
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
                        prompt_logprobs=self._prompt_logprobs(out, req.prompt_logprobs),
                    )
                )
                usage.completion_tokens += len(c.token_ids)
            usage.prompt_tokens += len(finals[(p_index, 0)].prompt_token_ids)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=req.model or self.model_name, choices=choices, usage=usage)

    def _completion_logprobs(self, out: RequestOutput, req: CompletionRequest) -> CompletionLogprobs:
        """With echo: the prompt's logprobs, the first token without one."""
        return self.logprobs.echoed_prompt(out.prompt_token_ids, out.prompt_logprobs, req.logprobs)

    def _prompt_logprobs(self, out: RequestOutput, k: int | None):
        if k is None or out.prompt_logprobs is None:
            return None
        return self.logprobs.prompt_logprobs(out.prompt_logprobs, k)

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
                logprobs = logprobs.model_dump()
            if first:
                prompt_logprobs = self._prompt_logprobs(out, req.prompt_logprobs)
            offsets[c.index] += len(text)
            if text or out.finished or logprobs or prompt_logprobs:
                started[c.index] = True
                choice = {
                    "index": c.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason if out.finished else None,
                    "stop_reason": c.stop_reason if out.finished else None,
                }
                if prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _json_prompt_logprobs(prompt_logprobs)
                yield {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model or self.model_name,
                    "choices": [choice],
                }
            if out.finished:
                usage.completion_tokens += len(c.token_ids)
        if include_usage:
            usage.prompt_tokens = prompt_tokens
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": req.model or self.model_name,
                "choices": [],
                "usage": usage.model_dump(),
            }

    # --- /v1/chat/completions ---

    def render_chat(self, messages, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """The messages (and tools) through the chat template, as text; 400 for what the template cannot render."""
        rendered = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", "messages")
                content = "".join(part.text or "" for part in content)
            message = {"role": m.role, "content": content or ""}
            if m.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            rendered.append(message)
        try:  # the rendered text holds every message: too much content cannot fit, rendered or not
            self.engine.inputs.check_text_size("".join(m["content"] for m in rendered))
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), "messages") from exc
        try:
            return self.tokenizer.apply_chat_template(
                rendered, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja errors: the template rejected these messages
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages") from exc

    @staticmethod
    def check_token_ids(token_ids: list[int], vocab: int, field: str) -> None:
        if any(not 0 <= t < vocab for t in token_ids):
            raise APIError(400, f"{field}: token ids must be in [0, {vocab})", field)

    def _chat_logprobs(self, logprobs: list[TokenLogprobs] | None) -> ChatLogprobs:
        content = []
        for lp in logprobs or []:
            text = self._token_text(lp.token_id)
            top = [
                TopLogprob(token=self._token_text(t), logprob=v, bytes=list(self._token_text(t).encode()))
                for t, v in lp.top.items()
            ]
            content.append(
                ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    async def _chat_setup(self, req: ChatCompletionRequest):
        self._check_fields(req, unsupported.CHAT)
        adapter = self.resolve_adapter(req.model)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, req.max_completion_tokens or req.max_tokens, logprobs)
        plan = plan_tools(
            req, self.tool_call_parser, self.template_renders_tools, params.structured_outputs is not None
        )
        if plan.constraint is not None:
            params = replace(params, structured_outputs=plan.constraint)
        text = self.render_chat(req.messages, req.add_generation_prompt, plan.template_tools)
        ids = await self._tokenize(text, add_special_tokens=False)
        self._check_context(len(ids), req.max_completion_tokens or req.max_tokens, "max_completion_tokens")
        return adapter, params, ids, plan

    def _message(self, text: str, plan: ToolPlan) -> tuple[ChatResponseMessage, bool]:
        """The answer as a message, with the tool calls parsed out of it where the request has tools."""
        if plan.parser is None:
            return ChatResponseMessage(content=text), False
        content, calls = plan.parser.extract(text)
        calls = calls if plan.parallel else calls[:1]
        return ChatResponseMessage(content=content, tool_calls=[c.to_openai() for c in calls]), bool(calls)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        adapter, params, prompt, plan = await self._chat_setup(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        finals: dict[int, RequestOutput] = {}
        async for out in self._stream_choices(request_id, prompt, params, adapter):
            if out.finished:
                finals[out.outputs[0].index] = out
        choices, completion_tokens = [], 0
        for i in range(params.n):
            c = finals[i].outputs[0]
            completion_tokens += len(c.token_ids)
            message, called = self._message(c.text, plan)
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=self._chat_logprobs(c.logprobs) if req.logprobs else None,
                    finish_reason=_finish_reason(c.finish_reason, called),
                    stop_reason=c.stop_reason,
                )
            )
        usage = UsageInfo(
            prompt_tokens=len(prompt), completion_tokens=completion_tokens, total_tokens=len(prompt) + completion_tokens
        )
        return ChatCompletionResponse(
            id=request_id,
            model=req.model or self.model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=self._prompt_logprobs(finals[0], req.prompt_logprobs),
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        adapter, params, prompt, plan = await self._chat_setup(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._sse(
            self._chat_chunks(request_id, int(time.time()), req, prompt, params, adapter, plan, include_usage)
        )

    async def _chat_chunks(self, request_id, created, req, prompt, params, adapter, plan, include_usage):
        def chunk(choices, usage=None):
            body = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model or self.model_name,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return body

        def delta(index, content, calls, logprobs=None):
            d = {"content": content} if content or not calls else {}
            if calls:
                d["tool_calls"] = calls
            return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": None}

        outputs = self._stream_choices(request_id, prompt, params, adapter)
        first = await anext(outputs)  # the engine accepted the request: only now does the answer start
        for i in range(params.n):
            opening = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            if i == 0 and req.prompt_logprobs is not None:
                plp = self._prompt_logprobs(first, req.prompt_logprobs)
                opening["prompt_logprobs"] = _json_prompt_logprobs(plp)
            yield chunk([opening])
        streams = [plan.parser.stream() if plan.parser is not None else None for _ in range(params.n)]
        calls_sent = [0] * params.n
        completion_tokens = 0
        async for out in _prepend(first, outputs):
            c = out.outputs[0]
            logprobs = None
            if req.logprobs:
                logprobs = self._chat_logprobs(out.new_logprobs).model_dump()
            content, calls = out.new_text, []
            stream = streams[c.index]
            if stream is not None:
                content, done = stream.feed(out.new_text)
                if out.finished:
                    rest = stream.finish()  # an unclosed or partial tag: text, as written
                    content += rest if rest.strip() or not stream.calls else ""
                if not plan.parallel:
                    done = done[: max(0, 1 - calls_sent[c.index])]
                calls = [call.to_openai(calls_sent[c.index] + j) for j, call in enumerate(done)]
                calls_sent[c.index] += len(calls)
            if content or calls or logprobs:
                yield chunk([delta(c.index, content, calls, logprobs)])
            if out.finished:
                completion_tokens += len(c.token_ids)
                reason = _finish_reason(c.finish_reason, calls_sent[c.index] > 0)
                yield chunk(
                    [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason,
                      "stop_reason": c.stop_reason}]
                )  # fmt: skip
        if include_usage:
            usage = UsageInfo(
                prompt_tokens=len(prompt),
                completion_tokens=completion_tokens,
                total_tokens=len(prompt) + completion_tokens,
            )
            yield chunk([], usage.model_dump())

    # --- SSE ---

    async def _sse(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        """Server-sent events; the first chunk is produced before the response starts, so early errors are HTTP
        errors, and later ones become an error event (the status line is already sent)."""
        first = await anext(chunks)

        async def events() -> AsyncIterator[str]:
            try:
                yield f"data: {json.dumps(first)}\n\n"
                async for body in chunks:
                    yield f"data: {json.dumps(body)}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
            except Exception as exc:  # a bug of ours: this stream ends with an error event, the server goes on
                logger.error("stream failed", exc_info=exc)
                yield f"data: {json.dumps(error_body(500, f'internal server error: {type(exc).__name__}'))}\n\n"
            finally:
                await chunks.aclose()
            yield "data: [DONE]\n\n"

        return events()


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """ "tool_calls" for an answer that ended on its own with calls; a cut one stays "length"."""
    return "tool_calls" if called and reason == "stop" else reason


def _json_prompt_logprobs(prompt_logprobs) -> list:
    """vLLM's prompt_logprobs as JSON (token ids as string keys)."""
    return [None if e is None else {str(t): v.model_dump() for t, v in e.items()} for e in prompt_logprobs or []]


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _api_error(exc: BaseException) -> BaseException:
    """Engine-side failures in HTTP terms (server/errors.api_error_of); a bug of ours stays itself (a logged 500)."""
    return api_error_of(exc) or exc

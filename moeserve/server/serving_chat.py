"""/v1/chat/completions: messages (and tools) through the chat template -> engine requests -> OpenAI's chat response
or its stream of chunks, with tool calls parsed out of the answer where the request has tools."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from moeserve.engine.outputs import RequestOutput
from moeserve.server import unsupported
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.chat_tools import ToolPlan, plan_tools
from moeserve.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    UsageInfo,
)
from moeserve.server.serving import OpenAIServing, _prepend


class ChatServing(OpenAIServing):
    def __init__(self, engine: AsyncEngine, served_model_name: str, tool_call_parser: str | None = None) -> None:
        super().__init__(engine, served_model_name)
        self.tool_call_parser = tool_call_parser  # parses "auto" tool calls (None: tool_choice auto is refused)
        template = self.tokenizer.chat_template
        self.template_renders_tools = isinstance(template, str) and "tools" in template

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
        self._check_prompt(ids, req.max_completion_tokens or req.max_tokens, chat=True)
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
                    logprobs=self.logprobs.chat(c.logprobs) if req.logprobs else None,
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
            prompt_logprobs=self.logprobs.prompt_logprobs(finals[0].prompt_logprobs, req.prompt_logprobs),
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
            model = req.model or self.model_name
            return ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=choices, usage=usage
            )

        def delta(index, content, calls, logprobs=None):
            content = content if content or not calls else None
            return ChatStreamChoice(
                index=index, delta=ChatDelta(content=content, tool_calls=calls or None), logprobs=logprobs
            )

        outputs = self._stream_choices(request_id, prompt, params, adapter)
        first = await anext(outputs)  # the engine accepted the request: only now does the answer start
        for i in range(params.n):
            opening = ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            if i == 0:
                opening.prompt_logprobs = self.logprobs.prompt_logprobs(first.prompt_logprobs, req.prompt_logprobs)
            yield chunk([opening])
        streams = [plan.parser.stream() if plan.parser is not None else None for _ in range(params.n)]
        calls_sent = [0] * params.n
        completion_tokens = 0
        async for out in _prepend(first, outputs):
            c = out.outputs[0]
            logprobs = None
            if req.logprobs:
                logprobs = self.logprobs.chat(out.new_logprobs)
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
                last = ChatStreamChoice(index=c.index, delta=ChatDelta(), finish_reason=reason)
                last.stop_reason = c.stop_reason
                yield chunk([last])
        if include_usage:
            usage = UsageInfo(
                prompt_tokens=len(prompt),
                completion_tokens=completion_tokens,
                total_tokens=len(prompt) + completion_tokens,
            )
            yield chunk([], usage)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """ "tool_calls" for an answer that ended on its own with calls; a cut one stays "length"."""
    return "tool_calls" if called and reason == "stop" else reason

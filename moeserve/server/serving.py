"""The handlers' shared base: the served model's adapters, sampling parameters, prompts tokenized and checked against
the context, the engine's outputs of one prompt's n choices, chat rendering, server-sent events and engine errors in
HTTP terms. Each route family has its handler beside it: serving_completion.py, serving_chat.py,
serving_tokenization.py (the adapter routes are app.py's)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel

from moeserve.engine.input_processor import PromptTooLongError
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.server import unsupported
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.errors import APIError, api_error_of, error_body
from moeserve.server.logprobs import LogprobFormatter
from moeserve.server.protocol import (
    FieldError,
)

logger = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a worker thread, so the event loop keeps streaming others.
TOKENIZE_INLINE_CHARS = 4096


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_name: str) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.logprobs = LogprobFormatter(self.tokenizer)

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

    def _check_prompt(self, ids: list[int], max_tokens: int | None, chat: bool = False) -> None:
        """The engine's one prompt check (InputProcessor.check_prompt) as a 400 naming the field at fault."""
        try:
            self.engine.inputs.check_prompt(ids, max_tokens)
        except PromptTooLongError as exc:
            prompt, asked = ("messages", "max_completion_tokens") if chat else ("prompt", "max_tokens")
            raise APIError(400, str(exc), asked if exc.field == "max_tokens" else prompt) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), "messages" if chat else "prompt") from exc

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

    # --- SSE ---

    async def _sse(self, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
        """Server-sent events of the chunk models (protocol.py); the first chunk is produced before the response
        starts, so early errors are HTTP errors, and later ones become an error event (the status line is already
        sent). json.dumps, not pydantic's JSON, so a logprob of -inf stays -Infinity as before."""
        first = await anext(chunks)

        async def events() -> AsyncIterator[str]:
            try:
                yield f"data: {json.dumps(first.model_dump())}\n\n"
                async for body in chunks:
                    yield f"data: {json.dumps(body.model_dump())}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
            except Exception as exc:  # a bug of ours: this stream ends with an error event, the server goes on
                logger.error("stream failed", exc_info=exc)
                yield f"data: {json.dumps(error_body(500, f'internal server error: {type(exc).__name__}'))}\n\n"
            finally:
                await chunks.aclose()
            yield "data: [DONE]\n\n"

        return events()


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _api_error(exc: BaseException) -> BaseException:
    """Engine-side failures in HTTP terms (server/errors.api_error_of); a bug of ours stays itself (a logged 500)."""
    return api_error_of(exc) or exc

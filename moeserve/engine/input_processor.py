"""Turns a user's prompt into an engine-core request: tokenized and checked against the model before it is queued.

A text prompt first meets a cheap bound: no token of the vocabulary stands for more than `max_token_bytes` bytes of
text, so a prompt longer than max_model_len * max_token_bytes bytes cannot fit the context whatever it says, and is
refused before it is tokenized (a 10 MB prompt costs a length check, not seconds of tokenizer time).
"""

from __future__ import annotations

import time

from moeserve.engine.core_messages import EngineCoreRequest
from moeserve.engine.sampling_params import SamplingParams
from moeserve.errors import ErrorKind


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any one token's text takes (byte-level BPE pieces counted as written, an overestimate)."""
    vocab = tokenizer.get_vocab()
    return max((len(piece.encode("utf-8", "surrogatepass")) for piece in vocab), default=1) or 1


class PromptTooLongError(ValueError):
    """The prompt (with what it asks to generate) does not fit the model's context. field: what is at fault, the
    prompt itself ("prompt") or the tokens asked on top of it ("max_tokens")."""

    kind = ErrorKind.BAD_REQUEST

    def __init__(self, message: str, field: str = "prompt") -> None:
        super().__init__(message)
        self.field = field


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_prompt_bytes = max_model_len * max_token_bytes(tokenizer)

    def check_text_size(self, text: str) -> None:
        """PromptTooLongError when `text` is too long to fit the context as tokens, decided without tokenizing."""
        if len(text) > self.max_prompt_bytes or len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise PromptTooLongError(
                f"the prompt is {len(text.encode('utf-8', 'surrogatepass'))} bytes long, more than can fit the "
                f"model's context of {self.max_model_len} tokens ({self.max_prompt_bytes} bytes at most)"
            )

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.check_text_size(text)
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (TypeError, ValueError) as exc:  # text the tokenizer refuses (a lone surrogate, ...)
            raise ValueError(f"the prompt cannot be tokenized: {exc}") from exc

    def check_prompt(self, token_ids: list[int], max_tokens: int | None = None) -> None:
        """The one check of a tokenized prompt, for every route of the server and for the offline engine: not
        empty, every id in the vocabulary, and the prompt (plus max_tokens, where given) within the context, in
        vLLM's words (never silently cut short). ValueError; PromptTooLongError for the context."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab, limit, n = self.vocab_size, self.max_model_len, len(token_ids)
        if any(not (isinstance(t, int) and 0 <= t < vocab) for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if n >= limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {n} tokens and at "
                "least one must be left to generate."
            )
        if max_tokens is not None and n + max_tokens > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens. However, you requested {n + max_tokens} "
                f"tokens ({n} in the prompt, {max_tokens} for the completion). Please reduce the prompt or the "
                "completion length.",
                field="max_tokens",
            )

    def process(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> EngineCoreRequest:
        """The request for the core; ValueError for a prompt the model cannot take (check_prompt)."""
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(token_ids)
        return EngineCoreRequest(request_id, token_ids, params, adapter, time.monotonic())

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
    """The prompt (with what it asks to generate) does not fit the model's context."""

    kind = ErrorKind.BAD_REQUEST


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

    def process(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> EngineCoreRequest:
        """The request for the core; ValueError for a prompt the model cannot take."""
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        if any(not (isinstance(t, int) and 0 <= t < vocab) for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate"
            )
        return EngineCoreRequest(request_id, token_ids, params, adapter, time.monotonic())

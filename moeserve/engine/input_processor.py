"""Turns a user's prompt into an engine-core request: tokenized and checked against the model before it is queued."""

from __future__ import annotations

import time

from moeserve.engine.core_messages import EngineCoreRequest
from moeserve.engine.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> EngineCoreRequest:
        """The request for the core; ValueError for a prompt the model cannot take."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        if any(not (isinstance(t, int) and 0 <= t < vocab) for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate"
            )
        return EngineCoreRequest(request_id, token_ids, params, adapter, time.monotonic())

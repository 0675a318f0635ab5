"""The in-process engine: input processing, the engine core, output processing, in one loop.

    request -> InputProcessor (tokenize, check) -> EngineCore.add_request
    step:      EngineCore.step (schedule -> run + sample -> update_from_output) -> OutputProcessor (text, stop strings)

The HTTP server runs the same core in its own process (moeserve.engine.core_process); this class serves the offline
LLM API, `moeserve generate` and tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from moeserve.engine.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.input_processor import InputProcessor
from moeserve.engine.output_processor import OutputProcessor
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, adapters: Mapping[str, str | Path] | None = None) -> None:
        """The engine, with `adapters` (name -> directory) registered; a bad adapter fails the start."""
        self.config = config
        self.core = EngineCore(config)
        self.core.register_adapters((name, str(path), None) for name, path in (adapters or {}).items())
        self.tokenizer = self.core.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.core.model.spec.vocab_size, self.core.max_model_len)
        self.outputs = OutputProcessor(self.tokenizer)

    # The core's parts, for callers that inspect them (tests, benchmarks, metrics).
    @property
    def model(self):
        return self.core.model

    @property
    def adapters(self):
        return self.core.adapters

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv(self):
        return self.core.kv

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.core.eos_token_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
        index: int = 0,
    ) -> None:
        """Queues one sequence; `params.n` is the caller's to fan out (see LLM.generate)."""
        if request_id in self.outputs.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.inputs.process(request_id, prompt, params, adapter)
        self.core.add_request(request)  # UnknownAdapterError if the adapter is unknown: nothing is queued
        self.outputs.add(request, prompt if isinstance(prompt, str) else None, index)

    def abort_request(self, request_id: str) -> None:
        """Ends the request now and frees its KV blocks; unknown or finished ids are ignored."""
        self.outputs.abort(request_id)
        self.core.abort_requests([request_id])

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        results, stopped = self.outputs.process(self.core.step(), time.monotonic())
        self.core.abort_requests(stopped)
        return results

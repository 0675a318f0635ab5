"""The offline Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from moeserve.adapters.manager import UnknownAdapterError
from moeserve.engine.config import EngineConfig, build_engine_config
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, *, adapters: dict[str, str] | None = None, **options: Any) -> None:
        """The engine for `model` with `adapters` (name -> directory) registered; `options` are the engine options
        (moeserve.engine.config.ENGINE_OPTIONS: block_size=..., num_kv_blocks=..., max_adapters=..., ...), each
        defaulting to its config field's default."""
        self._start(build_engine_config(model, **options), adapters)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, adapters: dict[str, str] | None = None) -> LLM:
        llm = cls.__new__(cls)
        llm._start(config, adapters)
        return llm

    def _start(self, config: EngineConfig, adapters: dict[str, str] | None) -> None:
        self.engine = LLMEngine(config, adapters)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapter: str | None | list[str | None] = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (all batched together); outputs in the order of the prompts.

        `adapter` names a registered adapter for all prompts, or one per prompt (None: the base model).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        for name in set(adapters) - {None}:
            if not self.engine.adapters.is_registered(name):  # refuse before any prompt is queued
                raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        groups: list[tuple[str, list[str]]] = []  # per prompt: its request id, its choices' engine request ids
        for prompt, p, name in zip(prompts, per_prompt, adapters):
            request_id = f"gen-{next(self._ids)}"
            choices = p.choices(request_id)
            for i, (choice_id, choice_params) in enumerate(choices):
                self.engine.add_request(choice_id, prompt, choice_params, adapter=name, index=i)
            groups.append((request_id, [choice_id for choice_id, _ in choices]))
        finished: dict[str, RequestOutput] = {}
        total = sum(len(g) for g in groups)
        with tqdm(total=total, desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        results = []
        for request_id, ids in groups:
            outputs = [finished[i].outputs[0] for i in ids]
            results.append(replace(finished[ids[0]], request_id=request_id, outputs=outputs))
        return results

"""The offline Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import replace

from tqdm.auto import tqdm

from moeserve.adapters.manager import AdapterLimits, UnknownAdapterError
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        max_adapters: int = 4,
        max_cpu_adapters: int = 16,
        max_lora_rank: int = 64,
        max_lora_experts: int = 16,
        esft_rows_per_layer: int | None = None,
        adapters: dict[str, str] | None = None,
    ) -> None:
        config = EngineConfig(
            model=str(model),
            dtype=dtype,
            device=device,
            seed=seed,
            cache=CacheConfig(
                block_size=block_size, num_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len
            ),
            adapters=AdapterLimits(
                max_slots=max_adapters,
                max_cpu_adapters=max_cpu_adapters,
                max_lora_rank=max_lora_rank,
                max_lora_experts=max_lora_experts,
                esft_rows_per_layer=esft_rows_per_layer,
            ),
        )
        self._start(config, adapters)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, adapters: dict[str, str] | None = None) -> LLM:
        llm = cls.__new__(cls)
        llm._start(config, adapters)
        return llm

    def _start(self, config: EngineConfig, adapters: dict[str, str] | None) -> None:
        self.engine = LLMEngine(config)
        for name, path in (adapters or {}).items():
            self.engine.adapters.register(name, path)
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
        groups: list[list[str]] = []
        for prompt, p, name in zip(prompts, per_prompt, adapters):
            base = f"gen-{next(self._ids)}"
            ids = [f"{base}-{i}" for i in range(p.n)]
            for i, request_id in enumerate(ids):
                seed = None if p.seed is None else p.seed + i
                self.engine.add_request(request_id, prompt, replace(p, seed=seed), adapter=name, index=i)
            groups.append(ids)
        finished: dict[str, RequestOutput] = {}
        total = sum(len(g) for g in groups)
        with tqdm(total=total, desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        results = []
        for ids in groups:
            first = finished[ids[0]]
            outputs = [finished[i].outputs[0] for i in ids]
            results.append(replace(first, request_id=ids[0].rsplit("-", 1)[0], outputs=outputs))
        return results

"""The engine core: the scheduler, the model runner (sampler inside) and the adapters, stepped as one loop.

It takes tokenized requests and returns, per step, only what the step added (EngineCoreOutput). Tokenizing,
detokenizing and stop strings are the front end's (moeserve.engine.output_processor). The same core runs in-process
under the offline LLM API and in its own process behind the HTTP server (moeserve.engine.core_process).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from moeserve.adapters.config import AdapterError
from moeserve.adapters.manager import AdapterManager
from moeserve.engine.config import EngineConfig
from moeserve.engine.core_messages import EngineCoreOutput, EngineCoreRequest, SchedulerStats, StepFailedError
from moeserve.engine.host_allocator import keep_freed_memory
from moeserve.engine.kv_cache_manager import KVCacheManager
from moeserve.engine.kv_cache_tensors import default_num_blocks
from moeserve.engine.model_runner import ModelRunner
from moeserve.engine.sampler import Sampler
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence
from moeserve.engine.structured_output import StructuredOutputManager
from moeserve.models import load_model

logger = logging.getLogger(__name__)


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """End-of-sequence ids: generation_config.json's (it may list several: chat end tokens), or the tokenizer's."""
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory: it has no config.json")
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's activations reuse the last step's pages (host_allocator.py)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)  # for the EOS ids; LLMEngine reuses it
        self.model = load_model(model_dir, config.torch_dtype, self.device)
        spec = self.model.spec
        cache, sched = config.cache, config.scheduler
        self.max_model_len = sched.max_model_len or spec.max_position_embeddings
        num_blocks = cache.num_blocks or default_num_blocks(
            self.model,
            cache.block_size,
            config.torch_dtype,
            self.device,
            cache.kv_cache_memory_fraction,
            cache.kv_cache_memory_bytes,
        )
        if self.max_model_len > num_blocks * cache.block_size:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit in the KV cache ({num_blocks} blocks of "
                f"{cache.block_size} tokens): lower max_model_len or give the cache more blocks"
            )
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.adapters = AdapterManager(self.model, config.adapters)
        self.scheduler = Scheduler(sched, self.kv, self.adapters, self.max_model_len)
        self.runner = ModelRunner(
            self.model,
            num_blocks,
            cache.block_size,
            config.torch_dtype,
            self.device,
            Sampler(config.seed),
            cuda_graphs=self.device.type == "cuda" and not config.enforce_eager,
            max_num_seqs=sched.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        self.structured: StructuredOutputManager | None = None  # made by the first request with a grammar
        logger.info(
            "engine core ready: %s, %d KV blocks of %d tokens, max_model_len %d",
            spec.model_type,
            num_blocks,
            cache.block_size,
            self.max_model_len,
        )

    def register_adapters(self, adapters: Iterable[tuple[str, str, str | None]]) -> dict[str, str]:
        """Registers the adapters the core starts with, (name, path, digest) each; returns name -> why, per one dropped.

        Without a digest (the adapters named at start) a bad adapter raises; with one (a restart re-registering what
        was served) an adapter whose files changed since is dropped, not served under that name.
        """
        dropped: dict[str, str] = {}
        for name, path, digest in adapters:
            try:
                self.adapters.register(name, path, expected_digest=digest)
            except AdapterError as exc:
                if digest is None:
                    raise
                dropped[name] = str(exc)
        return dropped

    def compile_grammar(self, request: EngineCoreRequest) -> Any:
        """The request's grammar matcher (None without structured outputs); ValueError for a bad grammar. Safe to
        call off the stepping thread: the core process compiles on its input thread, so a first schema never stalls
        a step."""
        spec = request.params.structured_outputs
        return self._structured().matcher(spec) if spec is not None else None

    def add_request(self, request: EngineCoreRequest, grammar: Any = None) -> None:
        """Queues the request (with its grammar matcher, if compile_grammar already made it); UnknownAdapterError if
        its adapter is not registered."""
        if request.request_id in self.scheduler.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if grammar is None:
            grammar = self.compile_grammar(request)
        ref = self.adapters.acquire(request.adapter) if request.adapter is not None else None
        seq = Sequence(
            request.request_id,
            request.prompt_token_ids,
            request.params,
            eos_token_ids=self.eos_token_ids,
            adapter=request.adapter,
            adapter_ref=ref,
            arrival_time=request.arrival_time,
            grammar=grammar,
        )
        self.scheduler.add(seq)

    def _structured(self) -> StructuredOutputManager:
        if self.structured is None:
            self.structured = StructuredOutputManager(self.tokenizer, self.model.spec.vocab_size, self.eos_token_ids)
            self.runner.sampler.structured = self.structured
        return self.structured

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        """One step's outputs, with the requests that failed in it: a request whose adapter cannot be placed fails
        alone; a step that fails as a whole (the model or the sampler raised) fails the requests it scheduled, and
        the core goes on serving the rest."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return self.scheduler.take_failed()
        try:
            result = self.runner.execute(batch)
        except Exception as exc:
            logger.exception("a step of %d requests failed; failing them", len(batch.scheduled))
            error = StepFailedError(f"the engine step running this request failed: {type(exc).__name__}: {exc}")
            for item in batch.scheduled:
                self.scheduler.fail(item.seq, error)
            return self.scheduler.take_failed()
        return self.scheduler.take_failed() + self.scheduler.update_from_output(batch, result)

    def stats(self) -> SchedulerStats:
        sched, manager = self.scheduler, self.adapters
        return SchedulerStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=self.kv.pool.usage,
            running_adapters=sorted({s.adapter for s in sched.running if s.adapter}),
            waiting_adapters=sorted({s.adapter for s in sched.waiting if s.adapter}),
            max_adapter_slots=manager.max_slots,
            resident_adapters=len(manager.resident()),
            adapter_loads=manager.stats.loads,
            adapter_evictions=manager.stats.evictions,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_preemptions=sched.num_preemptions,
        )

"""The engine loop: schedule -> run the model -> sample -> postprocess (stop checks, text, freeing blocks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from moeserve.adapters.manager import AdapterManager
from moeserve.engine.config import EngineConfig
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.kv_cache import default_num_blocks
from moeserve.engine.kv_cache_manager import KVCacheManager
from moeserve.engine.model_runner import ModelRunner
from moeserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from moeserve.engine.sampler import Sampler
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence
from moeserve.models import load_model

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    index: int  # completion index within the user's prompt (n > 1)


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


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory: it has no config.json")
        self.device = torch.device(config.device)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
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
        self.scheduler = Scheduler(sched, self.kv, self.adapters)
        self.runner = ModelRunner(self.model, num_blocks, cache.block_size, config.torch_dtype, self.device)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        self.requests: dict[str, _Request] = {}
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens, max_model_len %d",
            spec.model_type,
            num_blocks,
            cache.block_size,
            self.max_model_len,
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
        index: int = 0,
    ) -> None:
        """Queues one sequence; `params.n` is the caller's to fan out (see LLM.generate)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.spec.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate"
            )
        ref = self.adapters.acquire(adapter) if adapter is not None else None  # UnknownAdapterError if unknown
        seq = Sequence(
            request_id, token_ids, params, eos_token_ids=self.eos_token_ids, adapter=adapter, adapter_ref=ref
        )
        detok = IncrementalDetokenizer(
            self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
        )
        self.requests[request_id] = _Request(seq, text, detok, index)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Ends the request now and frees its KV blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._finish(request.seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if seq.adapter_ref is not None:
            self.adapters.release(seq.adapter_ref)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        logits, seqs = self.runner.execute(batch)
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(item.seq)
        sampled = self.sampler(logits, seqs)
        outputs = []
        for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs):
            seq.append_token(token)
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            outputs.append(self._postprocess(self.requests[seq.request_id], token))
        return outputs

    def _postprocess(self, request: _Request, token: int) -> RequestOutput:
        seq, params = request.seq, request.seq.params
        reason: str | None = None
        if token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif not params.ignore_eos and token in seq.eos_token_ids:
            reason = "stop"
        output_ids = seq.output_token_ids
        text_ids = output_ids[:-1] if reason and not params.include_stop_str_in_output else output_ids
        if reason is None and (
            (params.max_tokens is not None and len(output_ids) >= params.max_tokens)
            or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        new_text, stop_str = request.detokenizer.update(text_ids, finished=reason is not None)
        if stop_str is not None:
            reason, seq.stop_reason = "stop", stop_str
        if reason is not None:
            self._finish(seq, reason)
            del self.requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            prompt=request.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=request.index,
                    text=request.detokenizer.text,
                    token_ids=list(output_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                )
            ],
            finished=seq.is_finished,
            new_text=new_text,
            new_token_ids=[token],
            num_cached_tokens=seq.num_prefix_cached_tokens,
            metrics=RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time),
        )

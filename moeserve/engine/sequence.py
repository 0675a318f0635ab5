"""One sequence being generated: its tokens, how much of it the KV cache holds, and how it ended."""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from moeserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprobs:
    """Log-probability of a sampled token and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, most likely first
    rank: int | None = None  # of token_id in the distribution (1: the most likely); set for prompt logprobs


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    adapter: str | None = None  # None: the base model
    adapter_ref: Hashable | None = None  # the adapter version this request pinned (its prefix-cache key too)
    adapter_slot: int = 0  # device slot of that version while running; 0: the base model
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0  # leading tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    # Prefix-cache hashes of the leading full blocks, each from the one before (see kv_cache_manager). They depend
    # only on the tokens and the adapter, so they stay valid when the sequence is preempted and its blocks freed.
    block_hashes: list[Hashable] = field(default_factory=list)
    num_prefix_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    grammar: Any = None  # the structured-output matcher (moeserve.engine.structured_output), advanced per token
    seen_ids: Any = None  # token_ids mirrored on the sampler's device (GrowingIds), made when a penalty reads them
    table_ids: Any = None  # block_table mirrored as a tensor (GrowingIds) for the runner's block tables
    # Where prompt logprobs were asked and not yet sent: one entry per prompt token (the first None), filled by the
    # prefill chunks as they run; None otherwise (and once sent).
    prompt_logprobs: list[TokenLogprobs | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must have at least one token")
        self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def adapter_key(self) -> Hashable | None:
        return self.adapter_ref if self.adapter_ref is not None else self.adapter

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

"""The inference engine: continuous batching over a paged KV cache."""

from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.engine.llm import LLM
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]

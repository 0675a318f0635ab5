"""Engine configuration: a few small dataclasses, validated once."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch

from moeserve.adapters.manager import AdapterLimits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # Number of KV blocks; None: as many as kv_cache_memory_fraction of the free device memory holds
    # (on CPU, of kv_cache_memory_bytes).
    num_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.8
    kv_cache_memory_bytes: int = 256 * 2**20  # CPU budget when num_blocks is not given
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")


@dataclass
class EngineConfig:
    model: str  # a Hugging Face model directory
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads for CPU work; None: torch's default
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps (CPU always runs eagerly)
    cache: CacheConfig | None = None
    scheduler: SchedulerConfig | None = None
    adapters: AdapterLimits | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.cache = self.cache or CacheConfig()
        self.scheduler = self.scheduler or SchedulerConfig()
        self.adapters = self.adapters or AdapterLimits()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# The flat engine options `LLM` takes as keywords and `moeserve generate/serve` as flags (--block-size for block_size):
# every field of EngineConfig and of its three sections, under the field's own name but for these two.
_SECTIONS: dict[str, type] = {"cache": CacheConfig, "scheduler": SchedulerConfig, "adapters": AdapterLimits}
_OPTION_NAMES: dict[str, str] = {"num_blocks": "num_kv_blocks", "max_slots": "max_adapters"}  # field -> option


def _engine_options() -> dict[str, tuple[str | None, str, Any]]:
    """option -> (section, or None for EngineConfig itself; field; the field's default)."""
    options: dict[str, tuple[str | None, str, Any]] = {}
    for section, cls in [(None, EngineConfig), *_SECTIONS.items()]:
        for f in fields(cls):
            if f.name == "model" or f.name in _SECTIONS:
                continue
            if f.default is MISSING:
                raise TypeError(f"engine option {f.name} needs a plain default")
            options[_OPTION_NAMES.get(f.name, f.name)] = (section, f.name, f.default)
    return options


ENGINE_OPTIONS = _engine_options()


def option_default(name: str) -> Any:
    """The default of engine option `name`: its dataclass field's, the one home of every engine default."""
    return ENGINE_OPTIONS[name][2]


def build_engine_config(model: str, **options: Any) -> EngineConfig:
    """An EngineConfig from flat options (see ENGINE_OPTIONS); an option left out keeps its field's default."""
    unknown = set(options) - set(ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown engine options {sorted(unknown)}; known: {', '.join(ENGINE_OPTIONS)}")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for option, value in options.items():
        section, field_name, _ = ENGINE_OPTIONS[option]
        (top if section is None else sections[section])[field_name] = value
    return EngineConfig(model=str(model), **top, **{name: _SECTIONS[name](**kw) for name, kw in sections.items()})

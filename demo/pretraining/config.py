"""What the built-in base models are: shape, data mixture and schedule, as small dataclasses, plus the two presets.

`BASE` is the model `moeserve demo` fine-tunes; `SMALL_TEST` is a much smaller one for CI and fast tests.
Both are shipped in the package (moeserve/builtin/data/) and reproduced by `benchmarks/pretrain_base.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.builtin import BUILTIN_MODELS
from moeserve.demo.tasks import TASKS


@dataclass(frozen=True)
class ModelShape:
    """A `qwen2_moe` model: every layer MoE, fine-grained routed experts plus one gated shared expert."""

    vocab_size: int = 2048  # BPE tokens, specials included
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention
    num_experts: int = 32  # routed experts per layer
    top_k: int = 4  # routed experts per token
    expert_size: int = 64  # intermediate size of one routed expert (fine-grained: small)
    shared_expert_size: int = 256  # intermediate size of the shared expert
    max_position_embeddings: int = 512
    router_aux_loss_coef: float = 0.01  # Switch-style load balancing, so that no expert is left unused

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {self.top_k}")


@dataclass(frozen=True)
class DataMix:
    """The pretraining data: all docstrings of pydocs.PRETRAIN_MODULES plus each task's pretraining examples."""

    examples: dict[str, int] = field(default_factory=dict)  # task name -> n for Task.pretraining_examples
    seed: int = 1  # task generation seed; the demo's adapters use seed 0, so they train on other examples
    docstring_repeats: int = 1  # copies of the docstring corpus per epoch

    def __post_init__(self) -> None:
        unknown = set(self.examples) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks in the data mix: {', '.join(sorted(unknown))}")
        if any(n < 0 for n in self.examples.values()) or self.docstring_repeats < 0:
            raise ValueError("example counts and docstring_repeats must be >= 0")


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int = 8  # packed blocks per step (measured: 8 x 1600 steps beats 16 x 700 in the same time)
    seq_len: int = 256  # tokens per packed block
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0  # model init and data order

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 16:
            raise ValueError("steps and batch_size must be >= 1 and seq_len >= 16")


@dataclass(frozen=True)
class PretrainConfig:
    name: str  # the directory name under moeserve/builtin/data/ and the cache
    model: ModelShape
    data: DataMix
    schedule: Schedule
    save_dtype: str = "bfloat16"  # halves the shipped size; scores are measured on the saved weights

    def __post_init__(self) -> None:
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")


BASE = PretrainConfig(
    name=BUILTIN_MODELS["base"],
    model=ModelShape(),
    data=DataMix(examples={"math": 12000, "intent": 1000, "translate": 1500, "general": 10000}),
    schedule=Schedule(steps=1600),
)

SMALL_TEST = PretrainConfig(
    name=BUILTIN_MODELS["small-test"],
    model=ModelShape(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        num_experts=16,
        top_k=4,
        expert_size=32,
        shared_expert_size=128,
    ),
    data=DataMix(examples={"math": 4000, "intent": 500, "translate": 800, "general": 3000}),
    schedule=Schedule(steps=800),
)

PRESETS: dict[str, PretrainConfig] = {"base": BASE, "small-test": SMALL_TEST}  # the keys of BUILTIN_MODELS

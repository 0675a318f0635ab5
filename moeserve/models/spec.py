"""What our decoder needs to know about an architecture, read once from the Hugging Face config.

Each architecture file turns its `config.json` into a `ModelSpec`; the generic decoder builds itself from the spec,
so the differences between Llama, Qwen-MoE, OLMoE, Mixtral and DeepSeek live in a few fields, not in copies of the
model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttentionSpec:
    """Multi-head attention with grouped key/value heads (Llama, Qwen, OLMoE, Mixtral)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on the output projection
    # Where q/k RMSNorm applies: none, per head (Qwen3) or over the whole projection before the head split (OLMoE).
    qk_norm: Literal["none", "head", "full"] = "none"
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-clip, clip]
    sliding_window: int | None = None  # keys older than this many positions are not attended to

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: keys and values are expanded from a compressed latent."""

    num_heads: int
    q_lora_rank: int | None  # None: q comes from one projection (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    bias: bool  # attention_bias on q_a / kv_a / o projections
    softmax_scale: float


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding over `dim` channels; `interleaved` rotates pairs (x0, x1), (x2, x3) as DeepSeek does."""

    dim: int
    interleaved: bool = False


@dataclass(frozen=True)
class DenseMLPSpec:
    intermediate_size: int
    bias: bool = False


@dataclass(frozen=True)
class RouterSpec:
    """How a MoE layer picks its top-k experts and weighs them."""

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = False  # renormalise the chosen k weights to sum to one
    # Group-limited routing (DeepSeek): experts split into n_group groups, only topk_group groups are eligible.
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias, used for choice only

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec
    intermediate_size: int  # per routed expert
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x W) scales the shared expert's output
    shared_bias: bool = False  # bias on the shared expert's projections (DeepSeek-V2's mlp_bias)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope: RopeSpec
    attention: AttentionSpec | MLASpec
    mlps: tuple[DenseMLPSpec | MoESpec, ...]  # one per decoder layer
    max_position_embeddings: int

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, mlp in enumerate(self.mlps) if isinstance(mlp, MoESpec)]

"""The supported architectures: each reads its Hugging Face config into a `ModelSpec` for the shared decoder."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.spec import (
    AttentionSpec,
    DenseMLPSpec,
    MLASpec,
    ModelSpec,
    MoESpec,
    RopeSpec,
    RouterSpec,
)


def _head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gqa(config: PreTrainedConfig, qkv_bias: bool, o_bias: bool, **kwargs) -> AttentionSpec:
    """Grouped-query attention with the config's head counts and head dim (kwargs: qk_norm, clip, window)."""
    return AttentionSpec(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=_head_dim(config),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        **kwargs,
    )


def _spec(config: PreTrainedConfig, attention, mlps, rope: RopeSpec) -> ModelSpec:
    return ModelSpec(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act=config.hidden_act,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope=rope,
        attention=attention,
        mlps=tuple(mlps),
        max_position_embeddings=config.max_position_embeddings,
    )


def _softmax_router(config: PreTrainedConfig, num_experts: int, norm_topk_prob: bool) -> RouterSpec:
    return RouterSpec(num_experts=num_experts, top_k=config.num_experts_per_tok, norm_topk_prob=norm_topk_prob)


def _qwen_sparse_layers(config: PreTrainedConfig) -> list[bool]:
    """Qwen-MoE's rule for which layers are sparse: not in mlp_only_layers, and every decoder_sparse_step-th."""
    only_dense = set(config.mlp_only_layers or [])
    return [
        i not in only_dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        for i in range(config.num_hidden_layers)
    ]


class LlamaForCausalLM(DecoderForCausalLM):
    model_types = ("llama",)

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        attention = _gqa(config, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        mlp = DenseMLPSpec(config.intermediate_size, bias=config.mlp_bias)
        return _spec(config, attention, [mlp] * config.num_hidden_layers, RopeSpec(attention.head_dim))


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    model_types = ("qwen2_moe",)
    checkpoint_renames = ((r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),)

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise ValueError("qwen2_moe with use_sliding_window=True is not supported")
        attention = _gqa(config, qkv_bias=config.qkv_bias, o_bias=False)
        moe = MoESpec(
            router=_softmax_router(config, config.num_experts, config.norm_topk_prob),
            intermediate_size=config.moe_intermediate_size,
            shared_intermediate_size=config.shared_expert_intermediate_size,
            shared_expert_gate=True,
        )
        dense = DenseMLPSpec(config.intermediate_size)
        mlps = [moe if sparse else dense for sparse in _qwen_sparse_layers(config)]
        return _spec(config, attention, mlps, RopeSpec(attention.head_dim))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    model_types = ("qwen3_moe",)

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        attention = _gqa(
            config,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm="head",
            sliding_window=config.sliding_window,
        )
        moe = MoESpec(
            router=_softmax_router(config, config.num_experts, config.norm_topk_prob),
            intermediate_size=config.moe_intermediate_size,
        )
        dense = DenseMLPSpec(config.intermediate_size)
        mlps = [moe if sparse else dense for sparse in _qwen_sparse_layers(config)]
        return _spec(config, attention, mlps, RopeSpec(attention.head_dim))


class OlmoeForCausalLM(DecoderForCausalLM):
    model_types = ("olmoe",)

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        attention = _gqa(
            config,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm="full",
            clip_qkv=config.clip_qkv,
        )
        moe = MoESpec(
            router=_softmax_router(config, config.num_experts, config.norm_topk_prob),
            intermediate_size=config.intermediate_size,
        )
        return _spec(config, attention, [moe] * config.num_hidden_layers, RopeSpec(attention.head_dim))


class MixtralForCausalLM(DecoderForCausalLM):
    model_types = ("mixtral",)
    # Original Mixtral checkpoints: block_sparse_moe with w1 (gate), w3 (up), w2 (down) per expert.
    checkpoint_renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"(\.mlp\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
        (r"(\.mlp\.experts\.\d+)\.w3\.", r"\1.up_proj."),
        (r"(\.mlp\.experts\.\d+)\.w2\.", r"\1.down_proj."),
    )

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        attention = _gqa(config, qkv_bias=False, o_bias=False, sliding_window=config.sliding_window)
        moe = MoESpec(
            router=_softmax_router(config, config.num_local_experts, norm_topk_prob=True),
            intermediate_size=config.intermediate_size,
        )
        return _spec(config, attention, [moe] * config.num_hidden_layers, RopeSpec(attention.head_dim))


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class DeepseekForCausalLM(DecoderForCausalLM):
    """DeepSeek-V2 and V3: MLA attention, dense first layers, shared experts, group-limited routing."""

    model_types = ("deepseek_v2", "deepseek_v3")

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        v3 = config.model_type == "deepseek_v3"
        qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        softmax_scale = qk_head_dim**-0.5
        rope_params = config.rope_parameters or {}
        if rope_params.get("rope_type", "default") != "default" and rope_params.get("mscale_all_dim"):
            softmax_scale *= _yarn_mscale(rope_params["factor"], rope_params["mscale_all_dim"]) ** 2
        attention = MLASpec(
            num_heads=config.num_attention_heads,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim,
            bias=config.attention_bias,
            softmax_scale=softmax_scale,
        )
        if v3:
            router = RouterSpec(
                num_experts=config.n_routed_experts,
                top_k=config.num_experts_per_tok,
                scoring="sigmoid",
                norm_topk_prob=config.norm_topk_prob,
                n_group=config.n_group,
                topk_group=config.topk_group,
                group_score="top2_sum",
                routed_scaling_factor=config.routed_scaling_factor,
                correction_bias=True,
            )
        else:
            # V2 never renormalises (transformers ignores norm_topk_prob there) and groups only when asked.
            grouped = config.topk_method == "group_limited_greedy"
            router = RouterSpec(
                num_experts=config.n_routed_experts,
                top_k=config.num_experts_per_tok,
                n_group=config.n_group if grouped else 1,
                topk_group=config.topk_group if grouped else 1,
                routed_scaling_factor=config.routed_scaling_factor,
            )
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        moe = MoESpec(
            router=router,
            intermediate_size=config.moe_intermediate_size,
            shared_intermediate_size=config.moe_intermediate_size * (config.n_shared_experts or 0),
            shared_bias=mlp_bias,
        )
        dense = DenseMLPSpec(config.intermediate_size, bias=mlp_bias)
        mlps = [dense if i < config.first_k_dense_replace else moe for i in range(config.num_hidden_layers)]
        rope = RopeSpec(config.qk_rope_head_dim, interleaved=bool(getattr(config, "rope_interleave", True)) or not v3)
        return _spec(config, attention, mlps, rope)

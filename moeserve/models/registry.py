"""From `config.model_type` to our implementation."""

from __future__ import annotations

from transformers import PreTrainedConfig

from moeserve.models.architectures import (
    DeepseekForCausalLM,
    LlamaForCausalLM,
    MixtralForCausalLM,
    OlmoeForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
)
from moeserve.models.decoder import DecoderForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    model_type: cls
    for cls in (
        LlamaForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
        OlmoeForCausalLM,
        MixtralForCausalLM,
        DeepseekForCausalLM,
    )
    for model_type in cls.model_types
}


class UnsupportedModelError(ValueError):
    pass


def model_class_for(config: PreTrainedConfig) -> type[DecoderForCausalLM]:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[model_type]

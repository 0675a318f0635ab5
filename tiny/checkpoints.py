"""Tiny random Hugging Face checkpoints for parity tests against `transformers`.

Each architecture gets a config small enough to run on CPU in milliseconds but
shaped to exercise every feature our own implementation must reproduce (GQA,
attention biases, shared experts, dense layers between MoE layers, MLA, group
limited routing, tied embeddings...). Weights are deliberately *not* the
transformers defaults: norms are ``1 + noise`` so an ignored norm weight shows up,
routers are sharp so different tokens choose different experts, and scales
keep logits spread out without saturating.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig, PreTrainedModel

from moeserve.tiny.tokenizer import BOS, ENDOFTEXT, IM_END, SPECIAL_TOKENS, build_tokenizer

logger = logging.getLogger(__name__)

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3")

_ROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_parameters": _ROPE,
    "tie_word_embeddings": False,
}

_MLA: dict[str, Any] = {
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "intermediate_size": 96,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
    "n_group": 4,
    "topk_group": 2,
}

_ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "attention_bias": True,
        "mlp_bias": False,
    },
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "qkv_bias": True,
        "norm_topk_prob": False,
        "use_sliding_window": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "qwen3_moe": {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "use_sliding_window": False,
        "decoder_sparse_step": 1,
    },
    "olmoe": {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    "mixtral": {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
        "tie_word_embeddings": True,
    },
    "deepseek_v2": {
        **_MLA,
        "q_lora_rank": None,
        "topk_method": "group_limited_greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
    },
    "deepseek_v3": {
        **_MLA,
        "q_lora_rank": 24,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
    },
}

# Init scales, picked so logits have std ~1-5 and routing is decisive.
_LINEAR_STD = 0.15
_EMBED_STD = 0.3
_BIAS_STD = 0.1
_NORM_NOISE_STD = 0.1
_ROUTER_STD = 0.5
_SCORE_BIAS_STD = 0.05


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unsupported tiny arch {arch!r}; supported: {', '.join(TINY_ARCHS)}")


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    bos_token_id: int = SPECIAL_TOKENS.index(BOS),
    eos_token_id: int = SPECIAL_TOKENS.index(ENDOFTEXT),
    pad_token_id: int = SPECIAL_TOKENS.index(ENDOFTEXT),
) -> PreTrainedConfig:
    """Return the tiny fp32 config for ``arch`` with the given vocabulary size.

    Token ids default to those of `build_tokenizer` (specials come first) so that
    the arch defaults, which point outside a tiny vocabulary, never reach validation.
    """
    _check_arch(arch)
    kwargs = {
        **_COMMON,
        **_ARCH_OVERRIDES[arch],
        "vocab_size": vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    config = AutoConfig.for_model(arch, **kwargs)
    config.dtype = torch.float32
    return config


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _is_router(module_name: str) -> bool:
    return module_name.endswith("mlp.gate")


def _init_value(
    module_name: str, module: nn.Module, tensor_name: str, shape: torch.Size, gen: torch.Generator
) -> torch.Tensor:
    """Draw the replacement value for one parameter or persistent buffer."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if _is_norm(module):
        return 1.0 + _NORM_NOISE_STD * noise if tensor_name == "weight" else _BIAS_STD * noise
    if _is_router(module_name):
        if tensor_name == "e_score_correction_bias":
            return _SCORE_BIAS_STD * noise
        return _ROUTER_STD * noise
    if isinstance(module, nn.Embedding) or module_name == "lm_head":
        return _EMBED_STD * noise
    if tensor_name == "bias":
        return _BIAS_STD * noise
    return _LINEAR_STD * noise


@torch.no_grad()
def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every floating parameter and persistent buffer, deterministically in ``seed``.

    Non-persistent buffers (rotary ``inv_freq``) are derived from the config and
    never saved, so they are left alone. Tied tensors are initialised once.
    """
    gen = torch.Generator().manual_seed(seed)
    persistent = set(model.state_dict().keys())
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for tensor_name, tensor in tensors:
            full_name = f"{module_name}.{tensor_name}" if module_name else tensor_name
            if id(tensor) in seen or not tensor.is_floating_point() or full_name not in persistent:
                continue
            seen.add(id(tensor))
            tensor.copy_(_init_value(module_name, module, tensor_name, tensor.shape, gen))


@torch.no_grad()
def _cast(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast floating tensors to ``dtype``, keeping the ones transformers pins to fp32.

    `from_config(dtype=...)` ignores ``_keep_in_fp32_modules_strict``, but real
    DeepSeek-V3 checkpoints store ``e_score_correction_bias`` in fp32 and
    `from_pretrained` keeps it there, so the tiny checkpoint must too.
    """
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name for k in keep):
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype


def make_tiny(arch: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random checkpoint (tokenizer, config, weights, generation config) to ``out_dir``.

    Values are drawn in fp32 and then cast, so the same seed gives the same
    weights (up to rounding) whatever ``dtype`` is. transformers 5 fuses experts
    in memory but saves them per expert in each arch's original layout, e.g.
    ``mlp.experts.3.gate_proj.weight`` (Mixtral: ``block_sparse_moe.experts.3.w1.weight``).
    """
    _check_arch(arch)
    out = Path(out_dir)
    tokenizer = build_tokenizer(out)
    config = tiny_config(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    _cast(model, dtype)
    model.eval()

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END]),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    logger.info("wrote tiny %s checkpoint (seed %d, %s) to %s", arch, seed, dtype, out)
    return out

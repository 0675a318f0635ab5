"""The decoder-only transformer every supported architecture instantiates from its `ModelSpec`.

Parameter names follow the Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, the fused expert
tables `mlp.experts.gate_up_proj`), so loading is a rename table away from the files on disk.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedConfig

from moeserve.models.attention import Attention
from moeserve.models.linear import Linear
from moeserve.models.mla import MLAttention
from moeserve.models.mlp import GatedMLP
from moeserve.models.moe import SparseMoeBlock
from moeserve.models.norm import RMSNorm
from moeserve.models.rotary_embedding import RotaryEmbedding
from moeserve.models.spec import AttentionSpec, DenseMLPSpec, ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        attn, mlp = spec.attention, spec.mlps[layer]
        if isinstance(attn, AttentionSpec):
            self.self_attn: nn.Module = Attention(attn, spec.hidden_size, spec.rms_norm_eps, rotary)
        else:
            self.self_attn = MLAttention(attn, spec.hidden_size, spec.rms_norm_eps, rotary)
        if isinstance(mlp, DenseMLPSpec):
            self.mlp: nn.Module = GatedMLP(spec.hidden_size, mlp.intermediate_size, spec.hidden_act, mlp.bias)
        else:
            self.mlp = SparseMoeBlock(mlp, spec.hidden_size, spec.hidden_act)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(spec, i, rotary) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary.cos_sin(positions)  # [T, rope] each: (cos, cos), (-sin, sin)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class DecoderForCausalLM(nn.Module):
    """Base of every architecture: subclasses set `model_types` and turn the HF config into a spec."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # (pattern, replacement) applied in order to checkpoint keys before they are matched to our parameters.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = self.spec_from_config(config)
        rotary = RotaryEmbedding(config, self.spec.rope)
        self.model = DecoderModel(self.spec, rotary)
        self.lm_head = Linear(self.spec.hidden_size, self.spec.vocab_size, bias=False)
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def spec_from_config(cls, config: PreTrainedConfig) -> ModelSpec:
        raise NotImplementedError(f"{cls.__name__} must define spec_from_config")

    @classmethod
    def checkpoint_key(cls, key: str) -> str:
        """The name of our parameter that a checkpoint key (or a part of it, for per-expert keys) fills."""
        for pattern, replacement in cls.checkpoint_renames:
            key = re.sub(pattern, replacement, key)
        return key

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, H] for input_ids [T] at positions [T]; batch layout in the forward context."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] for the hidden states [n, H] the caller selected (usually each sequence's last token)."""
        return self.lm_head(hidden)

"""Rotary position embedding over flat token positions.

The inverse frequencies come from transformers' own RoPE initialisers (default, linear, dynamic, yarn, llama3,
longrope), so every scaling scheme a checkpoint declares is computed the way transformers computes it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moeserve.kernels.rope import rope
from moeserve.models.spec import RopeSpec


def _default_inv_freq(config: PreTrainedConfig, dim: int) -> torch.Tensor:
    base = float(config.rope_parameters["rope_theta"])
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [dim/2]


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PreTrainedConfig, spec: RopeSpec) -> None:
        super().__init__()
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, self.attention_scaling = _default_inv_freq(config, spec.dim), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        if inv_freq.numel() * 2 != spec.dim:
            raise ValueError(f"RoPE gives {inv_freq.numel() * 2} rotary channels, the attention expects {spec.dim}")
        self.interleaved = spec.interleaved
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [dim/2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, dim] for positions [T], in float32, laid out for `forward`'s halves:
        cos = (cos, cos), sin = (-sin, sin). Made once per step, shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, dim/2]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [T, heads, dim]. Half-split (x[:d/2], x[d/2:]) pairs, or interleaved (x[0::2], x[1::2]) pairs.

        With (x1, x2) the pairs' halves: (x1 cos - x2 sin, x2 cos + x1 sin) = x * (cos, cos) + (x2, x1) * (-sin, sin),
        four operations. The interleaved output keeps the pairs split in halves: attention scores only need q and k
        permuted alike.
        """
        if self.interleaved:  # (x1, x2) = (x[0::2], x[1::2])
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return rope(x, cos, sin)  # native on CPU float32, else the four ops

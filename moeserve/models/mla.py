"""DeepSeek's multi-head latent attention (MLA).

The cache holds the compressed latent (normalised kv latent + the rotated shared key part), not per-head keys and
values: [N, S, 1, kv_lora_rank + qk_rope_head_dim]. Keys and values are expanded from it with kv_b_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.forward_context import get_forward_context
from moeserve.kernels.attention import gather_kv, store_kv, varlen_attention_torch
from moeserve.models.norm import RMSNorm
from moeserve.models.rotary import RotaryEmbedding
from moeserve.models.spec import MLASpec


class MLAttention(nn.Module):
    def __init__(self, spec: MLASpec, hidden_size: int, rms_norm_eps: float, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        qk_head_dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, spec.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, spec.q_lora_rank, bias=spec.bias)
            # DeepSeek's inner norms keep the default eps (1e-6) whatever rms_norm_eps says, as transformers does.
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, spec.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, spec.kv_lora_rank + spec.qk_rope_head_dim, bias=spec.bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            spec.kv_lora_rank, spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(spec.num_heads * spec.v_head_dim, hidden_size, bias=spec.bias)
        self.rotary = rotary
        # The paged latent cache of this layer, [N, S, 1, kv_lora_rank + qk_rope_head_dim]; set by the runner.
        self.kv_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        spec, ctx = self.spec, get_forward_context()
        num_tokens, heads = x.shape[0], spec.num_heads
        if spec.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, heads, -1)  # [T, Hq, nope + rope]
        q_nope, q_rope = q.split([spec.qk_nope_head_dim, spec.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, kv_lora_rank]
        q_rope = self.rotary(q_rope, cos, sin)
        k_rope = self.rotary(k_rope[:, None, :], cos, sin)  # [T, 1, rope]
        cached = torch.cat((latent[:, None, :], k_rope), dim=-1)  # [T, 1, kv_lora_rank + rope]
        if ctx.uses_cache:
            if self.kv_cache is None:
                raise RuntimeError("the forward context addresses a KV cache but none is allocated for this layer")
            store_kv(self.kv_cache, cached, ctx.slot_mapping)
            cached = gather_kv(self.kv_cache, ctx.block_tables, ctx.kv_lens)  # [L, 1, kv_lora_rank + rope]
        kv_len = cached.shape[0]
        latent, k_rope = cached[:, 0].split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(kv_len, heads, -1)  # [L, Hq, nope + v]
        k_nope, v = kv.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None, :].expand(kv_len, heads, -1)), dim=-1)  # [L, Hq, nope + rope]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [T, Hq, nope + rope]
        out = varlen_attention_torch(q, k, v, ctx.query_lens, ctx.kv_lens, spec.softmax_scale)  # [T, Hq, v]
        return self.o_proj(out.reshape(num_tokens, -1))

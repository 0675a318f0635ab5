"""Grouped-query self-attention over the packed batch, reading and writing the paged KV cache when one is set."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.forward_context import get_forward_context
from moeserve.kernels.attention import gather_kv, store_kv, varlen_attention_torch
from moeserve.kernels.paged_attention import paged_decode_attention
from moeserve.models.norm import RMSNorm
from moeserve.models.rotary import RotaryEmbedding
from moeserve.models.spec import AttentionSpec


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, hidden_size: int, rms_norm_eps: float, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(hidden_size, q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden_size, bias=spec.o_bias)
        if spec.qk_norm == "head":
            self.q_norm = RMSNorm(spec.head_dim, rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, rms_norm_eps)
        self.rotary = rotary
        self.scale = spec.head_dim**-0.5
        # The paged cache of this layer, [N, S, Hkv, D] each; allocated and set by the model runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        spec, ctx = self.spec, get_forward_context()
        num_tokens = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
        if spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if ctx.uses_cache:
            if self.k_cache is None or self.v_cache is None:
                raise RuntimeError("the forward context addresses a KV cache but none is allocated for this layer")
            store_kv(self.k_cache, k, ctx.slot_mapping)
            store_kv(self.v_cache, v, ctx.slot_mapping)
            if ctx.is_decode:  # one query per sequence: read the cache in place (the Triton kernel on CUDA)
                out = paged_decode_attention(
                    q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale, spec.sliding_window
                )
                return self.o_proj(out.reshape(num_tokens, -1))
            k = gather_kv(self.k_cache, ctx.block_tables, ctx.kv_lens)
            v = gather_kv(self.v_cache, ctx.block_tables, ctx.kv_lens)
        out = varlen_attention_torch(q, k, v, ctx.query_lens, ctx.kv_lens, self.scale, spec.sliding_window)
        return self.o_proj(out.reshape(num_tokens, -1))

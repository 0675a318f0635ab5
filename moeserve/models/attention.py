"""Grouped-query self-attention over the packed batch, reading and writing the paged KV cache when one is set."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.forward_context import ForwardContext, get_forward_context
from moeserve.kernels.paged_decode_attention import paged_decode_attention
from moeserve.kernels.varlen_attention import store_kv, varlen_attention_torch
from moeserve.models.linear import Linear
from moeserve.models.norm import RMSNorm
from moeserve.models.rotary_embedding import RotaryEmbedding
from moeserve.models.spec import AttentionSpec


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, hidden_size: int, rms_norm_eps: float, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = Linear(hidden_size, q_dim, bias=spec.qkv_bias)
        self.k_proj = Linear(hidden_size, kv_dim, bias=spec.qkv_bias)
        self.v_proj = Linear(hidden_size, kv_dim, bias=spec.qkv_bias)
        self.o_proj = Linear(q_dim, hidden_size, bias=spec.o_bias)
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
        if not ctx.uses_cache:  # whole sequences (prefill-only, tests, training): attention over this step's keys
            out = varlen_attention_torch(q, k, v, ctx.query_lens, ctx.kv_lens, self.scale, spec.sliding_window)
            return self.o_proj(out.reshape(num_tokens, -1))
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("the forward context addresses a KV cache but none is allocated for this layer")
        store_kv(self.k_cache, k, ctx.slot_mapping)
        store_kv(self.v_cache, v, ctx.slot_mapping)
        return self.o_proj(self._cached_attention(q, ctx).reshape(num_tokens, -1))

    def _cached_attention(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention of this step's queries q [T, Hq, D] over the cache (this step's keys already stored in it).

        The decode rows (x[:num_decodes], one query each) read the cache in place; the prefill rows gather only
        their own sequences' keys and values. Returns [T, Hq, D].
        """
        window, nd = self.spec.sliding_window, ctx.num_decodes
        parts = []
        if nd:
            parts.append(
                paged_decode_attention(
                    q[:nd], self.k_cache, self.v_cache, ctx.decode_block_tables, ctx.decode_context_lens,
                    self.scale, window, ctx.decode_max_context_len,
                )
            )  # fmt: skip
        if nd < ctx.num_seqs:
            slots = ctx.prefill_kv_slots(self.k_cache.shape[1])
            k = self.k_cache.flatten(0, 1)[slots]  # [Lp, Hkv, D]
            v = self.v_cache.flatten(0, 1)[slots]  # [Lp, Hkv, D]
            parts.append(
                varlen_attention_torch(q[nd:], k, v, ctx.prefill_query_lens, ctx.prefill_kv_lens, self.scale, window)
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

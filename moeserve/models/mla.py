"""DeepSeek's multi-head latent attention (MLA).

The cache holds the compressed latent (normalised kv latent + the rotated shared key part), not per-head keys and
values: [N, S, 1, kv_lora_rank + qk_rope_head_dim]. Prefill rows expand keys and values from it with kv_b_proj;
decode rows attend to the latent directly (the absorbed form, see MLAttention._decode_attention).
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.forward_context import ForwardContext, adapter_rows, forward_context, get_forward_context
from moeserve.kernels.paged_decode_attention import paged_decode_attention
from moeserve.kernels.varlen_attention import kv_slots, store_kv, varlen_attention_torch
from moeserve.models.linear import Linear
from moeserve.models.norm import RMSNorm
from moeserve.models.rotary_embedding import RotaryEmbedding
from moeserve.models.spec import MLASpec


class MLAttention(nn.Module):
    def __init__(self, spec: MLASpec, hidden_size: int, rms_norm_eps: float, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.spec = spec
        qk_head_dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = Linear(hidden_size, spec.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden_size, spec.q_lora_rank, bias=spec.bias)
            # DeepSeek's inner norms keep the default eps (1e-6) whatever rms_norm_eps says, as transformers does.
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank)
            self.q_b_proj = Linear(spec.q_lora_rank, spec.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden_size, spec.kv_lora_rank + spec.qk_rope_head_dim, bias=spec.bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank)
        self.kv_b_proj = Linear(
            spec.kv_lora_rank, spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), bias=False
        )
        self.o_proj = Linear(spec.num_heads * spec.v_head_dim, hidden_size, bias=spec.bias)
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
        if not ctx.uses_cache:  # whole sequences (prefill-only, tests, training): this step's latents are all
            out = self._expanded_attention(q_nope, q_rope, cached, ctx.query_lens, ctx.kv_lens, None)
            return self.o_proj(out.reshape(num_tokens, -1))
        if self.kv_cache is None:
            raise RuntimeError("the forward context addresses a KV cache but none is allocated for this layer")
        store_kv(self.kv_cache, cached, ctx.slot_mapping)
        nd, parts = ctx.num_decodes, []
        if nd:
            parts.append(self._decode_attention(q_nope[:nd], q_rope[:nd], ctx))
        if nd < ctx.num_seqs:
            cached = self.kv_cache.flatten(0, 1)[ctx.prefill_kv_slots(self.kv_cache.shape[1])]  # [Lp, 1, R + rope]
            slot = None if ctx.adapter_slot is None else _kv_adapter_slots(ctx, nd)
            parts.append(
                self._expanded_attention(
                    q_nope[nd:], q_rope[nd:], cached, ctx.prefill_query_lens, ctx.prefill_kv_lens, slot
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, Hq, v]
        return self.o_proj(out.reshape(num_tokens, -1))

    def _expanded_attention(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        cached: torch.Tensor,
        query_lens: list[int],
        kv_lens: list[int],
        adapter_rows: tuple[torch.Tensor, dict] | None,
    ) -> torch.Tensor:
        """Per-head keys and values expanded from the latents, then causal attention: q_nope [Tq, Hq, nope],
        q_rope [Tq, Hq, rope], cached [L, 1, R + rope] (the sequences' latents packed back to back), adapter_rows
        the adapter of each latent's sequence for kv_b_proj (_kv_adapter_slots), or None to keep the context's (the
        latents are this step's tokens, or no token has an adapter). Returns [Tq, Hq, v].
        """
        spec, heads, kv_len = self.spec, self.spec.num_heads, cached.shape[0]
        latent, k_rope = cached[:, 0].split([spec.kv_lora_rank, spec.qk_rope_head_dim], dim=-1)
        kv = self._kv_b_proj(latent, adapter_rows).view(kv_len, heads, -1)  # [L, Hq, nope + v]
        k_nope, v = kv.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope[:, None, :].expand(kv_len, heads, -1)), dim=-1)  # [L, Hq, nope + rope]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [Tq, Hq, nope + rope]
        return varlen_attention_torch(q, k, v, query_lens, kv_lens, spec.softmax_scale)

    def _kv_b_proj(self, latent: torch.Tensor, rows: tuple[torch.Tensor, dict] | None) -> torch.Tensor:
        """kv_b_proj of latents that are not this step's tokens: an adapter-wrapped layer reads each row's adapter
        from the forward context, so it runs under one whose adapter_slot (and groups: `rows`, from
        `_kv_adapter_rows`) names the adapter of every latent."""
        if isinstance(self.kv_b_proj, nn.Linear) or rows is None:
            return self.kv_b_proj(latent)
        ctx = ForwardContext.for_sequences([latent.shape[0]], latent.device)
        ctx.adapter_slot, ctx.adapter_groups = rows
        with forward_context(ctx):
            return self.kv_b_proj(latent)

    def _decode_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The decode rows (one query each, q_nope [Bd, Hq, nope], q_rope [Bd, Hq, rope]) read the latent cache in
        place, in the absorbed form: kv_b_proj's key half folds into the query, so scores are taken against the
        latent itself, k_nope . q_nope = latent . (W_uk^T q_nope), and its value half is applied once to the
        attention-weighted latent. The cache is then one key/value head shared by all query heads. Returns
        [Bd, Hq, v].
        """
        spec = self.spec
        if not isinstance(self.kv_b_proj, nn.Linear) and ctx.adapter_slot is not None:  # a delta does not fold
            latent = self.kv_cache.flatten(0, 1)[_decode_kv_slots(ctx, self.kv_cache.shape[1])]
            slot = _kv_adapter_slots(ctx, 0, ctx.num_decodes)
            return self._expanded_attention(
                q_nope, q_rope, latent, [1] * ctx.num_decodes, ctx.kv_lens[: ctx.num_decodes], slot
            )
        weight = self.kv_b_proj.weight.view(spec.num_heads, -1, spec.kv_lora_rank)  # [Hq, nope + v, R]
        w_uk, w_uv = weight.split([spec.qk_nope_head_dim, spec.v_head_dim], dim=1)  # [Hq, nope, R], [Hq, v, R]
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)  # [Bd, Hq, R]
        q = torch.cat((q_latent, q_rope), dim=-1)  # [Bd, Hq, R + rope]
        cache = self.kv_cache  # [N, S, 1, R + rope]; the values are its latent part, a view
        out = paged_decode_attention(
            q, cache, cache[..., : spec.kv_lora_rank], ctx.decode_block_tables, ctx.decode_context_lens,
            spec.softmax_scale, None, ctx.decode_max_context_len,
        )  # fmt: skip  # [Bd, Hq, R]
        return torch.einsum("bhr,hvr->bhv", out, w_uv)  # [Bd, Hq, v]


def _decode_kv_slots(ctx: ForwardContext, block_size: int) -> torch.Tensor:
    return kv_slots(ctx.decode_block_tables, ctx.kv_lens[: ctx.num_decodes], block_size)


def _kv_adapter_slots(ctx: ForwardContext, first: int, last: int | None = None) -> tuple[torch.Tensor, dict]:
    """The adapter slot [sum(kv_lens[first:last])] of every cached token of sequences first..last-1 and each
    slot's rows (a sequence's tokens share its adapter), from host data: no device sync."""
    last = ctx.num_seqs if last is None else last
    return adapter_rows(ctx.sequence_adapter_slots()[first:last], ctx.kv_lens[first:last], ctx.adapter_slot.device)

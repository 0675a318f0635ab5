"""Causal attention over packed sequences, and the paged KV cache it reads from.

The cache of one layer is a tensor [N, S, heads, D]: N blocks of S token slots. A token's flat slot is
block * S + offset; a sequence's block table lists its blocks in order, so its i-th token lives in slot
block_table[i // S] * S + i % S.

These are the pure-torch paths (the CPU path and the reference for the Triton decode kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Semantics: cache.view(N * S, ...)[slot_mapping[t]] = values[t]. cache [N, S, ...], values [T, ...]."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = values.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: list[int]) -> torch.Tensor:
    """The first kv_lens[b] cached tokens of every sequence b, packed back to back: [sum(kv_lens), ...].

    cache [N, S, ...], block_tables [B, max_blocks].
    """
    block_size = cache.shape[1]
    slots = []
    for b, length in enumerate(kv_lens):
        pos = torch.arange(length, device=cache.device)  # [L]
        slots.append(block_tables[b, pos // block_size].long() * block_size + pos % block_size)
    return cache.view(-1, *cache.shape[2:])[torch.cat(slots)]


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    kv_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention for sequences packed back to back, each with its queries at the end of its keys.

    Semantics, per sequence b with q_b [Lq, Hq, D] and k_b, v_b [Lk, Hkv, D|Dv]: query i sits at position
    Lk - Lq + i and attends to key j iff j <= that position (and position - j < sliding_window when set);
    query heads share key heads in groups of Hq / Hkv. Returns [sum(Lq), Hq, Dv].
    """
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])  # [T, Hq, Dv]
    q_start = k_start = 0
    for q_len, kv_len in zip(query_lens, kv_lens):
        qb = q[q_start : q_start + q_len].transpose(0, 1)  # [Hq, Lq, D]
        kb = k[k_start : k_start + kv_len].transpose(0, 1)  # [Hkv, Lk, D]
        vb = v[k_start : k_start + kv_len].transpose(0, 1)  # [Hkv, Lk, Dv]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]  # [Lq, 1]
        k_pos = torch.arange(kv_len, device=q.device)[None, :]  # [1, Lk]
        mask = k_pos <= q_pos  # [Lq, Lk]
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        ob = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=qb.shape[0] != kb.shape[0]
        )  # [Hq, Lq, Dv]
        out[q_start : q_start + q_len] = ob.transpose(0, 1)
        q_start += q_len
        k_start += kv_len
    return out

"""Causal attention over packed sequences, and the paged KV cache it reads from.

The cache of one layer is a tensor [N, S, heads, D]: N blocks of S token slots. A token's flat slot is
block * S + offset; a sequence's block table lists its blocks in order, so its i-th token lives in slot
block_table[i // S] * S + i % S.

These are the pure-torch paths (the CPU path and the reference for the Triton decode kernel). Everything here takes
sequence lengths as host lists, so nothing waits on the device to learn a shape.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeserve.kernels.native import call_native, native_ready

# varlen_attention_torch pads several sequences into one masked call when the padded batch is small (at most
# PAD_MAX_PAIRS query-key pairs per head, at most PAD_RATIO times the real pairs): there the per-call overhead
# dominates and one call halves the time (CPU, one thread). Past that the per-sequence calls are as fast or faster,
# as padding computes scores that are thrown away (measurements in the commit that set these).
PAD_MAX_PAIRS = 32768
PAD_RATIO = 4.0


def store_kv(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Semantics: cache.view(N * S, ...)[slot_mapping[t]] = values[t]. cache [N, S, ...], values [T, ...].
    On CPU in float32 one native call (csrc/store_kv_cpu.c; a slot outside the cache is an IndexError)."""
    if (
        native_ready(cache)
        and values.dtype == torch.float32
        and slot_mapping.dtype == torch.int64
        and cache.is_contiguous()
        and values.is_contiguous()
        and slot_mapping.is_contiguous()
    ):
        num_slots = cache.shape[0] * cache.shape[1]
        row = cache[0, 0].numel()
        if values.numel() != slot_mapping.shape[0] * row:
            raise ValueError(f"store_kv: {tuple(values.shape)} values for {slot_mapping.shape[0]} slots of {row}")
        call_native(
            "moeserve_store_kv_f32", cache.data_ptr(), num_slots, values.data_ptr(), slot_mapping.shape[0], row,
            slot_mapping.data_ptr(), bad_input=f"a cache slot outside the {num_slots} slots of the cache",
        )  # fmt: skip
        return
    cache.view(-1, *cache.shape[2:])[slot_mapping] = values.to(cache.dtype)


def kv_slots(block_tables: torch.Tensor, kv_lens: list[int], block_size: int) -> torch.Tensor:
    """Flat cache slots of the first kv_lens[b] tokens of every sequence b, packed back to back: [sum(kv_lens)] int64.

    block_tables [B, max_blocks] (on the cache's device). The positions are laid out on the host from the host
    lengths and copied over; only the table lookup runs on the device.
    """
    lens = torch.tensor(kv_lens, dtype=torch.long)  # [B], host
    rows = torch.repeat_interleave(torch.arange(len(kv_lens)), lens)  # [L] sequence of each packed token
    pos = torch.arange(sum(kv_lens)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)  # [L]
    rows, pos = rows.to(block_tables.device), pos.to(block_tables.device)
    return block_tables[rows, pos // block_size].long() * block_size + pos % block_size


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: list[int]) -> torch.Tensor:
    """The first kv_lens[b] cached tokens of every sequence b, packed back to back: [sum(kv_lens), ...].

    cache [N, S, ...], block_tables [B, max_blocks].
    """
    return cache.view(-1, *cache.shape[2:])[kv_slots(block_tables, kv_lens, cache.shape[1])]


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

    Several short sequences run as one padded, masked call; longer ones one call each.
    """
    if len(query_lens) > 1 and _pad_pays(query_lens, kv_lens):
        return _padded_attention(q, k, v, query_lens, kv_lens, scale, sliding_window)
    return _per_sequence_attention(q, k, v, query_lens, kv_lens, scale, sliding_window)


def _pad_pays(query_lens: list[int], kv_lens: list[int]) -> bool:
    padded = len(query_lens) * max(query_lens) * max(kv_lens)
    return padded <= PAD_MAX_PAIRS and padded <= PAD_RATIO * sum(q * kv for q, kv in zip(query_lens, kv_lens))


def _causal_mask(q_len: int, kv_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [Lq, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, Lk]
    mask = k_pos <= q_pos  # [Lq, Lk]
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    return mask


def _per_sequence_attention(q, k, v, query_lens, kv_lens, scale, sliding_window) -> torch.Tensor:
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])  # [T, Hq, Dv]
    q_start = k_start = 0
    for q_len, kv_len in zip(query_lens, kv_lens):
        # A leading batch dimension of 1: with 3-d inputs CPU SDPA falls back to its slow math path.
        qb = q[None, q_start : q_start + q_len].transpose(1, 2)  # [1, Hq, Lq, D]
        kb = k[None, k_start : k_start + kv_len].transpose(1, 2)  # [1, Hkv, Lk, D]
        vb = v[None, k_start : k_start + kv_len].transpose(1, 2)  # [1, Hkv, Lk, Dv]
        mask = _causal_mask(q_len, kv_len, sliding_window, q.device)
        ob = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=qb.shape[1] != kb.shape[1]
        )  # [1, Hq, Lq, Dv]
        out[q_start : q_start + q_len] = ob[0].transpose(0, 1)
        q_start += q_len
        k_start += kv_len
    return out


@functools.lru_cache(maxsize=8)
def _padding(
    query_lens: tuple[int, ...], kv_lens: tuple[int, ...], sliding_window: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors that pad the packed sequences into [B, Lq] / [B, Lk] and back, and the batch's mask.

    Cached: every layer of a step asks for the same lengths, so they are built (and copied to the device) once.
    """
    batch, max_q, max_kv = len(query_lens), max(query_lens), max(kv_lens)
    q_lens, k_lens = torch.tensor(query_lens), torch.tensor(kv_lens)  # [B]
    q_starts, k_starts = torch.cumsum(q_lens, 0) - q_lens, torch.cumsum(k_lens, 0) - k_lens
    i, j = torch.arange(max_q), torch.arange(max_kv)
    q_live = i[None, :] < q_lens[:, None]  # [B, Lq]
    q_index = torch.where(q_live, q_starts[:, None] + i, 0)  # [B, Lq] row of q; padding reads row 0
    k_index = torch.where(j[None, :] < k_lens[:, None], k_starts[:, None] + j, 0)  # [B, Lk]
    q_pos = (k_lens - q_lens)[:, None, None] + i[None, :, None]  # [B, Lq, 1]
    mask = j[None, None, :] <= q_pos  # [B, Lq, Lk]; keys past a sequence's end lie past all its queries
    if sliding_window is not None:
        mask &= q_pos - j[None, None, :] < sliding_window
    # A padding row sees key 0 only: no row is fully masked, so nothing turns NaN (not even in a backward pass).
    mask = torch.where(q_live[:, :, None], mask, j[None, None, :] == 0)
    unpad = (torch.arange(batch)[:, None] * max_q + i)[q_live]  # [T] flat padded row of each packed query
    return tuple(t.to(device) for t in (q_index, k_index, mask[:, None], unpad))


def _padded_attention(q, k, v, query_lens, kv_lens, scale, sliding_window) -> torch.Tensor:
    q_index, k_index, mask, unpad = _padding(tuple(query_lens), tuple(kv_lens), sliding_window, q.device)
    qb = q[q_index].transpose(1, 2)  # [B, Hq, Lq, D]
    kb = k[k_index].transpose(1, 2)  # [B, Hkv, Lk, D]
    vb = v[k_index].transpose(1, 2)  # [B, Hkv, Lk, Dv]
    ob = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=qb.shape[1] != kb.shape[1]
    )  # [B, Hq, Lq, Dv]
    return ob.transpose(1, 2).flatten(0, 1)[unpad]  # [T, Hq, Dv]

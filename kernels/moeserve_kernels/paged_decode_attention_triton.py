"""Paged decode attention in Triton, flash-decoding style: the context is split into chunks that run in parallel.

Semantics (same as paged_decode_attention_torch): per sequence b, query q[b] at position L - 1 (L = context_lens[b])
attends to cached positions [max(0, L - sliding_window), L), read through block_tables[b]; query head h reads
key/value head h // G, G = Hq / Hkv.

One program per (sequence, key/value head, split): it loads the G query heads that share the key/value head (padded
to 16 rows, the tl.dot minimum) so every key tile is read once per group, and runs an online softmax over its part of
the context, BLOCK_N positions at a time, looking each position's block up in the block table. With one split it
writes the normalised output; with several it writes (running max, running sum, unnormalised output) per split and
a torch reduction merges them. The split count is chosen from shapes known on the host (no sync): enough programs to
fill the GPU when the batch is small and contexts may be long.

This module imports triton at import time: the dispatcher in paged_attention.py imports it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # cached positions per inner step
MIN_SPLIT_LEN = 256  # a split covers at least this many positions, so splitting pays for its reduction
TARGET_PROGRAMS = 256  # roughly two waves on a 132-SM H100; untuned
_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [N, S, Hkv, D]
    v_ptr,  # [N, S, Hkv, Dv]
    block_tables_ptr,  # [B, M]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, Dv] (one split) or [B, Hq, splits, Dv] fp32 (several)
    max_ptr,  # [B, Hq, splits] fp32 running max (log2 domain); unused with one split
    sum_ptr,  # [B, Hq, splits] fp32 running sum; unused with one split
    scale_log2,  # softmax scale * log2(e)
    window,  # sliding window, or 0 for none
    group,  # G = Hq / Hkv
    head_dim,
    value_dim,
    block_size,
    split_len,  # positions per split, a multiple of BLOCK_N
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tm,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_mb,
    stride_mh,
    stride_ms,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(context_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    lo = start
    if window > 0:
        lo = tl.maximum(start, length - window)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < group
    heads = kv_head * group + offs_g  # [BG] query heads of this key/value head
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < value_dim
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BG, BD]

    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # Starting at lo rounded down keeps tiles aligned; every tile of the loop then holds at least one live position.
    for pos0 in range(lo - lo % BLOCK_N, end, BLOCK_N):
        pos = pos0 + offs_n  # [BN]
        live = (pos >= lo) & (pos < end)
        block = tl.load(block_tables_ptr + seq * stride_tb + (pos // block_size) * stride_tm, mask=live, other=0)
        block = block.to(tl.int64)
        offset = pos % block_size
        k = tl.load(
            k_ptr + block[None, :] * stride_kn + offset[None, :] * stride_ks + kv_head * stride_kh
            + offs_d[:, None] * stride_kd,
            mask=live[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BD, BN]
        scores = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [BG, BN]
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + block[:, None] * stride_vn + offset[:, None] * stride_vs + kv_head * stride_vh
            + offs_dv[None, :] * stride_vd,
            mask=live[:, None] & dv_mask[None, :],
            other=0.0,
        )  # [BN, BDV]
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od
    out_mask = g_mask[:, None] & dv_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_rows, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_rows + split * stride_os, acc, mask=out_mask)
        stats = seq * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(max_ptr + stats, running_max, mask=g_mask)
        tl.store(sum_ptr + stats, running_sum, mask=g_mask)


def num_kv_splits(batch: int, kv_heads: int, max_context: int) -> int:
    """Splits per (sequence, key/value head): enough programs for the GPU, each split at least MIN_SPLIT_LEN long."""
    by_length = triton.cdiv(max_context, MIN_SPLIT_LEN)
    by_occupancy = triton.cdiv(TARGET_PROGRAMS, max(batch * kv_heads, 1))
    return max(1, min(by_length, by_occupancy))


def launch_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """paged_decode_attention_triton with an explicit split count (tests sweep it). Shapes: see there."""
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    value_dim = v_cache.shape[-1]
    if q_heads % kv_heads or k_cache.shape[-1] != head_dim or v_cache.shape[:3] != k_cache.shape[:3]:
        got = f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        raise ValueError(f"{got} do not fit [B, Hq, D], [N, S, Hkv, D], [N, S, Hkv, Dv] with Hkv dividing Hq")
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        got = f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}"
        raise ValueError(f"{got}: expected [B, M] and [B] with B = {batch}")
    out = q.new_empty(batch, q_heads, value_dim)  # [B, Hq, Dv]
    if batch == 0:
        return out
    group = q_heads // kv_heads
    # A bound on every context known without a sync: the host's, or the most any table can address.
    max_context = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
    split_len = triton.cdiv(triton.cdiv(max_context, num_splits), BLOCK_N) * BLOCK_N
    if num_splits == 1:
        partial, running_max, running_sum = out, out, out  # the statistics pointers go unused
        partial_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        stat_strides = (0, 0, 0)
    else:
        partial = torch.empty(batch, q_heads, num_splits, value_dim, dtype=torch.float32, device=q.device)
        running_max = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
        running_sum = torch.empty_like(running_max)
        partial_strides = partial.stride()
        stat_strides = running_max.stride()
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, running_max, running_sum,
        scale * _LOG2E, sliding_window or 0, group, head_dim, value_dim, block_size, split_len,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *partial_strides, *stat_strides,
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(value_dim)),
    )  # fmt: skip
    if num_splits > 1:
        # Merge the splits: weights 2^(m_i - m) rescale each split's sum and output to the global max m; splits
        # that saw no position have m_i = -inf and weigh 0.
        global_max = running_max.amax(dim=2, keepdim=True)  # [B, Hq, 1]
        weight = torch.exp2(running_max - global_max)  # [B, Hq, splits]
        total = (running_sum * weight).sum(dim=2)  # [B, Hq]
        merged = (partial * weight[..., None]).sum(dim=2) / total[..., None]  # [B, Hq, Dv]
        out.copy_(merged)
    return out


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Semantics: out[b, h] = softmax_i(scale * q[b, h] . K_b[i, h // G]) @ V_b over the cached positions i of
    sequence b in [max(0, L_b - sliding_window), L_b), L_b = context_lens[b], G = Hq / Hkv.

    q [B, Hq, D], k_cache [N, S, Hkv, D], v_cache [N, S, Hkv, Dv], block_tables [B, M] int32, context_lens [B]
    int32 (>= 1; not checked, a check would sync). max_context_len: an optional host bound on context_lens.
    Returns [B, Hq, Dv] in q's dtype.
    """
    max_context = max_context_len if max_context_len is not None else block_tables.shape[1] * k_cache.shape[1]
    splits = num_kv_splits(q.shape[0], k_cache.shape[2], max_context)
    return launch_paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, splits, max_context
    )

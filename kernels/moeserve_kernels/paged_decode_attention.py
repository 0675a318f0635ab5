"""Decode attention straight from the paged KV cache: one query token per sequence, keys read through block tables.

Semantics, per sequence b with L = context_lens[b]: the query q[b] sits at position L - 1 and attends to the cached
positions max(0, L - sliding_window)..L-1 (all of 0..L-1 without a window), position i living in cache block
block_tables[b, i // S] at offset i % S; query head h reads key/value head h // (Hq / Hkv) (grouped-query attention).
Every sequence has L >= 1: a decode query's own key is in the cache before attention runs.

MLA (DeepSeek) calls this with its latent cache as both keys (latent + rotary part) and values (the latent).
This module holds the pure-torch twin and the dispatcher; the Triton kernel is in paged_decode_attention_triton.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import use_triton
from moeserve.kernels.native import call_native, native_ready


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Pure-torch twin: gathers every sequence's keys and values through its block table into one padded batch,
    then one masked attention call for all sequences (a per-sequence loop costs a call per sequence and layer).

    q [B, Hq, D], k_cache [N, S, Hkv, D], v_cache [N, S, Hkv, Dv], block_tables [B, M] int32,
    context_lens [B] int32 (>= 1). Returns [B, Hq, Dv] in q's dtype.
    """
    num_seqs, block_size = q.shape[0], k_cache.shape[1]
    if num_seqs == 0:
        return q.new_empty(0, q.shape[1], v_cache.shape[-1])
    lens = context_lens.long()
    # The batch is padded to the longest context; without the host's number, to all the tables can address.
    max_len = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
    pos = torch.arange(max_len, device=q.device)  # [L]
    blocks = block_tables.long().gather(
        1, (pos // block_size).clamp(max=block_tables.shape[1] - 1).expand(num_seqs, -1)
    )
    slots = blocks * block_size + pos % block_size  # [B, L]; positions past a sequence's end are masked below
    flat = slots.view(-1)  # index_select on the flat slots: a third of the time of indexing with [B, L] on CPU
    k = k_cache.flatten(0, 1).index_select(0, flat).view(num_seqs, max_len, *k_cache.shape[2:]).transpose(1, 2)
    v = v_cache.flatten(0, 1).index_select(0, flat).view(num_seqs, max_len, *v_cache.shape[2:]).transpose(1, 2)
    # k [B, Hkv, L, D], v [B, Hkv, L, Dv]
    valid = pos[None, :] < lens[:, None]  # [B, L]
    if sliding_window is not None:
        valid &= pos[None, :] >= lens[:, None] - sliding_window
    # The G query heads of a key/value head go in as G query rows of it (query head h = kv_head * G + g), so the
    # keys are read once per group rather than repeated per query head (enable_gqa expands them on CPU).
    kv_heads = k.shape[1]
    out = F.scaled_dot_product_attention(
        q.reshape(num_seqs, kv_heads, -1, q.shape[-1]),  # [B, Hkv, G, D]
        k.to(q.dtype),
        v.to(q.dtype),
        attn_mask=valid[:, None, None, :],
        scale=scale,
    )  # [B, Hkv, G, Dv]
    return out.reshape(num_seqs, q.shape[1], -1)


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether paged_decode_attention_native takes these operands: float32 or bfloat16 on CPU (query and caches of one
    dtype), caches with a contiguous last dim."""
    return (
        native_ready(q, NATIVE_DTYPES)
        and k_cache.dtype == q.dtype
        and v_cache.dtype == q.dtype
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
    )


def paged_decode_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """The native CPU kernel (csrc/paged_attention_cpu.c), same signature and semantics: reads keys and values
    in place through the block tables, float32 or bfloat16 (bf16 computed in float32, rounded once;
    native_attention_fits says when it applies). max_context_len is not needed (the kernel reads each sequence's own
    length)."""
    if q.dtype not in NATIVE_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"the native paged attention takes float32 or bfloat16 operands of one dtype, not {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")  # fmt: skip
    num_seqs, q_heads, head_dim = q.shape
    kv_heads, v_dim = k_cache.shape[2], v_cache.shape[-1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into groups over {kv_heads} key/value heads")
    q = q.contiguous()
    tables = block_tables.to(torch.int32)
    if tables.stride(-1) != 1:
        tables = tables.contiguous()
    lens = context_lens.to(torch.int32).contiguous()  # [B]
    out = q.new_empty(num_seqs, q_heads, v_dim)  # [B, Hq, Dv]
    call_native(
        "moeserve_paged_decode_attention", q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), lens.data_ptr(), num_seqs, q_heads, kv_heads, head_dim, v_dim, k_cache.shape[0],
        k_cache.shape[1], tables.shape[1], tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], scale,
        sliding_window or 0, int(q.dtype == torch.bfloat16), out.data_ptr(),
        bad_input="a context length or block id is outside the block tables or the cache",
    )  # fmt: skip
    return out


def paged_decode_attention(
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
    int32 (>= 1). max_context_len: a host bound on context_lens (optional; without it the tables' reach, M * S, is
    the bound, so nothing reads context_lens back from the device). v_cache may be a view of k_cache (MLA reads its
    latent as both). Returns [B, Hq, Dv]. Triton on CUDA; on CPU the native kernel for float32 and bfloat16, the twin
    otherwise (see backend.py and native.py).
    """
    args = (q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, max_context_len)
    if use_triton(q):
        from moeserve.kernels.paged_decode_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(*args)
    if native_attention_fits(q, k_cache, v_cache):
        return paged_decode_attention_native(*args)
    return paged_decode_attention_torch(*args)

"""The MoE-LoRA delta in Triton: a shrink kernel and an expand kernel, each with a decode and a prefill launch path.

Semantics (same as moe_lora_torch, added in place to out):
    out[t] += scale[s] * sum_k topk_weights[t, k] * lora_b[s, e] @ (lora_a[s, e] @ x[t]),  s = adapter_slot[t],
    e = topk_ids[t, k]; tokens with s == 0 add nothing.

  shrink: h[t, k] = lora_a[s, e] @ x[t]                           -> h [T, K, r] fp32
  expand: out[t] += scale[s] * sum_k topk_weights[t, k] * lora_b[s, e] @ h[t, k]   (summed over k in registers)

Launch paths, chosen by T (the token count, known on the host, so no sync):
  decode  (T <= DECODE_MAX_TOKENS; BGMV-like): one program per (token, k) for shrink and per (token, column tile)
          for expand, each reading the rows of its own (slot, expert) matrices; base tokens exit at once.
  prefill (SGMV-like): tokens grouped by adapter slot into tiles of BLOCK_M tokens (align_block_size; base tokens
          get no tile). Shrink runs one program per (tile, expert) and skips experts no token of the tile routes
          to; expand runs one program per (tile, column tile) and walks the slot's experts, so each (slot, expert)
          matrix is read once per tile and the sum over k stays in registers (no atomics, deterministic).

This module imports triton at import time: the dispatcher in moe_lora.py imports it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.moe_align import align_block_size

# Up to this many tokens the per-token (BGMV-like) path runs; above it, the slot-grouped tiles. A first guess, to be
# measured on a GPU (benchmarks/bench_kernels.py).
DECODE_MAX_TOKENS = 16
PREFILL_BLOCK_M = 32
PREFILL_BLOCK_N = 64
PREFILL_BLOCK_D = 64
DECODE_BLOCK_D = 128
DECODE_BLOCK_N = 128


@triton.jit
def _shrink_decode_kernel(
    x_ptr,  # [T, Din]
    a_ptr,  # [S, E, r, Din]
    slot_ptr,  # [T]
    ids_ptr,  # [T, K]
    h_ptr,  # [T, K, r] fp32 out
    rank,
    d_in,
    stride_xt,
    stride_xd,
    stride_as,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_it,
    stride_ik,
    stride_ht,
    stride_hk,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    k = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot == 0:
        return
    expert = tl.load(ids_ptr + token * stride_it + k * stride_ik).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_ptr + slot * stride_as + expert * stride_ae + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad
    x_ptrs = x_ptr + token.to(tl.int64) * stride_xt + offs_d * stride_xd
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, tl.cdiv(d_in, BLOCK_D)):
        d_mask = offs_d < d_in - d0 * BLOCK_D
        xv = tl.load(x_ptrs, mask=d_mask, other=0.0).to(tl.float32)  # [BD]
        a = tl.load(a_ptrs, mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BR, BD]
        acc += tl.sum(a * xv[None, :], axis=1)
        x_ptrs += BLOCK_D * stride_xd
        a_ptrs += BLOCK_D * stride_ad
    tl.store(h_ptr + token.to(tl.int64) * stride_ht + k * stride_hk + offs_r, acc, mask=r_mask)


@triton.jit
def _expand_decode_kernel(
    h_ptr,  # [T, K, r] fp32
    b_ptr,  # [S, E, Dout, r]
    slot_ptr,
    ids_ptr,
    weights_ptr,  # [T, K]
    scale_ptr,  # [S]
    out_ptr,  # [T, Dout] in/out
    top_k,
    rank,
    d_out,
    stride_ht,
    stride_hk,
    stride_bs,
    stride_be,
    stride_bn,
    stride_br,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_on,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot == 0:
        return
    token64 = token.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_slot = b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br  # [BN, BR]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, top_k):
        expert = tl.load(ids_ptr + token64 * stride_it + k * stride_ik).to(tl.int64)
        weight = tl.load(weights_ptr + token64 * stride_wt + k * stride_wk).to(tl.float32)
        hv = tl.load(h_ptr + token64 * stride_ht + k * stride_hk + offs_r, mask=r_mask, other=0.0)  # [BR]
        b = tl.load(b_slot + expert * stride_be, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc += weight * tl.sum(b * hv[None, :], axis=1)
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    out_ptrs = out_ptr + token64 * stride_ot + offs_n * stride_on
    current = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _shrink_prefill_kernel(
    x_ptr,  # [T, Din]
    a_ptr,  # [S, E, r, Din]
    ids_ptr,  # [T, K]
    h_ptr,  # [T, K, r] fp32 out
    sorted_ids_ptr,  # [num_tiles * BLOCK_M] tokens grouped by slot; padding = T
    tile_slot_ptr,  # [num_tiles] slot of each tile, -1 = unused
    num_tokens,
    top_k,
    rank,
    d_in,
    stride_xt,
    stride_xd,
    stride_as,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_it,
    stride_ik,
    stride_ht,
    stride_hk,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    tokens = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_mask = tokens < num_tokens
    tokens = tokens.to(tl.int64)
    used = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k in range(0, top_k):
        ids_k = tl.load(ids_ptr + tokens * stride_it + k * stride_ik, mask=row_mask, other=-1)
        used += (ids_k == expert).to(tl.int32)
    if tl.max(used, axis=0) == 0:  # top-k routing: most (tile, expert) pairs are empty
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_d[None, :] * stride_xd  # [BM, BD]
    a_ptrs = (
        a_ptr + slot * stride_as + expert.to(tl.int64) * stride_ae
        + offs_r[None, :] * stride_ar + offs_d[:, None] * stride_ad
    )  # [BD, BR], lora_a[s, e] read transposed
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, tl.cdiv(d_in, BLOCK_D)):
        d_mask = offs_d < d_in - d0 * BLOCK_D
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(xt.dtype)
        acc = tl.dot(xt, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_D * stride_xd
        a_ptrs += BLOCK_D * stride_ad
    h_rows = h_ptr + tokens[:, None] * stride_ht + offs_r[None, :]
    for k in range(0, top_k):
        ids_k = tl.load(ids_ptr + tokens * stride_it + k * stride_ik, mask=row_mask, other=-1)
        tl.store(h_rows + k * stride_hk, acc, mask=(ids_k == expert)[:, None] & r_mask[None, :])


@triton.jit
def _expand_prefill_kernel(
    h_ptr,  # [T, K, r] fp32
    b_ptr,  # [S, E, Dout, r]
    ids_ptr,
    weights_ptr,
    scale_ptr,
    out_ptr,  # [T, Dout] in/out
    sorted_ids_ptr,
    tile_slot_ptr,
    num_tokens,
    num_experts,
    top_k,
    rank,
    d_out,
    stride_ht,
    stride_hk,
    stride_bs,
    stride_be,
    stride_bn,
    stride_br,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_on,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    tokens = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = tokens < num_tokens
    tokens = tokens.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    h_rows = h_ptr + tokens[:, None] * stride_ht + offs_r[None, :]  # [BM, BR]
    b_slot = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # [BR, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for expert in range(0, num_experts):
        # coeff[m] = sum over the k with topk_ids[m, k] == expert of topk_weights[m, k] * h[m, k]
        coeff = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        used = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k in range(0, top_k):
            ids_k = tl.load(ids_ptr + tokens * stride_it + k * stride_ik, mask=row_mask, other=-1)
            hit = ids_k == expert
            w_k = tl.load(weights_ptr + tokens * stride_wt + k * stride_wk, mask=hit, other=0.0).to(tl.float32)
            h_k = tl.load(h_rows + k * stride_hk, mask=hit[:, None] & r_mask[None, :], other=0.0)
            coeff += w_k[:, None] * h_k
            used += hit.to(tl.int32)
        if tl.max(used, axis=0) > 0:
            b = tl.load(b_slot + expert * stride_be, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(coeff.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_on
    out_mask = row_mask[:, None] & n_mask[None, :]
    current = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=out_mask)


def _check_shapes(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out) -> None:
    if lora_a.dim() != 4 or lora_b.dim() != 4:
        got = f"{tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
        raise ValueError(f"expected lora_a [S, E, r, Din] and lora_b [S, E, Dout, r]; got {got}")
    slots, experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    if lora_b.shape != (slots, experts, d_out, rank):
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not fit lora_a {tuple(lora_a.shape)}")
    num_tokens = x.shape[0]
    if x.shape != (num_tokens, d_in) or out.shape != (num_tokens, d_out):
        raise ValueError(f"x {tuple(x.shape)} / out {tuple(out.shape)} do not fit Din={d_in}, Dout={d_out}")
    if adapter_slot.shape != (num_tokens,) or scale.shape != (slots,):
        raise ValueError(f"adapter_slot {tuple(adapter_slot.shape)} must be [T], scale {tuple(scale.shape)} [S]")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        got = f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        raise ValueError(f"topk_ids and topk_weights must both be [T, K]; got {got}")


def _rank_block(rank: int) -> int:
    """The rank padded to a power of two, and to 16 at least: tl.dot's minimum, and a safe arange length."""
    return max(16, triton.next_power_of_2(rank))


def moe_lora_decode(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out) -> None:
    """The per-token (BGMV-like) launch path. Semantics and shapes: see moe_lora_triton."""
    _check_shapes(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out)
    num_tokens, top_k = topk_ids.shape
    rank, d_in, d_out = lora_a.shape[2], lora_a.shape[3], lora_b.shape[2]
    if num_tokens == 0 or top_k == 0:
        return
    h = torch.empty(num_tokens, top_k, rank, dtype=torch.float32, device=x.device)  # [T, K, r]; base rows unused
    block_r = _rank_block(rank)
    _shrink_decode_kernel[(num_tokens, top_k)](
        x, lora_a, adapter_slot, topk_ids, h, rank, d_in,
        x.stride(0), x.stride(1), *lora_a.stride(), topk_ids.stride(0), topk_ids.stride(1), h.stride(0), h.stride(1),
        BLOCK_R=block_r, BLOCK_D=min(DECODE_BLOCK_D, triton.next_power_of_2(d_in)),
    )  # fmt: skip
    block_n = min(DECODE_BLOCK_N, triton.next_power_of_2(d_out))
    _expand_decode_kernel[(num_tokens, triton.cdiv(d_out, block_n))](
        h, lora_b, adapter_slot, topk_ids, topk_weights, scale, out, top_k, rank, d_out,
        h.stride(0), h.stride(1), *lora_b.stride(), topk_ids.stride(0), topk_ids.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )  # fmt: skip


def moe_lora_prefill(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out) -> None:
    """The slot-grouped (SGMV-like) launch path. Semantics and shapes: see moe_lora_triton."""
    _check_shapes(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out)
    num_tokens, top_k = topk_ids.shape
    slots, experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    if num_tokens == 0 or top_k == 0:
        return
    keys = torch.where(adapter_slot == 0, -1, adapter_slot.long())  # base tokens get no tile
    tiles = align_block_size(keys, slots, PREFILL_BLOCK_M)
    num_tiles = tiles.block_key.numel()
    h = torch.empty(num_tokens, top_k, rank, dtype=torch.float32, device=x.device)  # [T, K, r]
    block_r = _rank_block(rank)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _shrink_prefill_kernel[(num_tiles, experts)](
        x, lora_a, topk_ids, h, tiles.sorted_ids, tiles.block_key, num_tokens, top_k, rank, d_in,
        x.stride(0), x.stride(1), *lora_a.stride(), topk_ids.stride(0), topk_ids.stride(1), h.stride(0), h.stride(1),
        DOT_PRECISION=precision, BLOCK_M=PREFILL_BLOCK_M, BLOCK_R=block_r, BLOCK_D=PREFILL_BLOCK_D,
    )  # fmt: skip
    _expand_prefill_kernel[(num_tiles, triton.cdiv(d_out, PREFILL_BLOCK_N))](
        h, lora_b, topk_ids, topk_weights, scale, out, tiles.sorted_ids, tiles.block_key,
        num_tokens, experts, top_k, rank, d_out,
        h.stride(0), h.stride(1), *lora_b.stride(), topk_ids.stride(0), topk_ids.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), out.stride(0), out.stride(1),
        DOT_PRECISION=precision, BLOCK_M=PREFILL_BLOCK_M, BLOCK_R=block_r, BLOCK_N=PREFILL_BLOCK_N,
    )  # fmt: skip


def moe_lora_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_slot: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Semantics: out[t] += scale[s] * sum_k topk_weights[t, k] * lora_b[s, e] @ (lora_a[s, e] @ x[t]),
    s = adapter_slot[t], e = topk_ids[t, k]; s == 0 adds nothing.

    x [T, Din], lora_a [S, E, r, Din], lora_b [S, E, Dout, r], adapter_slot [T] int, topk_ids [T, K] int in
    [0, E), topk_weights [T, K] float, scale [S] float, out [T, Dout] (updated in place, rounded once).
    The decode path runs for T <= DECODE_MAX_TOKENS, the prefill path above.
    """
    path = moe_lora_decode if x.shape[0] <= DECODE_MAX_TOKENS else moe_lora_prefill
    path(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out)

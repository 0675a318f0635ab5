"""The routed-expert LoRA delta in Triton (BGMV-like, as vLLM's fused_moe_lora_op for decode sizes).

Semantics (same as expert_lora_torch, added in place to out):
    out[t, k] += lora_b[s, e] @ (lora_a[s, e] @ x[t]),  s = adapter_slot[t], e = topk_ids[t, k]; s == 0 adds nothing
    (x[t] is x[t, k] when x holds one row per assignment).

One program per (assignment, output column tile): it reads its own (slot, expert) A rows, shrinks the input to the
rank in fp32 registers, and expands into its column tile of out; base tokens' programs exit at once. The shrink is
recomputed per column tile (r x Din multiply-adds, small next to the tile's work for the ranks LoRA uses).

This module imports triton at import time: the dispatcher in expert_lora.py imports it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 64
BLOCK_N = 64


@triton.jit
def _expert_lora_kernel(
    x_ptr,  # [T, Din] or [T*K, Din]
    a_ptr,  # [S, E, r, Din]
    b_ptr,  # [S, E, Dout, r]
    slot_ptr,  # [T]
    ids_ptr,  # [T*K] contiguous
    out_ptr,  # [T*K, Dout] in/out
    top_k,
    rank,
    d_in,
    d_out,
    stride_xn,
    stride_xd,
    stride_as,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_bs,
    stride_be,
    stride_bn,
    stride_br,
    stride_on,
    stride_od,
    X_PER_ASSIGNMENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    assignment = tl.program_id(0).to(tl.int64)
    token = assignment // top_k
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot == 0:
        return
    expert = tl.load(ids_ptr + assignment).to(tl.int64)
    x_row = assignment if X_PER_ASSIGNMENT else token
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = a_ptr + slot * stride_as + expert * stride_ae + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad
    x_ptrs = x_ptr + x_row * stride_xn + offs_d * stride_xd
    h = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, tl.cdiv(d_in, BLOCK_D)):
        d_mask = offs_d < d_in - d0 * BLOCK_D
        xv = tl.load(x_ptrs, mask=d_mask, other=0.0).to(tl.float32)  # [BD]
        a = tl.load(a_ptrs, mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BR, BD]
        h += tl.sum(a * xv[None, :], axis=1)
        x_ptrs += BLOCK_D * stride_xd
        a_ptrs += BLOCK_D * stride_ad
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    b_ptrs = b_ptr + slot * stride_bs + expert * stride_be + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # [BN, BR]
    delta = tl.sum(b * h[None, :], axis=1)  # [BN]
    out_ptrs = out_ptr + assignment * stride_on + offs_n * stride_od
    current = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + delta).to(out_ptr.dtype.element_ty), mask=n_mask)


def _check_shapes(x, lora_a, lora_b, adapter_slot, topk_ids, out) -> None:
    num_tokens, top_k = topk_ids.shape
    num_slots, num_experts, rank, d_in = lora_a.shape
    if tuple(lora_b.shape[:2]) != (num_slots, num_experts) or lora_b.shape[3] != rank:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not pair")
    expected_x = (num_tokens, d_in) if x.dim() == 2 else (num_tokens, top_k, d_in)
    if tuple(x.shape) != expected_x or adapter_slot.shape != (num_tokens,):
        raise ValueError(f"x {tuple(x.shape)} / adapter_slot {tuple(adapter_slot.shape)} do not fit T={num_tokens}")
    if tuple(out.shape) != (num_tokens, top_k, lora_b.shape[2]) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [T, K, Dout] = {(num_tokens, top_k, lora_b.shape[2])} tensor")


def expert_lora_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_slot: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Semantics and shapes: see expert_lora in expert_lora.py."""
    _check_shapes(x, lora_a, lora_b, adapter_slot, topk_ids, out)
    num_tokens, top_k = topk_ids.shape
    rank, d_in = lora_a.shape[2:]
    d_out = lora_b.shape[2]
    if num_tokens == 0 or rank == 0:
        return
    rows = x.reshape(-1, d_in)  # [T or T*K, Din]
    ids = topk_ids.reshape(-1).contiguous()  # [T*K]
    flat = out.view(num_tokens * top_k, d_out)
    grid = (num_tokens * top_k, triton.cdiv(d_out, BLOCK_N))
    _expert_lora_kernel[grid](
        rows, lora_a, lora_b, adapter_slot, ids, flat,
        top_k, rank, d_in, d_out,
        rows.stride(0), rows.stride(1), *lora_a.stride(), *lora_b.stride(), flat.stride(0), flat.stride(1),
        X_PER_ASSIGNMENT=x.dim() == 3, BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_D=BLOCK_D,
        BLOCK_N=BLOCK_N,
    )  # fmt: skip

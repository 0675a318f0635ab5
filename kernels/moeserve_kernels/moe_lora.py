"""The MoE-LoRA delta of one target linear, for all tokens of a batch, each token with its own adapter.

Semantics (added in place to `out`):
    out[t] += scale[s] * sum_k topk_weights[t, k] * lora_b[s, e] @ (lora_a[s, e] @ x[t]),
    with s = adapter_slot[t] and e = topk_ids[t, k]; tokens with s == 0 (the base model) add nothing.

The tables hold every resident adapter at once, indexed by (adapter slot, LoRA expert): ranks of different adapters
are zero-padded to the table's r, expert counts zero-padded to E (the caller gives padded experts weight 0).
Soft routing (MoLoRA, LoRAMoE soft) is K = E with the softmax weights; top-k routing (MoLA) is K < E; plain LoRA
is E = K = 1 with weight 1. The delta is summed in fp32 and added to out once, so out is rounded once.

This module holds the pure-torch twin and the dispatcher; the Triton kernels are in moe_lora_triton.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import use_triton

# The twin's paths, all without host syncs (measured on CPU, one thread, Din=Dout=128, r=8, 8 adapters):
#   dense    every (slot, expert) of the tables for every token, two plain matmuls, weighted by a [T, S*E] scatter:
#            the fastest while T * S*E*r stays small (decode with the tables' r tight, as AdaptedLinear keeps them);
#   gather   each assignment's A and B gathered, two batched matmuls: the fastest up to ~64 assignments (decode);
#   grouped  assignments sorted by (slot, expert), two F.grouped_mm calls: the fastest beyond (3-5x gather at 2048
#            tokens), where F.grouped_mm runs (CPU, r, Din, Dout multiples of 4); otherwise gather, in chunks.
GATHER_MAX_ASSIGNMENTS = 64
# Bound on the per-assignment copies of A and B that one chunk of the gather path holds (fp32 bytes): a prefill of
# thousands of tokens at r=64, Din=Dout=4096 goes in chunks of a few dozen tokens.
TWIN_CHUNK_BYTES = 1 << 26
# The dense path while tokens x table columns (T * S*E*r) stay under this: a few hundred thousand multiply-adds
# per input feature, cheaper than any gather at decode sizes.
DENSE_MAX_WORK = 1 << 15


def moe_lora_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_slot: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Pure-torch twin: every (token, k) assignment through the same batched matmuls, no host sync.

    Base tokens go through them too, with weight 0 (slot 0's tables are zero as well), so nothing is filtered.
    x [T, Din], lora_a [S, E, r, Din], lora_b [S, E, Dout, r], adapter_slot [T] int (0 = base),
    topk_ids [T, K] int in [0, E), topk_weights [T, K] float, scale [S] float, out [T, Dout] (updated in place).
    Computes in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return
    slot = adapter_slot.long()  # [T]
    scaled = topk_weights.float() * scale.float()[slot][:, None]  # [T, K]
    weights = torch.where(slot[:, None] != 0, scaled, torch.zeros_like(scaled))  # [T, K]; 0 for base tokens
    num_slots, num_experts, rank = lora_a.shape[:3]
    if num_tokens * num_slots * num_experts * rank <= DENSE_MAX_WORK:
        delta = _dense(x, lora_a, lora_b, slot, topk_ids, weights)
    elif num_tokens * top_k > GATHER_MAX_ASSIGNMENTS and grouped_mm_fits(x, lora_a, lora_b):
        delta = _grouped(x, lora_a, lora_b, slot, topk_ids, weights)
    else:
        delta = _gather(x, lora_a, lora_b, slot, topk_ids, weights)
    out.copy_((out.float() + delta).to(out.dtype))


def grouped_mm_fits(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether F.grouped_mm runs on the fp32 operands: CPU, and r, Din, Dout multiples of 4 (16-byte strides)."""
    rank, d_in = lora_a.shape[2:]
    aligned = all(n % 4 == 0 for n in (rank, d_in, lora_b.shape[2]))
    return hasattr(F, "grouped_mm") and x.device.type == "cpu" and aligned


def _grouped(x, lora_a, lora_b, slot, topk_ids, weights) -> torch.Tensor:
    """The delta [T, Dout] in fp32, assignments sorted by (slot, expert), one grouped GEMM per factor."""
    num_tokens, top_k = topk_ids.shape
    num_slots, num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    key = (slot[:, None] * num_experts + topk_ids.long()).reshape(-1)  # [T*K] (slot, expert) pair of each assignment
    order = torch.argsort(key, stable=True)  # [T*K] grouped by pair
    ends = torch.cumsum(torch.bincount(key, minlength=num_slots * num_experts), 0).to(torch.int32)  # [S*E]
    a = lora_a.float().reshape(num_slots * num_experts, rank, d_in).transpose(1, 2)  # [S*E, Din, r]
    b = lora_b.float().reshape(num_slots * num_experts, d_out, rank).transpose(1, 2)  # [S*E, r, Dout]
    h = F.grouped_mm(x[order // top_k].float(), a, offs=ends) * weights.reshape(-1)[order, None]  # [T*K, r]
    y_sorted = F.grouped_mm(h, b, offs=ends)  # [T*K, Dout]
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return y.view(num_tokens, top_k, d_out).sum(dim=1)


def _dense(x, lora_a, lora_b, slot, topk_ids, weights) -> torch.Tensor:
    """The delta [T, Dout] in fp32 through every (slot, expert) of the tables: h = x A^T for all of them, each
    token's h scaled by its weight for its own (slot, expert) pairs (0 for the others), then one matmul with B."""
    num_tokens = x.shape[0]
    num_slots, num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    pairs = num_slots * num_experts
    a = lora_a.float().reshape(pairs * rank, d_in)  # [S*E*r, Din]
    b = lora_b.float().reshape(pairs, d_out, rank).transpose(1, 2).reshape(pairs * rank, d_out)  # [S*E*r, Dout]
    mix = torch.zeros(num_tokens, pairs, dtype=torch.float32, device=x.device)  # [T, S*E]
    mix.scatter_add_(1, slot[:, None] * num_experts + topk_ids.long(), weights)
    h = (x.float() @ a.t()).view(num_tokens, pairs, rank) * mix[:, :, None]  # [T, S*E, r]
    return h.view(num_tokens, pairs * rank) @ b  # [T, Dout]


def _gather(x, lora_a, lora_b, slot, topk_ids, weights) -> torch.Tensor:
    """The delta [T, Dout] in fp32, each assignment's A and B gathered, in chunks of tokens of bounded size."""
    num_tokens, top_k = topk_ids.shape
    rank, d_in = lora_a.shape[2:]
    d_out = lora_b.shape[2]
    delta = torch.empty(num_tokens, d_out, dtype=torch.float32, device=x.device)  # [T, Dout]
    chunk = max(1, TWIN_CHUNK_BYTES // (top_k * rank * (d_in + d_out) * 4))
    for start in range(0, num_tokens, chunk):
        rows = slice(start, start + chunk)
        slots, experts = slot[rows, None], topk_ids[rows].long()  # [n, 1], [n, K]
        n = experts.shape[0]
        a = lora_a[slots, experts].float().view(n, top_k * rank, d_in)  # [n, K*r, Din]
        b = lora_b[slots, experts].float().reshape(n * top_k, d_out, rank)  # [n*K, Dout, r]
        h = torch.bmm(a, x[rows].float()[:, :, None]).view(n, top_k, rank) * weights[rows, :, None]  # [n, K, r]
        y = torch.bmm(b, h.view(n * top_k, rank, 1)).view(n, top_k, d_out)  # [n, K, Dout]
        delta[rows] = y.sum(dim=1)
    return delta


def moe_lora(
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

    x [T, Din], lora_a [S, E, r, Din], lora_b [S, E, Dout, r], adapter_slot [T] int, topk_ids [T, K] int,
    topk_weights [T, K] float, scale [S] float, out [T, Dout]. Triton on CUDA, the twin on CPU (see backend.py).
    """
    if use_triton(x):
        from moeserve.kernels.moe_lora_triton import moe_lora_triton

        moe_lora_triton(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out)
    else:
        moe_lora_torch(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out)

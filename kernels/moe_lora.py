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

from moeserve.kernels.backend import use_triton


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
    """Pure-torch twin: groups the (token, k) assignments of non-base tokens by (slot, expert), one matmul pair each.

    x [T, Din], lora_a [S, E, r, Din], lora_b [S, E, Dout, r], adapter_slot [T] int (0 = base),
    topk_ids [T, K] int in [0, E), topk_weights [T, K] float, scale [S] float, out [T, Dout] (updated in place).
    Computes in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = lora_a.shape[1]
    if num_tokens == 0:
        return
    slot_of = adapter_slot.long()[:, None].expand(num_tokens, top_k).reshape(-1)  # [T*K]
    key = slot_of * num_experts + topk_ids.reshape(-1).long()  # [T*K] (slot, expert) pair of each assignment
    active = torch.nonzero(slot_of != 0).squeeze(1)  # [n] assignments of adapter tokens
    if active.numel() == 0:
        return
    order = active[torch.argsort(key[active], stable=True)]  # [n] grouped by (slot, expert)
    pairs, counts = torch.unique_consecutive(key[order], return_counts=True)
    weights = topk_weights.reshape(-1).float()  # [T*K]
    delta = torch.zeros(num_tokens, out.shape[1], dtype=torch.float32, device=out.device)  # [T, Dout]
    start = 0
    for pair, count in zip(pairs.tolist(), counts.tolist()):
        slot, expert = divmod(pair, num_experts)
        rows = order[start : start + count]  # [n_pair] assignment indices
        tokens = rows // top_k
        h = x[tokens].float() @ lora_a[slot, expert].float().t()  # [n_pair, r]
        y = h @ lora_b[slot, expert].float().t()  # [n_pair, Dout]
        delta.index_add_(0, tokens, y * (weights[rows] * scale[slot].float())[:, None])
        start += count
    out.copy_((out.float() + delta).to(out.dtype))


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

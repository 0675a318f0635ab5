"""LoRA on the routed experts of a MoE layer, each token with its own adapter: the delta is computed inside the MoE
path, per (token, k) assignment, before the activation (gate/up) and before the weighted sum (down).

Semantics of one routed expert e = topk_ids[t, k] for a token t of adapter slot s = adapter_slot[t]:
    gate_up = w13[e] x + lora_b13[s, e] (lora_a13[s, e] x)                          [2I]
    h       = act(gate_up[:I]) * gate_up[I:]                                      [I]
    y       = w2[e] h + lora_b2[s, e] (lora_a2[s, e] h)                           [H]
    out[t]  = sum_k topk_weights[t, k] * y
Slot 0 (the base model) and slots without expert LoRA have zero tables and add nothing. The LoRA scale of every
module is folded into its B table when the adapter is placed, so per-module scales (rank_pattern, alpha_pattern,
rsLoRA) cost nothing here.

`expert_lora` is the kernel (Triton in expert_lora_triton.py, the twin here): the delta B (A x) of one projection
for every assignment, added in place. `fused_moe_lora` is the MoE computation around it: the base expert GEMMs per
assignment (torch: grouped GEMMs on CPU, gathered batched matmuls elsewhere; the fused base kernel applies the
activation inside its first GEMM, where the delta must come first), the two deltas, the activation and the sum.
Like vLLM's fused MoE-LoRA (vllm/lora/layers/fused_moe.py), which adds its LoRA kernel's output to the w13 and w2
intermediate caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import use_triton
from moeserve.kernels.fused_moe import ACTIVATIONS

# The gather path's per-assignment copies of A and B (or of expert weights) held at once, in fp32 bytes: a prefill
# of thousands of tokens goes in chunks.
TWIN_CHUNK_BYTES = 1 << 26


def _grouped_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether F.grouped_mm runs on x [N, Din] and w [G, Dout, Din]: CPU, one float dtype, 16-byte aligned rows."""
    if not hasattr(F, "grouped_mm") or x.device.type != "cpu" or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    return all(n % align == 0 for n in (w.shape[1], w.shape[2])) and w.is_contiguous()


def _rows(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The input row of every assignment [T*K, Din]: x [T, Din] repeated over k, or x [T, K, Din] flattened."""
    if x.dim() == 2:
        return x.repeat_interleave(top_k, dim=0)
    return x.reshape(-1, x.shape[-1])


def _group_matmul(rows: torch.Tensor, w: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """y[n] = w[group[n]] @ rows[n] for rows [N, Din], w [G, Dout, Din], group [N] in [0, G): [N, Dout] fp32.

    No host sync: one grouped GEMM over the rows sorted by group (CPU), else gathered weights in bounded chunks.
    """
    num, d_in = rows.shape
    d_out = w.shape[1]
    if num == 0:
        return rows.new_zeros(0, d_out, dtype=torch.float32)
    if _grouped_fits(rows, w):
        order = torch.argsort(group, stable=True)  # [N] rows grouped by their matrix
        ends = torch.cumsum(torch.bincount(group, minlength=w.shape[0]), 0).to(torch.int32)  # [G]
        y_sorted = F.grouped_mm(rows[order], w.transpose(1, 2), offs=ends)  # [N, Dout]
        y = torch.empty(num, d_out, dtype=torch.float32, device=rows.device)
        y[order] = y_sorted.float()
        return y
    y = torch.empty(num, d_out, dtype=torch.float32, device=rows.device)  # [N, Dout]
    chunk = max(1, TWIN_CHUNK_BYTES // (d_in * d_out * 4))
    for start in range(0, num, chunk):
        part = slice(start, start + chunk)
        y[part] = torch.bmm(w[group[part]].float(), rows[part].float()[:, :, None]).squeeze(2)
    return y


def expert_lora_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_slot: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Pure-torch twin of expert_lora (same signature and semantics); computes in fp32, adds to out once.

    Every assignment goes through the same matmuls, base tokens with zero weight, so nothing is filtered (no sync).
    """
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return
    num_slots, num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[2]
    slot = adapter_slot.long()  # [T]
    pair = (slot[:, None] * num_experts + topk_ids.long()).reshape(-1)  # [T*K] (slot, expert) of each assignment
    live = (slot != 0).repeat_interleave(top_k).float()[:, None]  # [T*K, 1]
    rows = _rows(x, top_k).float()  # [T*K, Din]
    a = lora_a.float().reshape(num_slots * num_experts, rank, d_in)  # [S*E, r, Din]
    b = lora_b.float().reshape(num_slots * num_experts, d_out, rank)  # [S*E, Dout, r]
    h = _group_matmul(rows, a, pair) * live  # [T*K, r]
    delta = _group_matmul(h, b, pair)  # [T*K, Dout]
    flat = out.view(num_tokens * top_k, d_out)
    flat.copy_((flat.float() + delta).to(out.dtype))


def expert_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_slot: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Semantics: out[t, k] += lora_b[s, e] @ (lora_a[s, e] @ x[t]), s = adapter_slot[t], e = topk_ids[t, k];
    s == 0 adds nothing. x[t] is x[t, k] when x holds one row per assignment.

    x [T, Din] (gate/up: one input per token) or [T, K, Din] (down: one per assignment), lora_a [S, E, r, Din],
    lora_b [S, E, Dout, r] (scale folded in), adapter_slot [T] int, topk_ids [T, K] int in [0, E),
    out [T, K, Dout] contiguous (updated in place). Triton on CUDA, the twin on CPU (see backend.py).
    """
    if use_triton(x):
        from moeserve.kernels.expert_lora_triton import expert_lora_triton

        expert_lora_triton(x, lora_a, lora_b, adapter_slot, topk_ids, out)
    else:
        expert_lora_torch(x, lora_a, lora_b, adapter_slot, topk_ids, out)


def fused_moe_lora(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora_ids: torch.Tensor,
    adapter_slot: torch.Tensor,
    lora13: tuple[torch.Tensor, torch.Tensor] | None,
    lora2: tuple[torch.Tensor, torch.Tensor] | None,
    activation: str = "silu",
) -> torch.Tensor:
    """Semantics: the module docstring's out [T, H], with the rows topk_ids (ESFT overlay rows included) for the
    base weights and the router's expert ids lora_ids for the LoRA tables.

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I], topk_weights [T, K], topk_ids and lora_ids [T, K] int,
    adapter_slot [T] int, lora13 = (A [S, E, r, H], B [S, E, 2I, r]) or None, lora2 = (A [S, E, r', I],
    B [S, E, H, r']) or None. Returns [T, H] in hidden's dtype; the sum over k is in fp32, rounded once.
    """
    num_tokens, top_k = topk_ids.shape
    size, inter = hidden.shape[1], w2.shape[-1]
    act = ACTIVATIONS[activation]
    rows = topk_ids.reshape(-1).long()  # [T*K]
    gate_up = _group_matmul(_rows(hidden, top_k), w13, rows).view(num_tokens, top_k, 2 * inter)  # [T, K, 2I] fp32
    if lora13 is not None:
        expert_lora(hidden, lora13[0], lora13[1], adapter_slot, lora_ids, gate_up)
    h = (act(gate_up[..., :inter]) * gate_up[..., inter:]).to(hidden.dtype)  # [T, K, I]
    y = _group_matmul(h.reshape(-1, inter), w2, rows).view(num_tokens, top_k, size)  # [T, K, H] fp32
    if lora2 is not None:
        expert_lora(h, lora2[0], lora2[1], adapter_slot, lora_ids, y)
    return torch.bmm(topk_weights.float()[:, None, :], y).squeeze(1).to(hidden.dtype)

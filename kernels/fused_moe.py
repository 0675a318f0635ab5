"""The routed-expert computation of a MoE layer: gated MLP per expert, weighted sum over each token's top-k.

Semantics:
    out[t] = sum_k topk_weights[t, k] * down(act(gate(x[t])) * up(x[t]))  with the expert topk_ids[t, k], where
    gate/up are the two halves of w13[e] ([2I, H], gate first) and down is w2[e] ([H, I]).

The expert ids index rows of the weight tables, so a table may hold more rows than the router has experts (the
ESFT overlay rows of resident adapters): callers remap ids first and the kernel costs the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import use_triton

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Pure-torch twin: sorts the (token, expert) assignments by expert and runs one matmul pair per expert.

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I] (R = expert rows), topk_weights [T, K] (any float dtype),
    topk_ids [T, K] int in [0, R). Returns [T, H] in hidden's dtype.
    """
    act = ACTIVATIONS[activation]
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[-1]
    out = torch.zeros_like(hidden)  # [T, H]
    if num_tokens == 0:
        return out
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    token_of = order // top_k  # [T*K] token index of each sorted assignment
    weight_of = topk_weights.reshape(-1)[order]  # [T*K]
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        x = hidden[rows]  # [n, H]
        gate_up = x @ w13[expert].t()  # [n, 2I]
        h = act(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y = (h @ w2[expert].t()) * weight_of[start : start + count, None].to(h.dtype)  # [n, H]
        out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Semantics: out[t] = sum_k topk_weights[t, k] * w2[e] @ (act(w13[e, :I] @ x[t]) * w13[e, I:] @ x[t]),
    e = topk_ids[t, k].

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I], topk_weights [T, K], topk_ids [T, K] int in [0, R).
    Returns [T, H]. Triton on CUDA, the twin on CPU (see backend.py).
    """
    if use_triton(hidden):
        from moeserve.kernels.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, activation)
    return fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids, activation)

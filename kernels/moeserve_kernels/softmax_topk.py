"""The softmax router's choice: scores, top-k experts and their weights per token. The native CPU kernel
(csrc/softmax_topk_cpu.c) for float32 logits, else its twin (torch's softmax, topk, gather, division)."""

from __future__ import annotations

import torch

from moeserve.kernels.native import call_native, native_ready, records_grad


def softmax_topk_torch(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> scores [T, E] (softmax, fp32), ids [T, K] int64 (largest first), weights [T, K] fp32 (their
    scores, divided by their sum where renormalize)."""
    scores = logits.float().softmax(dim=-1)  # [T, E]
    ids = torch.topk(scores, top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, ids, weights


def native_softmax_topk_fits(logits: torch.Tensor, top_k: int) -> bool:
    """Whether softmax_topk_native takes these: float32 contiguous logits on CPU, 1 <= k < E, no autograd graph."""
    return (
        native_ready(logits)
        and logits.dim() == 2
        and 1 <= top_k < logits.shape[1]
        and logits.is_contiguous()
        and not records_grad(logits)
    )


def softmax_topk_native(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native kernel, same signature and semantics as softmax_topk_torch (ties go to the lower expert id)."""
    num_tokens, experts = logits.shape
    scores = torch.empty_like(logits)  # [T, E]
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64)  # [T, K]
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32)  # [T, K]
    call_native(
        "moeserve_softmax_topk_f32", logits.data_ptr(), num_tokens, experts, top_k, int(renormalize),
        scores.data_ptr(), ids.data_ptr(), weights.data_ptr(),
        bad_input=f"top_k={top_k} must be in [1, {experts})",
    )  # fmt: skip
    return scores, ids, weights


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, ids, weights) of a softmax router: native where native_softmax_topk_fits, else the twin."""
    if native_softmax_topk_fits(logits, top_k):
        return softmax_topk_native(logits, top_k, renormalize)
    return softmax_topk_torch(logits, top_k, renormalize)

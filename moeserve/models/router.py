"""The frozen MoE router: affinity scores, (group-limited) top-k choice, and the combine weights.

Covers every routing rule of the supported families:
- softmax over all experts, top-k, optional renormalisation (Qwen-MoE, OLMoE; Mixtral always renormalises);
- DeepSeek-V2: softmax, group-limited greedy (best expert per group ranks the groups), times routed_scaling_factor;
- DeepSeek-V3: sigmoid, choice on score + correction bias, groups ranked by their two best, renormalised, scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeserve.kernels.linear import linear
from moeserve.kernels.softmax_topk import softmax_topk
from moeserve.models.spec import RouterSpec


@dataclass
class Routing:
    """The router's decision for T tokens."""

    topk_ids: torch.Tensor  # [T, K] int64: chosen experts
    topk_weights: torch.Tensor  # [T, K] float32: their weights in the combine
    scores: torch.Tensor  # [T, E] float32: pre-top-k affinity (softmax or sigmoid), as ESFT's scoring reads it


class Router(nn.Module):
    def __init__(self, spec: RouterSpec, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.zeros(spec.num_experts, hidden_size))  # [E, H]
        # LoRA on the router weight (moeserve.adapters.router_lora_slots), installed by the adapter manager: adds each
        # token's adapter delta to the logits, in place.
        self.lora: nn.Module | None = None
        if spec.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        spec = self.spec
        logits = linear(x.float(), self.weight.float())  # [T, E]
        if self.lora is not None:
            self.lora(x, logits)
        if spec.scoring == "softmax" and not spec.correction_bias and spec.n_group <= 1:
            scores, topk_ids, topk_weights = softmax_topk(logits, spec.top_k, spec.norm_topk_prob)  # native on CPU
            if spec.routed_scaling_factor != 1.0:
                topk_weights = topk_weights * spec.routed_scaling_factor
            return Routing(topk_ids, topk_weights, scores)
        scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias if spec.correction_bias else scores
        if spec.n_group > 1:
            choice = self._mask_groups(choice)
        topk_ids = torch.topk(choice, spec.top_k, dim=-1).indices  # [T, K]
        topk_weights = scores.gather(1, topk_ids)  # [T, K]
        if spec.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        if spec.routed_scaling_factor != 1.0:
            topk_weights = topk_weights * spec.routed_scaling_factor
        return Routing(topk_ids, topk_weights, scores)

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keeps the experts of the topk_group best groups; the others can no longer be chosen."""
        spec = self.spec
        grouped = choice.view(choice.shape[0], spec.n_group, -1)  # [T, G, E/G]
        if spec.group_score == "max":
            group_scores = grouped.max(dim=-1).values  # [T, G]
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, spec.topk_group, dim=-1).indices, True)
        # DeepSeek-V2 zeroes the masked scores (softmax scores are positive), V3 sets them to -inf.
        fill = 0.0 if spec.scoring == "softmax" else float("-inf")
        return grouped.masked_fill(~keep[:, :, None], fill).view_as(choice)

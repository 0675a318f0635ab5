"""The sparse MoE block: router, routed experts in fused 3-D tables, optional shared expert."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.forward_context import get_forward_context
from moeserve.kernels import ACTIVATIONS, fused_moe
from moeserve.models.linear import Linear
from moeserve.models.mlp import GatedMLP
from moeserve.models.router import Router
from moeserve.models.spec import MoESpec


class Experts(nn.Module):
    """The routed experts as transformers 5 keeps them in memory: one table per projection."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, H, I]


class SparseMoeBlock(nn.Module):
    def __init__(self, spec: MoESpec, hidden_size: int, hidden_act: str) -> None:
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"experts with activation {hidden_act!r} are not supported; known: {sorted(ACTIVATIONS)}")
        self.spec = spec
        self.hidden_act = hidden_act
        self.gate = Router(spec.router, hidden_size)
        self.experts = Experts(spec.router.num_experts, hidden_size, spec.intermediate_size)
        if spec.shared_intermediate_size:
            self.shared_experts = GatedMLP(hidden_size, spec.shared_intermediate_size, hidden_act, spec.shared_bias)
        if spec.shared_expert_gate:
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)
        # ESFT adapters' expert overlay (moeserve.adapters.expert_overlay), installed by the adapter manager.
        self.overlay: nn.Module | None = None
        # LoRA on the routed experts (moeserve.adapters.expert_lora_slots), installed by the adapter manager.
        self.expert_lora: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x)
        if self.overlay is None:
            w13, w2, rows = self.experts.gate_up_proj, self.experts.down_proj, routing.topk_ids
        else:
            w13, w2 = self.overlay.tables()
            rows = self.overlay.route(routing.topk_ids, get_forward_context().adapter_slot)
        if self.expert_lora is None:
            out = fused_moe(x, w13, w2, routing.topk_weights, rows, self.hidden_act)  # [T, H]
        else:
            out = self.expert_lora(x, w13, w2, routing.topk_weights, rows, routing.topk_ids, self.hidden_act)
        if self.spec.shared_intermediate_size:
            shared = self.shared_experts(x)  # [T, H]
            if self.spec.shared_expert_gate:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

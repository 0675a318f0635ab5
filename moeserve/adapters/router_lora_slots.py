"""LoRA on the router weight of one MoE layer (PEFT target_parameters `mlp.gate.weight`, which PEFT's `all-linear`
adds on OLMoE and Qwen-MoE, whose routers are not nn.Linear), for every adapter slot at once.

    logits[t] += scale[s] * B[s] (A[s] x[t]),  s = adapter_slot[t]

so each token routes with its own adapter's router; slot 0 and slots without router LoRA add nothing. The delta is
one plain-LoRA call of the MoE-LoRA kernel (one expert of weight 1), in fp32 on the fp32 logits. Tables
`A [S+1, 1, r, H]`, `B [S+1, 1, E, r]`, `scale [S+1]`, grown to the largest resident rank.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.adapters.weights import ModuleWeights
from moeserve.forward_context import get_forward_context
from moeserve.kernels import moe_lora
from moeserve.models.router import Router


class RouterLoRASlots(nn.Module):
    def __init__(self, router: Router, num_slots: int) -> None:
        super().__init__()
        self.num_slots = num_slots
        self.num_experts, self.hidden = router.weight.shape
        self.device = router.weight.device
        self.lora_a = torch.zeros(num_slots + 1, 1, 0, self.hidden, device=self.device)
        self.lora_b = torch.zeros(num_slots + 1, 1, self.num_experts, 0, device=self.device)
        self.scale = torch.zeros(num_slots + 1, device=self.device)
        self.active = [False] * (num_slots + 1)

    def load(self, slot: int, w: ModuleWeights) -> None:
        self.unload(slot)
        rank = w.rank
        if rank > self.lora_a.shape[2]:  # grow, contents kept
            a = torch.zeros(self.num_slots + 1, 1, rank, self.hidden, device=self.device)
            b = torch.zeros(self.num_slots + 1, 1, self.num_experts, rank, device=self.device)
            a[:, :, : self.lora_a.shape[2]] = self.lora_a
            b[:, :, :, : self.lora_b.shape[3]] = self.lora_b
            self.lora_a, self.lora_b = a, b
        self.lora_a[slot, :, :rank] = w.lora_a.float()
        self.lora_b[slot, :, :, :rank] = w.lora_b.float()
        self.scale[slot] = w.scale
        self.active[slot] = True

    def unload(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scale[slot] = 0.0
        self.active[slot] = False

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Adds the delta of every token with router LoRA to logits [T, E] (fp32) of x [T, H]."""
        ctx = get_forward_context()
        groups = ctx.token_groups() if ctx.adapter_slot is not None else {}
        if not any(self.active[s] for s in groups):
            return
        num_tokens = x.shape[0]
        ids = torch.zeros(num_tokens, 1, dtype=torch.long, device=x.device)  # [T, 1]: the one expert
        weights = torch.ones(num_tokens, 1, dtype=torch.float32, device=x.device)  # [T, 1]
        moe_lora(x.float(), self.lora_a, self.lora_b, ctx.adapter_slot, ids, weights, self.scale, logits)

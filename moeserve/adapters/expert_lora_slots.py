"""LoRA on the routed experts of one MoE layer, for every adapter slot at once.

The layer keeps stacked per-slot tables, made when the first adapter with expert LoRA in this layer is placed and
grown (zero-padded) to the largest resident rank: `a13 [S+1, E, r, H]`, `b13 [S+1, E, 2I, r]` for the gate/up
projection and `a2 [S+1, E, r', I]`, `b2 [S+1, E, H, r']` for the down projection, the scale folded into B. Slot 0
and slots of other adapters stay zero.

In a step, the tokens of slots with expert LoRA go through kernels.fused_moe_lora (the delta inside the expert
computation, per routed token, of its own slot); every other token (base, ESFT, attention-LoRA adapters) through
the plain fused_moe, so base traffic pays nothing for them. Which tokens are which comes from the forward context's
host-built slot groups: no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.adapters.weights import ExpertLoRAWeights
from moeserve.forward_context import get_forward_context
from moeserve.kernels import fused_moe, fused_moe_lora
from moeserve.models.moe import SparseMoeBlock

_PAIRS = (("a13", "b13"), ("a2", "b2"))


class ExpertLoRASlots(nn.Module):
    def __init__(self, block: SparseMoeBlock, num_slots: int) -> None:
        super().__init__()
        w13 = block.experts.gate_up_proj
        self.num_slots = num_slots
        self.num_experts, two_inter, self.hidden = w13.shape
        self.inter = two_inter // 2
        self.dtype, self.device = w13.dtype, w13.device
        self.tables: dict[str, torch.Tensor] = {}
        self.active = [False] * (num_slots + 1)  # per slot: it holds expert LoRA in this layer

    def _shape(self, name: str, rank: int) -> tuple[int, ...]:
        e, h, i = self.num_experts, self.hidden, self.inter
        return {"a13": (e, rank, h), "b13": (e, 2 * i, rank), "a2": (e, rank, i), "b2": (e, h, rank)}[name]

    def _table(self, name: str, rank: int) -> torch.Tensor:
        """The table [S+1, ...] with room for `rank`, made on first use or grown with its contents kept."""
        old = self.tables.get(name)
        rank_dim = 2 if name.startswith("a") else 3
        if old is not None and old.shape[rank_dim] >= rank:
            return old
        table = torch.zeros(self.num_slots + 1, *self._shape(name, rank), dtype=self.dtype, device=self.device)
        if old is not None:
            index = [slice(None)] * table.dim()
            index[rank_dim] = slice(0, old.shape[rank_dim])
            table[tuple(index)] = old
        self.tables[name] = table
        return table

    def load(self, slot: int, w: ExpertLoRAWeights) -> None:
        self.unload(slot)
        for a_name, b_name in _PAIRS:
            a, b = getattr(w, a_name), getattr(w, b_name)
            if a is None:
                continue
            rank = a.shape[1]
            self._table(a_name, rank)[slot, :, :rank] = a
            self._table(b_name, rank)[slot, :, :, :rank] = b
        self.active[slot] = True

    def unload(self, slot: int) -> None:
        """Empties the slot (zeroed, so a padded read of it can never leak an old adapter)."""
        for table in self.tables.values():
            table[slot].zero_()
        self.active[slot] = False

    def forward(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        rows: torch.Tensor,
        expert_ids: torch.Tensor,
        activation: str,
    ) -> torch.Tensor:
        """The MoE output [T, H] of x [T, H]: rows [T, K] index w13/w2 (ESFT overlay rows included), expert_ids
        [T, K] are the router's choices, which index the LoRA tables."""
        ctx = get_forward_context()
        groups = ctx.token_groups() if ctx.adapter_slot is not None else {}
        lora = [s for s in groups if self.active[s]]
        if not lora:
            return fused_moe(x, w13, w2, topk_weights, rows, activation)
        pairs = [(self.tables[a], self.tables[b]) if a in self.tables else None for a, b in _PAIRS]  # w13, w2
        if len(lora) == len(groups):  # every token of the step has expert LoRA
            return fused_moe_lora(x, w13, w2, topk_weights, rows, expert_ids, ctx.adapter_slot, *pairs, activation)
        key = ("expert_lora_split", tuple(lora))
        if key not in ctx.step_cache:  # the same for every MoE layer of the step
            others = [s for s in groups if s not in lora]
            ctx.step_cache[key] = (torch.cat([groups[s] for s in lora]), torch.cat([groups[s] for s in others]))
        with_lora, without = ctx.step_cache[key]  # [n], [T - n]
        out = torch.empty_like(x)  # [T, H]
        out[without] = fused_moe(x[without], w13, w2, topk_weights[without], rows[without], activation)
        out[with_lora] = fused_moe_lora(
            x[with_lora], w13, w2, topk_weights[with_lora], rows[with_lora], expert_ids[with_lora],
            ctx.adapter_slot[with_lora], *pairs, activation,
        )  # fmt: skip
        return out

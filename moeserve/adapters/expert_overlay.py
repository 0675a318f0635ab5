"""ESFT adapters served as an expert overlay on one MoE layer.

The layer's expert tables grow from E base rows to E + R rows; the R overlay rows hold fine-tuned experts of resident
ESFT adapters. `remap[slot, e]` says which row expert e means for tokens of that adapter slot: identity for slot 0
(the base model) and for experts an adapter did not fine-tune. After the frozen router's top-k, each token's expert
ids go through its slot's row of the remap, and the same grouped expert computation runs: no per-adapter pass, and
the FLOPs of the base model. Rows are handed out lowest first and the computation sees the tables only up to the
highest row in use, so free rows cost nothing (the CPU twin's grouped GEMM pays per row, empty or not).
"""

from __future__ import annotations

import heapq

import torch
from torch import nn

from moeserve.models.moe import SparseMoeBlock


class ExpertOverlay(nn.Module):
    def __init__(self, block: SparseMoeBlock, num_slots: int, num_rows: int) -> None:
        super().__init__()
        experts = block.experts
        base_w13, base_w2 = experts.gate_up_proj.data, experts.down_proj.data
        self.num_experts = base_w13.shape[0]
        self.num_rows = num_rows
        w13 = base_w13.new_zeros(self.num_experts + num_rows, *base_w13.shape[1:])  # [E + R, 2I, H]
        w2 = base_w2.new_zeros(self.num_experts + num_rows, *base_w2.shape[1:])  # [E + R, H, I]
        w13[: self.num_experts] = base_w13
        w2[: self.num_experts] = base_w2
        # The base parameters become views of the big tables: one copy of the base weights in memory.
        experts.gate_up_proj = nn.Parameter(w13[: self.num_experts], requires_grad=False)
        experts.down_proj = nn.Parameter(w2[: self.num_experts], requires_grad=False)
        self.register_buffer("w13", w13, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        identity = torch.arange(self.num_experts, device=w13.device)
        self.register_buffer("remap", identity.repeat(num_slots + 1, 1), persistent=False)  # [S + 1, E]
        self._free_rows = list(range(self.num_experts, self.num_experts + num_rows))  # a heap: lowest row first
        self._rows_of_slot: dict[int, list[int]] = {}
        self.active = False  # any slot overlays an expert: only then do tokens go through the remap
        self._rows_in_use = self.num_experts  # 1 + the highest row in use

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E + R', 2I, H], w2 [E + R', H, I]): the base rows and the overlay rows up to the highest in use."""
        return self.w13[: self._rows_in_use], self.w2[: self._rows_in_use]

    def _update_rows_in_use(self) -> None:
        self._rows_in_use = max((max(r) + 1 for r in self._rows_of_slot.values() if r), default=self.num_experts)

    def load(self, slot: int, experts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Places expert e's weights (w13 [2I, H], w2 [H, I]) for tokens of `slot`; the caller checked the room."""
        if len(experts) > len(self._free_rows):
            raise RuntimeError(f"{len(experts)} overlay rows needed, {len(self._free_rows)} free")
        rows = [heapq.heappop(self._free_rows) for _ in experts]
        for row, (expert, (w13, w2)) in zip(rows, experts.items()):
            self.w13[row] = w13.to(self.w13.dtype)
            self.w2[row] = w2.to(self.w2.dtype)
            self.remap[slot, expert] = row
        self._rows_of_slot[slot] = rows
        self._update_rows_in_use()
        self.active = True

    def unload(self, slot: int) -> None:
        for row in self._rows_of_slot.pop(slot, []):
            heapq.heappush(self._free_rows, row)
        self._update_rows_in_use()
        self.remap[slot] = torch.arange(self.num_experts, device=self.remap.device)
        self.active = bool(self._rows_of_slot)

    def route(self, topk_ids: torch.Tensor, adapter_slot: torch.Tensor | None) -> torch.Tensor:
        """Expert rows [T, K] for the router's choices topk_ids [T, K] of tokens in adapter_slot [T]."""
        if not self.active or adapter_slot is None:
            return topk_ids
        return self.remap[adapter_slot.long()[:, None], topk_ids]

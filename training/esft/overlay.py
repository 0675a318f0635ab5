"""Trainable copies of a few routed experts laid over a frozen fused expert table.

transformers 5 stores a layer's experts as one parameter per projection (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), so "train experts 3 and 7" cannot be said with requires_grad. `ExpertOverlay` replaces the
layer's experts module: it keeps the original module (and its tables) frozen inside, and holds the selected experts'
rows as their own parameters `gate_up_proj [S, 2I, H]` and `down_proj [S, H, I]` (S = selected experts, in the
order of `expert_ids`). Only these get gradients and optimizer state; the base tables are never written.

Its forward is transformers' eager experts loop, taking each expert's weights from the overlay when the expert is
selected and from the base table otherwise. It deliberately does not dispatch on `config._experts_implementation`
(grouped_mm, batched_mm...): those read the fused tables directly and would bypass the overlay. With the base model
also on "eager", logits match the merged model bit for bit.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from moeserve.training.esft.layout import layer_prefix, moe_blocks, non_expert_params, shared_expert_params

logger = logging.getLogger(__name__)


class ExpertOverlay(nn.Module):
    """A MoE layer's experts with the experts in `expert_ids` replaced by trainable copies."""

    def __init__(self, base: nn.Module, expert_ids: list[int], scores: torch.Tensor | None = None) -> None:
        super().__init__()
        if not expert_ids:
            raise ValueError("an expert overlay needs at least one expert")
        base.requires_grad_(False)
        self.base = base
        self.expert_ids = list(expert_ids)
        self.num_experts = base.gate_up_proj.shape[0]
        self.slot = {e: s for s, e in enumerate(self.expert_ids)}  # expert id -> overlay row
        ids = torch.tensor(self.expert_ids, device=base.gate_up_proj.device)
        self.gate_up_proj = nn.Parameter(base.gate_up_proj.detach()[ids].clone())  # [S, 2I, H]
        self.down_proj = nn.Parameter(base.down_proj.detach()[ids].clone())  # [S, H, I]
        # The layer's ESFT scores [E] (float32), saved with the adapter for inspection; not used in the forward.
        self.register_buffer("scores", None if scores is None else scores.detach().float().cpu(), persistent=False)

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, as the forward uses them."""
        slot = self.slot.get(expert)
        if slot is None:
            return self.base.gate_up_proj[expert], self.base.down_proj[expert]
        return self.gate_up_proj[slot], self.down_proj[slot]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]. The same operations, in the
        same order, as transformers' eager experts forward."""
        final_hidden_states = torch.zeros_like(hidden_states)  # [T, H]
        with torch.no_grad():
            # num_classes E + 1 like transformers: expert-parallel sentinels (id E) are dropped, not an error.
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, K, T]
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit[:, 0].tolist():
            if expert_idx == self.num_experts:
                continue
            gate_up, down = self.expert_weights(expert_idx)
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, gate_up).chunk(2, dim=-1)
            current_hidden_states = self.base.act_fn(gate) * up
            current_hidden_states = F.linear(current_hidden_states, down)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base experts module with the overlay's rows written into its tables (the base is modified)."""
        ids = torch.tensor(self.expert_ids, device=self.base.gate_up_proj.device)
        self.base.gate_up_proj.index_copy_(0, ids, self.gate_up_proj.to(self.base.gate_up_proj.dtype))
        self.base.down_proj.index_copy_(0, ids, self.down_proj.to(self.base.down_proj.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"experts={self.expert_ids} of {self.num_experts}"


def install_overlays(
    model: PreTrainedModel, experts: dict[int, list[int]], scores: dict[int, torch.Tensor] | None = None
) -> dict[int, ExpertOverlay]:
    """Replaces the experts module of each layer in `experts` by an ExpertOverlay of the listed experts."""
    blocks = moe_blocks(model)
    installed = {}
    for layer, ids in sorted(experts.items()):
        block = blocks[layer]
        if isinstance(block.experts, ExpertOverlay):
            raise ValueError(f"layer {layer} already has an ESFT overlay")
        block.experts = ExpertOverlay(block.experts, ids, None if scores is None else scores.get(layer))
        installed[layer] = block.experts
    return installed


def overlays(model: PreTrainedModel) -> dict[int, ExpertOverlay]:
    """Decoder layer -> its ExpertOverlay, for the layers that have one."""
    return {layer: b.experts for layer, b in moe_blocks(model).items() if isinstance(b.experts, ExpertOverlay)}


def remove_overlays(model: PreTrainedModel) -> PreTrainedModel:
    """Writes every overlay into its base table and puts the plain experts module back: an ordinary model again."""
    for block in moe_blocks(model).values():
        if isinstance(block.experts, ExpertOverlay):
            block.experts = block.experts.merged()
    return model


def set_trainable(model: PreTrainedModel, shared_experts: bool, non_expert_modules: bool) -> dict[str, nn.Parameter]:
    """Freezes everything but the overlays (and, if asked, the shared experts / non-expert modules).

    The router is always frozen: the point of ESFT is that the base model's routing picks the trained experts.
    Returns name -> parameter of what will train.
    """
    model.requires_grad_(False)
    trainable = {}
    for layer, overlay in overlays(model).items():
        prefix = f"{layer_prefix(model, layer)}.mlp.experts"
        trainable[f"{prefix}.gate_up_proj"] = overlay.gate_up_proj
        trainable[f"{prefix}.down_proj"] = overlay.down_proj
    if shared_experts:
        shared = shared_expert_params(model)
        if not shared:
            raise ValueError(f"{model.config.model_type} has no shared experts to train")
        trainable.update(shared)
    if non_expert_modules:
        trainable.update(non_expert_params(model))
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable

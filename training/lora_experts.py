"""A frozen linear + E small experts + a router: the one module behind MoLoRA, MoV, LoRAMoE and MoLA.

Legend: T tokens, E experts, r rank, K router top-k, M samples in a batch, in/out the linear's feature sizes.

For a wrapped linear `W` (weight [out, in], optional bias b) and a token x:

- router: `p = softmax(W_r z)` over the E experts, `W_r [E, in_r]` bias-free, init N(0, 0.02). z is x for LoRA
  experts; for IA3 experts it is the activation being rescaled (W x + b for an output-scaled target, x for an
  input-scaled one). Soft routing uses g = p. Top-k routing keeps the k = min(K, E) largest p (ties: lower index
  first, as torch.topk) and zeroes the rest; with `renormalize` the kept weights are divided by their sum (MoLA).
- LoRA experts (MoLoRA, LoRAMoE, MoLA): `y = W x + b + (alpha / r) * sum_e g_e * B_e (A_e x)`.
  A init as PEFT (kaiming-uniform, a = sqrt(5), per expert), B zero, so a fresh adapter is the identity.
- IA3 experts (MoV): the vectors are merged first, `l = sum_e g_e * l_e`, then `y = (W x + b) * l` for an
  output-scaled target (k_proj, v_proj) or `y = W (x * l) + b` for an input-scaled one (down_proj: the FFN
  intermediate activation). l_e init to ones, so a fresh adapter is the identity.

Saved tensors (adapter_model.safetensors), for every adapted module `<path>` (its transformers module name, e.g.
`model.layers.0.self_attn.q_proj`), all float32:

    <path>.router.weight   [E, in_r]    in_r = in for LoRA experts; for IA3 the dimension it scales
    <path>.lora_A          [E, r, in]   LoRA experts
    <path>.lora_B          [E, out, r]  LoRA experts
    <path>.ia3             [E, dim]     IA3 experts; dim = out for an output-scaled target, in for an input-scaled one

E may differ between decoder layers (MoLA); within one module it is the first dimension of each of its tensors.

Auxiliary losses, computed from the router outputs of the last training forward pass:

- MoLA (Switch-style, per decoder layer l, the tokens of all its adapted modules pooled):
  `L_l = E_l * sum_e f_e P_e`, f_e = share of the T*k top-k assignments that went to e, P_e = mean router
  probability of e (as GCYZSL/MoLA's load_balancing_loss_func); the loss is `coef * sum_l L_l`.
- LoRAMoE localized balancing (per adapted module): `Q[n, m]` = router weight of expert n summed over the tokens of
  sample m; `I[n, m] = 1 + delta` if expert n's group matches sample m's type else `1 - delta`; `Z = I * Q`;
  `L = var(Z) / mean(Z)` (paper) or `var(Z) / mean(Z)^2` (reference code); the loss is `coef * sum_modules L`.
  var is torch's default (unbiased), as the reference code. The task group is experts [0, E - W) (type 1 samples),
  the world-knowledge group the last W experts (type 0 samples), as the reference code orders its two halves.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

EXPERT_KINDS = ("lora", "ia3")
AUX_LOSSES = ("none", "switch", "lbc")
LBC_VARIANTS = ("paper", "code")

# MoLA's expert counts for 4 equal groups of decoder layers, lowest layers first.
ALLOCATIONS: dict[str, tuple[int, int, int, int]] = {
    "triangle": (8, 6, 4, 2),
    "inverted-triangle": (2, 4, 6, 8),
    "hourglass": (8, 2, 2, 8),
    "square": (5, 5, 5, 5),
}

ROUTER_INIT_STD = 0.02
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def mola_allocation(allocation: str | list[int], num_layers: int) -> list[int]:
    """Experts per decoder layer for a MoLA preset name, or an explicit per-layer list (checked and returned).

    The layers are split into 4 consecutive groups as evenly as possible, like numpy.array_split: each group has
    num_layers // 4 layers and the first num_layers % 4 groups one more (10 layers: 3, 3, 2, 2). With fewer than
    4 layers the last groups are empty (2 layers of inverted-triangle: [2, 4]).
    """
    if num_layers < 1:
        raise ValueError(f"a model needs at least one decoder layer, got {num_layers}")
    if not isinstance(allocation, str):
        counts = [int(n) for n in allocation]
        if len(counts) != num_layers or any(n < 1 for n in counts):
            raise ValueError(
                f"an explicit MoLA allocation needs one positive expert count per decoder layer ({num_layers}), "
                f"got {counts}"
            )
        return counts
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown MoLA allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    base, extra = divmod(num_layers, 4)
    counts: list[int] = []
    for group, experts in enumerate(ALLOCATIONS[allocation]):
        counts += [experts] * (base + (1 if group < extra else 0))
    return counts


@dataclass
class ExpertsConfig:
    """How every adapted linear of one adapter is built, routed and regularised."""

    kind: str  # "lora" (A, B matrices) or "ia3" (scaling vectors)
    target_modules: list[str]  # module-name suffixes, matched at a dot boundary (as PEFT does)
    num_experts: int | list[int]  # per module, or per decoder layer
    rank: int = 4  # LoRA experts only
    alpha: float = 16.0  # LoRA experts only; the delta is scaled by alpha / rank
    dropout: float = 0.0  # on the LoRA experts' input (not the router's), as PEFT's lora_dropout
    top_k: int | None = None  # None: soft routing over all experts
    renormalize: bool = False  # divide the kept top-k weights by their sum
    ia3_scale_input: list[str] = field(default_factory=list)  # IA3 targets that scale their input, not output
    aux_loss: str = "none"  # "none", "switch" (MoLA) or "lbc" (LoRAMoE)
    aux_loss_coef: float = 0.0
    num_world_experts: int = 0  # LoRAMoE's world-knowledge group: the last W experts
    lbc_delta: float = 0.1
    lbc_variant: str = "paper"  # "paper" var/mean, "code" var/mean^2

    def __post_init__(self) -> None:
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"expert kind must be one of {EXPERT_KINDS}, got {self.kind!r}")
        if not self.target_modules:
            raise ValueError("at least one target module is needed")
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if not counts or any(int(n) < 1 for n in counts):
            raise ValueError(f"expert counts must be positive, got {self.num_experts}")
        if self.kind == "lora" and self.rank < 1:
            raise ValueError(f"LoRA experts need a positive rank, got {self.rank}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k must be positive (or None for soft routing), got {self.top_k}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")
        if self.lbc_variant not in LBC_VARIANTS:
            raise ValueError(f"LBC variant must be one of {LBC_VARIANTS}, got {self.lbc_variant!r}")
        if self.aux_loss == "lbc":
            if isinstance(self.num_experts, list):
                raise ValueError("the localized balancing loss needs one expert count for every module")
            if not 1 <= self.num_world_experts < self.num_experts:
                raise ValueError(
                    f"LoRAMoE needs 1 <= world experts < experts, got {self.num_world_experts} of {self.num_experts}"
                )

    def experts_in_layer(self, layer: int | None) -> int:
        if not isinstance(self.num_experts, list):
            return self.num_experts
        if layer is None or layer >= len(self.num_experts):
            raise ValueError(f"per-layer expert counts ({len(self.num_experts)} layers) do not cover layer {layer}")
        return self.num_experts[layer]


def layer_index(module_path: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.3.mlp.up_proj` -> 3), or None outside the layers."""
    match = _LAYER_INDEX.search(module_path)
    return int(match.group(1)) if match else None


def route(logits: torch.Tensor, top_k: int | None, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities and the weights the experts are mixed with, both [..., E] float32."""
    probs = torch.softmax(logits.float(), dim=-1)
    num_experts = probs.shape[-1]
    if top_k is None or top_k >= num_experts:
        return probs, probs
    kept, ids = probs.topk(top_k, dim=-1)  # [..., k]
    if renormalize:
        kept = kept / kept.sum(dim=-1, keepdim=True)
    return probs, torch.zeros_like(probs).scatter(-1, ids, kept)


class LoRAExpertsLinear(nn.Module):
    """Wraps a frozen nn.Linear with E LoRA or IA3 experts and a router (see the module docstring)."""

    def __init__(
        self, base_layer: nn.Linear, kind: str, num_experts: int, rank: int, alpha: float, *,
        top_k: int | None, renormalize: bool, scale_input: bool, dropout: float, layer: int | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.scale_input = scale_input
        self.layer = layer
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        # Adapter tensors stay float32 whatever the base dtype, as PEFT's autocast_adapter_dtype does.
        if kind == "lora":
            router_in = in_f
            self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_f, device=device))  # [E, r, in]
            self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, rank, device=device))  # [E, out, r]
        else:
            router_in = in_f if scale_input else out_f
            self.ia3 = nn.Parameter(torch.ones(num_experts, router_in, device=device))  # [E, dim]
        self.router = nn.Linear(router_in, num_experts, bias=False, device=device)  # weight [E, in_r]
        self.reset_parameters()
        # The last training forward's router outputs, [..., E], kept with their graph for the auxiliary losses.
        self.router_probs: torch.Tensor | None = None
        self.router_weights: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=ROUTER_INIT_STD)
        if self.kind == "lora":
            for expert in self.lora_A:  # per expert: kaiming on the whole [E, r, in] would see fan_in = r * in
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            self.lora_B.zero_()
        else:
            self.ia3.fill_(1.0)

    # Code that reads a projection's weight directly (dtype checks, weight absorption) sees the frozen base.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _gates(self, z: torch.Tensor) -> torch.Tensor:
        logits = F.linear(z.to(self.router.weight.dtype), self.router.weight)  # [..., E]
        probs, gates = route(logits, self.top_k, self.renormalize)
        if self.training:
            self.router_probs, self.router_weights = probs, gates
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ia3":
            return self._forward_ia3(x)
        result = self.base_layer(x)
        gates = self._gates(x)  # [..., E]
        num_experts, rank, in_f = self.lora_A.shape
        xa = self.dropout(x).to(self.lora_A.dtype)
        # All experts at once: [..., in] @ [in, E*r] -> [..., E, r], gated, then [..., E*r] @ [E*r, out].
        h = F.linear(xa, self.lora_A.reshape(num_experts * rank, in_f)).unflatten(-1, (num_experts, rank))
        h = (h * gates.unsqueeze(-1)).flatten(-2)  # [..., E*r]
        b = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], num_experts * rank)  # [out, E*r]
        return result + (F.linear(h, b) * self.scaling).to(result.dtype)

    def _forward_ia3(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            scale = self._gates(x) @ self.ia3  # [..., in]
            return self.base_layer(x * scale.to(x.dtype))
        y = self.base_layer(x)
        scale = self._gates(y) @ self.ia3  # [..., out]
        return y * scale.to(y.dtype)


def _matches(module_path: str, suffix: str) -> bool:
    return module_path == suffix or module_path.endswith("." + suffix)


def add_experts(model: nn.Module, config: ExpertsConfig) -> list[str]:
    """Wraps every nn.Linear whose name ends with a target suffix; freezes everything but the experts and routers.

    Returns the adapted module paths. Routed experts of transformers-5 MoE blocks are fused 3-D parameters
    (`mlp.experts.gate_up_proj`), not nn.Linear, so they are never targets; shared experts and dense MLPs are.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(_matches(name, t) for t in config.target_modules)
    ]
    if not targets:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no nn.Linear matches target modules {config.target_modules}; this model's linears end with: "
            f"{', '.join(linears)}"
        )
    unmatched = [t for t in config.target_modules if not any(_matches(name, t) for name, _ in targets)]
    if unmatched:
        logger.warning("target modules %s match no nn.Linear in this model", unmatched)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in targets:
        layer = layer_index(name)
        wrapped = LoRAExpertsLinear(
            linear, config.kind, config.experts_in_layer(layer), config.rank, config.alpha,
            top_k=config.top_k, renormalize=config.renormalize, dropout=config.dropout, layer=layer,
            scale_input=any(_matches(name, t) for t in config.ia3_scale_input),
        )  # fmt: skip
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
    return [name for name, _ in targets]


def expert_modules(model: nn.Module) -> dict[str, LoRAExpertsLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExpertsLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names of the serving contract (module docstring), detached and contiguous."""
    tensors: dict[str, torch.Tensor] = {}
    for path, module in expert_modules(model).items():
        tensors[f"{path}.router.weight"] = module.router.weight
        if module.kind == "lora":
            tensors[f"{path}.lora_A"] = module.lora_A
            tensors[f"{path}.lora_B"] = module.lora_B
        else:
            tensors[f"{path}.ia3"] = module.ia3
    return {name: t.detach().contiguous() for name, t in tensors.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies saved adapter tensors into a model prepared with `add_experts`; names and shapes must match exactly."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not match the adapted model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if value.shape != own[name].shape:
            raise ValueError(f"adapter tensor {name} has shape {list(value.shape)}, expected {list(own[name].shape)}")
        params[name].copy_(value)


def expert_sample_load(weights: torch.Tensor, sample_index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Q[n, m]: the router weight of expert n summed over the tokens of sample m.

    weights [T, E]; sample_index [T] (the sample each token belongs to, -1 for padding, which is left out).
    Returns [E, M] with M = num_samples.
    """
    keep = sample_index >= 0
    one_hot = F.one_hot(sample_index[keep], num_samples).to(weights.dtype)  # [T', M]
    return weights[keep].transpose(0, 1) @ one_hot


def localized_balancing_loss(
    load: torch.Tensor, sample_types: torch.Tensor, num_world_experts: int, delta: float, variant: str = "paper"
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint for one router.

    load [E, M] is Q (`expert_sample_load`); sample_types [M] are 0 (world knowledge) or 1 (task). The task group
    is experts [0, E - W), the world group the last W.
    """
    if variant not in LBC_VARIANTS:
        raise ValueError(f"LBC variant must be one of {LBC_VARIANTS}, got {variant!r}")
    num_experts = load.shape[0]
    world_expert = torch.arange(num_experts, device=load.device) >= num_experts - num_world_experts  # [E]
    world_sample = sample_types.to(load.device) == 0  # [M]
    matches = world_expert.unsqueeze(1) == world_sample.unsqueeze(0)  # [E, M]
    importance = torch.where(matches, 1.0 + delta, 1.0 - delta).to(load.dtype)
    z = importance * load
    mean = z.mean()
    return z.var() / (mean if variant == "paper" else mean * mean)


def switch_balance_loss(probs: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """MoLA's Switch-style loss for one layer: E * sum_e f_e P_e.

    probs [T, E] router probabilities; f_e is the share of the T*k top-k assignments (k = min(top_k, E), all E
    when top_k is None) that went to expert e, P_e the mean probability of e.
    """
    num_experts = probs.shape[-1]
    k = num_experts if top_k is None else min(top_k, num_experts)
    chosen = probs.topk(k, dim=-1).indices.reshape(-1)  # [T*k]
    share = torch.bincount(chosen, minlength=num_experts).to(probs.dtype) / chosen.numel()  # [E]
    return num_experts * (share * probs.mean(dim=0)).sum()


def experts_aux_loss(
    model: nn.Module, config: ExpertsConfig, sample_index: torch.Tensor | None, sample_type: torch.Tensor | None
) -> torch.Tensor | None:
    """The configured auxiliary loss over the last training forward pass, or None when there is none.

    sample_index / sample_type [B, L] (from the packing collator) say which sample of the batch each token belongs
    to (-1: padding) and that sample's type. Without them every row is one sample of type 1, and no token is padding.
    """
    if config.aux_loss == "none" or config.aux_loss_coef == 0.0:
        return None
    modules = [m for m in expert_modules(model).values() if m.router_probs is not None]
    if not modules:
        return None
    shape = modules[0].router_probs.shape[:-1]  # [B, L]
    device = modules[0].router_probs.device
    if sample_index is None:
        rows = torch.arange(shape[0], device=device).unsqueeze(1)
        sample_index = rows.expand(shape)
        sample_type = torch.ones(shape, dtype=torch.long, device=device)
    index = sample_index.reshape(-1).to(device)  # [T]
    if config.aux_loss == "switch":
        return config.aux_loss_coef * _pooled_switch_loss(modules, index, config.top_k)
    num_samples = int(index.max()) + 1
    types = torch.ones(num_samples, dtype=torch.long, device=device)
    keep = index >= 0
    types[index[keep]] = sample_type.reshape(-1).to(device)[keep].long()
    total = sum(
        localized_balancing_loss(
            expert_sample_load(m.router_weights.reshape(-1, m.num_experts), index, num_samples),
            types, config.num_world_experts, config.lbc_delta, config.lbc_variant,
        )  # fmt: skip
        for m in modules
    )
    return config.aux_loss_coef * total


def _pooled_switch_loss(modules: list[LoRAExpertsLinear], index: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Sum over decoder layers of the Switch loss on the layer's pooled tokens (all its adapted modules)."""
    keep = index >= 0
    per_layer: dict[int | None, list[torch.Tensor]] = {}
    for m in modules:
        per_layer.setdefault(m.layer, []).append(m.router_probs.reshape(-1, m.num_experts)[keep])
    return sum(switch_balance_loss(torch.cat(probs), top_k) for probs in per_layer.values())

"""The four LoRA-expert methods as configurations of one module, and the `AdapterMethod` that trains them.

MoLoRA, MoV, LoRAMoE and MoLA differ only in their `ExpertsConfig` (lora_experts.py): expert kind, default targets,
expert count, rank/alpha, routing and auxiliary loss. Defaults follow methods.md and the reference code:

| method  | experts        | targets                    | E                 | r/alpha | routing         | aux loss     |
|---------|----------------|----------------------------|-------------------|---------|-----------------|--------------|
| molora  | LoRA           | q, k, v, o, gate, up, down | 10                | 4/16    | soft            | -            |
| mov     | IA3 vectors    | k, v, down (its input)     | 10                | -       | soft            | -            |
| loramoe | LoRA, 2 groups | gate, up, down             | 8 (6 + 2 world)   | 4/32    | soft (or top-k) | LBC 0.1      |
| mola    | LoRA           | q, k, v, o, gate, up, down | inverted-triangle | 8/16    | top-2, renorm   | Switch 0.001 |

Plain LoRA (PEFT, q, k, v, o, r/alpha 8/16) is training/lora.py; all methods by name: training/method_registry.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from moeserve.adapters import WEIGHTS_NAME, AdapterConfig, AdapterError, base_fingerprint
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.lora_experts import (
    ExpertsConfig,
    adapter_state_dict,
    add_experts,
    experts_aux_loss,
    load_adapter_state_dict,
    mola_allocation,
)

logger = logging.getLogger(__name__)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ExpertsDefaults:
    """A LoRA-expert method's defaults; the command line overrides any of them."""

    kind: str
    targets: list[str]
    num_experts: int | None  # None: from the MoLA allocation
    rank: int | None  # None: IA3 experts have no rank
    alpha: float | None
    top_k: int | None = None
    renormalize: bool = False
    aux_loss: str = "none"
    aux_loss_coef: float = 0.0
    num_world_experts: int = 0
    allocation: str | None = None
    ia3_scale_input: list[str] = field(default_factory=list)


EXPERT_METHODS: dict[str, ExpertsDefaults] = {
    "molora": ExpertsDefaults("lora", ATTENTION + FFN, num_experts=10, rank=4, alpha=16.0),
    "mov": ExpertsDefaults(
        "ia3", ["k_proj", "v_proj", "down_proj"], num_experts=10, rank=None, alpha=None, ia3_scale_input=["down_proj"]
    ),
    # The reference script ships the balancing loss switched off (blc_weight 0); 0.1 is moeserve's default.
    "loramoe": ExpertsDefaults(
        "lora", FFN, num_experts=8, rank=4, alpha=32.0, aux_loss="lbc", aux_loss_coef=0.1, num_world_experts=2
    ),
    "mola": ExpertsDefaults(
        "lora", ATTENTION + FFN, num_experts=None, rank=8, alpha=16.0, top_k=2, renormalize=True,
        aux_loss="switch", aux_loss_coef=0.001, allocation="inverted-triangle",
    ),  # fmt: skip
}


def experts_config(name: str, options: MethodOptions, num_layers: int) -> ExpertsConfig:
    """The `ExpertsConfig` of a LoRA-expert method: its defaults, overridden by the options that are set."""
    d = EXPERT_METHODS[name]
    if d.kind == "ia3" and (options.rank is not None or options.alpha is not None):
        raise ValueError(f"{name}'s experts are IA3 vectors: rank and alpha do not apply")
    if options.allocation is not None and d.allocation is None:
        raise ValueError(f"--allocation is for mola only, not {name}")
    if options.allocation is not None and options.num_experts is not None:
        raise ValueError("give either a MoLA allocation preset or explicit expert counts, not both")
    num_experts: int | list[int]
    if options.num_experts is not None:
        num_experts = options.num_experts
        if isinstance(num_experts, list):
            num_experts = mola_allocation(num_experts, num_layers)  # checks one positive count per layer
    elif d.allocation is not None:
        num_experts = mola_allocation(options.allocation or d.allocation, num_layers)
    else:
        num_experts = d.num_experts
    return ExpertsConfig(
        kind=d.kind,
        target_modules=list(options.target_modules or d.targets),
        num_experts=num_experts,
        rank=options.rank or d.rank or 1,
        alpha=options.alpha if options.alpha is not None else (d.alpha or 1.0),
        dropout=options.dropout,
        top_k=options.top_k if options.top_k is not None else d.top_k,
        renormalize=d.renormalize,
        ia3_scale_input=list(d.ia3_scale_input),
        aux_loss=d.aux_loss,
        aux_loss_coef=options.aux_loss_coef if options.aux_loss_coef is not None else d.aux_loss_coef,
        num_world_experts=options.num_world_experts if options.num_world_experts is not None else d.num_world_experts,
        lbc_delta=options.lbc_delta,
        lbc_variant=options.lbc_variant,
    )


def _to_adapter_config(
    name: str, config: ExpertsConfig, model: PreTrainedModel, allocation: str | None
) -> AdapterConfig:
    lora = config.kind == "lora"
    extra = {"aux_loss": config.aux_loss, "aux_loss_coef": config.aux_loss_coef, "dropout": config.dropout}
    if config.aux_loss == "lbc":
        extra |= {"lbc_delta": config.lbc_delta, "lbc_variant": config.lbc_variant}
    if allocation is not None:
        extra["allocation"] = allocation
    return AdapterConfig(
        method=name,
        base_model_name=model.name_or_path,
        base_fingerprint=base_fingerprint(model.config),
        target_modules=config.target_modules,
        rank=config.rank if lora else None,
        alpha=config.alpha if lora else None,
        num_experts=config.num_experts,
        top_k=config.top_k,
        renormalize=config.renormalize,
        expert_kind=config.kind,
        num_world_experts=config.num_world_experts,
        ia3_scale_input=config.ia3_scale_input,
        extra=extra,
    )


def _from_adapter_config(config: AdapterConfig) -> ExpertsConfig:
    extra = config.extra
    return ExpertsConfig(
        kind=config.expert_kind,
        target_modules=list(config.target_modules),
        num_experts=config.num_experts if config.num_experts is not None else 1,
        rank=config.rank or 1,
        alpha=config.alpha if config.alpha is not None else 1.0,
        top_k=config.top_k,
        renormalize=config.renormalize,
        ia3_scale_input=list(config.ia3_scale_input),
        aux_loss=extra.get("aux_loss", "none"),
        aux_loss_coef=extra.get("aux_loss_coef", 0.0),
        num_world_experts=config.num_world_experts,
        lbc_delta=extra.get("lbc_delta", 0.1),
        lbc_variant=extra.get("lbc_variant", "paper"),
    )


class LoRAExpertsMethod:
    """MoLoRA, MoV, LoRAMoE or MoLA: `LoRAExpertsLinear` on every target, configured per method."""

    def __init__(self, name: str) -> None:
        if name not in EXPERT_METHODS:
            raise ValueError(f"{name!r} is not a LoRA-expert method; those are {', '.join(EXPERT_METHODS)}")
        self.name = name
        self.config: ExpertsConfig | None = None  # set by prepare / apply; the aux loss reads it

    def prepare(
        self, model: PreTrainedModel, options: MethodOptions, train_token_ids: list[list[int]]
    ) -> AdapterConfig:
        self.config = experts_config(self.name, options, model.config.num_hidden_layers)
        paths = add_experts(model, self.config)
        logger.info("%s: experts on %d modules (%s)", self.name, len(paths), ", ".join(self.config.target_modules))
        allocation = None
        if EXPERT_METHODS[self.name].allocation is not None and options.num_experts is None:
            allocation = options.allocation or EXPERT_METHODS[self.name].allocation
        return _to_adapter_config(self.name, self.config, model, allocation)

    def aux_loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.config is None:
            raise ValueError(f"{self.name}: aux_loss called before prepare")
        return experts_aux_loss(model, self.config, batch.get("sample_index"), batch.get("sample_type"))

    def save(self, model: PreTrainedModel, config: AdapterConfig, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.cpu() for name, t in adapter_state_dict(model).items()}
        save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(out_dir)
        logger.info("saved %s adapter (%d tensors) to %s", self.name, len(tensors), out_dir)

    def apply(self, model: PreTrainedModel, config: AdapterConfig, adapter_dir: Path) -> PreTrainedModel:
        if config.method != self.name:
            raise AdapterError(f"{adapter_dir} holds a {config.method} adapter, not {self.name}")
        config.check_base(model.config)
        self.config = _from_adapter_config(config)
        add_experts(model, self.config)
        device = next(model.parameters()).device
        try:
            load_adapter_state_dict(model, load_file(str(Path(adapter_dir) / WEIGHTS_NAME), device=str(device)))
        except ValueError as exc:
            raise AdapterError(f"{adapter_dir}: {exc}") from exc
        return model

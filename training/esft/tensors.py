"""The tensors of an ESFT adapter: collecting them from a trained model, checking a saved file, and writing them into
a base model's fused expert tables. The naming contract is in `moeserve.training.esft.esft_method`'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from moeserve.adapters import WEIGHTS_NAME, AdapterConfig, AdapterError
from moeserve.training.esft.layout import (
    check_experts,
    expert_tensor_name,
    moe_blocks,
    non_expert_params,
    scores_tensor_name,
    shared_expert_params,
)
from moeserve.training.esft.overlay import ExpertOverlay, overlays


def config_experts(config: AdapterConfig) -> dict[int, list[int]]:
    """The adapter config's `experts` with integer layer keys."""
    return {int(layer): list(ids) for layer, ids in (config.experts or {}).items()}


def split_expert(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's fused rows (gate_up [2I, H], down [H, I]) as the per-expert projections (proj -> weight)."""
    inter = gate_up.shape[0] // 2
    return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:], "down_proj": down}


def collect_tensors(model: PreTrainedModel, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The adapter's tensors from a model prepared by ESFT (overlays installed), as they are saved."""
    installed = overlays(model)
    listed = config_experts(config)
    if {layer: ov.expert_ids for layer, ov in installed.items()} != listed:
        raise ValueError("the model's ESFT overlays do not match the adapter config's experts")
    tensors: dict[str, torch.Tensor] = {}
    for layer, overlay in installed.items():
        for slot, expert in enumerate(overlay.expert_ids):
            for proj, w in split_expert(overlay.gate_up_proj[slot], overlay.down_proj[slot]).items():
                tensors[expert_tensor_name(layer, expert, proj)] = w
        if overlay.scores is not None:
            tensors[scores_tensor_name(layer)] = overlay.scores.float()
    if config.train_shared_experts:
        tensors.update(shared_expert_params(model))
    if config.train_non_expert_modules:
        tensors.update(non_expert_params(model))
    # Own storage per tensor: safetensors refuses views that share memory (gate and up are halves of one row).
    return {name: t.detach().to("cpu").clone().contiguous() for name, t in tensors.items()}


def write_adapter(out_dir: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "moeserve_method": config.method})


def read_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of adapter_model.safetensors; AdapterError if the file is missing, truncated or corrupt."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"adapter weights {path} are missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from exc


def expected_shapes(model: PreTrainedModel, config: AdapterConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required name -> shape, optional name -> shape) of the tensors `config` says the adapter holds, for `model`
    (a plain base model, no overlays). The per-layer scores are optional (an imported adapter has none)."""
    experts = config_experts(config)
    try:
        check_experts(model, experts)
    except ValueError as exc:
        raise AdapterError(f"adapter does not fit the base model: {exc}") from exc
    blocks = moe_blocks(model)
    required: dict[str, tuple] = {}
    for layer, ids in experts.items():
        table = _experts_module(blocks[layer])
        for expert in ids:
            for proj, w in split_expert(table.gate_up_proj[expert], table.down_proj[expert]).items():
                required[expert_tensor_name(layer, expert, proj)] = tuple(w.shape)
    if config.train_shared_experts:
        required.update({n: tuple(p.shape) for n, p in shared_expert_params(model).items()})
    if config.train_non_expert_modules:
        required.update({n: tuple(p.shape) for n, p in non_expert_params(model).items()})
    optional = {scores_tensor_name(layer): (blocks[layer].gate.weight.shape[0],) for layer in experts}
    return required, optional


def check_tensors(tensors: dict[str, torch.Tensor], required: dict[str, tuple], optional: dict[str, tuple]) -> None:
    """AdapterError naming the first missing, unexpected or wrongly shaped tensor."""
    missing = sorted(set(required) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterError(f"adapter is missing tensor {missing[0]}{more}")
    extra = sorted(set(tensors) - set(required) - set(optional))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise AdapterError(f"adapter has unexpected tensor {extra[0]}{more}: not listed by its adapter_config.json")
    for name, tensor in tensors.items():
        shape = required.get(name, optional.get(name))
        if tuple(tensor.shape) != shape:
            raise AdapterError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the base model needs {shape}")
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter tensor {name} has dtype {tensor.dtype}, expected a floating point type")


@torch.no_grad()
def write_into_model(model: PreTrainedModel, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Copies checked adapter tensors into `model`: experts into their rows of the fused tables, the rest by name."""
    blocks = moe_blocks(model)
    for layer, ids in config_experts(config).items():
        table = _experts_module(blocks[layer])
        for expert in ids:
            rows = split_expert(table.gate_up_proj[expert], table.down_proj[expert])
            for proj, dest in rows.items():
                dest.copy_(tensors[expert_tensor_name(layer, expert, proj)])
    named = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name in named:  # shared-expert and non-expert tensors keep their transformers names
            named[name].copy_(tensor)


def _experts_module(block: nn.Module) -> nn.Module:
    if isinstance(block.experts, ExpertOverlay):
        raise AdapterError("an ESFT adapter is applied to a plain base model, and this one has ESFT overlays")
    return block.experts

"""Adapters for serving tests, made the way their formats define them (ESFT experts, PEFT LoRA), with references."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moeserve.adapters import AdapterConfig, base_fingerprint


def make_esft(base_dir: Path, out: Path, seed: int, experts_per_layer: int = 2) -> tuple[Path, torch.nn.Module]:
    """An ESFT adapter fine-tuning a few experts per MoE layer (weights perturbed), and the merged HF reference."""
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    experts: dict[str, list[int]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for layer, block in enumerate(ref.model.layers):
        table = getattr(block.mlp, "experts", None)
        if table is None or not hasattr(table, "gate_up_proj"):
            continue
        num, two_inter, _ = table.gate_up_proj.shape
        chosen = torch.randperm(num, generator=g)[:experts_per_layer].tolist()
        experts[str(layer)] = chosen
        with torch.no_grad():
            for e in chosen:
                table.gate_up_proj[e] += 0.3 * torch.randn(table.gate_up_proj[e].shape, generator=g)
                table.down_proj[e] += 0.3 * torch.randn(table.down_proj[e].shape, generator=g)
                inter = two_inter // 2
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                tensors[f"{prefix}.gate_proj.weight"] = table.gate_up_proj[e, :inter].clone()
                tensors[f"{prefix}.up_proj.weight"] = table.gate_up_proj[e, inter:].clone()
                tensors[f"{prefix}.down_proj.weight"] = table.down_proj[e].clone()
    out.mkdir(parents=True, exist_ok=True)
    AdapterConfig(
        method="esft-gate",
        base_model_name=str(base_dir),
        base_fingerprint=base_fingerprint(AutoConfig.from_pretrained(base_dir)),
        experts=experts,
        score_kind="gate",
        threshold=0.1,
        score_source="softmax",
    ).save(out)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out, ref


def make_peft_lora(
    base_dir: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    targets=("q_proj", "v_proj", "down_proj"),
    scale: float = 0.2,
    **lora_kwargs,
):
    """A PEFT LoRA adapter with non-zero B (so it changes the output; `scale`: its entries' spread), and the PEFT
    model as reference.

    lora_kwargs go to LoraConfig (target_parameters, rank_pattern, alpha_pattern, use_rslora, ...)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = targets if isinstance(targets, str) else list(targets)  # a string: PEFT's shorthand, "all-linear"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, **lora_kwargs)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out, model.eval()


def write_config_field(adapter_dir: Path, **fields) -> None:
    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


EXPERT_TABLES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_peft_expert_lora(base_dir: Path, out: Path, seed: int, rank: int = 4, targets=("q_proj",), **lora_kwargs):
    """make_peft_lora with LoRA on the fused routed-expert tables too (PEFT target_parameters)."""
    lora_kwargs.setdefault("target_parameters", list(EXPERT_TABLES))
    return make_peft_lora(base_dir, out, seed, rank, targets, **lora_kwargs)

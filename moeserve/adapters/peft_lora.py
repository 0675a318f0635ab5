"""PEFT LoRA adapters, read by PEFT itself: the config through `LoraConfig.from_pretrained`, the tensors through
`load_peft_weights`, and each module's rank and alpha through PEFT's own pattern matching (`get_pattern_key`), so
`rank_pattern`, `alpha_pattern` and `use_rslora` give every module the scale PEFT gives it.

Three kinds of LoRA tensors are read (`base_model.model.` prefix, PEFT's names with the adapter name dropped):
- linears (`target_modules`): `<module>.lora_A.weight [r, in]`, `.lora_B.weight [out, r]`;
- fused expert tables (`target_parameters` on transformers 5's `mlp.experts.gate_up_proj` / `down_proj`, PEFT's
  `ParamWrapper`; several targets on one module nest as `experts.base_layer.lora_A`):
  `lora_A.weight [r*E, in]` (row e*r + i), `lora_B.weight [out, r*E]` (column i*E + e: PEFT reads it as
  `weight_B.reshape(out, r, E)`); which table a pair adapts is read from its shapes;
- the router weight (`target_parameters` `mlp.gate.weight`, which PEFT's `all-linear` adds where the router is not
  an nn.Linear: OLMoE, Qwen-MoE): `mlp.gate.lora_A.weight [r, H]`, `.lora_B.weight [E, r]`, a delta on the logits;
- per-expert linears (`experts.{e}.gate_proj` / `up_proj` / `down_proj`, or Mixtral's `w1` / `w3` / `w2`, the
  layout vLLM's FusedMoE LoRA reads): gate and up of an expert are stacked into one w13 LoRA of rank r_gate + r_up
  with a block-diagonal B.
Each module's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded into the expert tables' B when read.

What moeserve cannot serve is refused by name (REFUSED), never served wrongly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key

from moeserve.adapters.config import FORMAT_VERSION, AdapterConfig, AdapterError
from moeserve.adapters.weights import ExpertLoRAWeights, LoadedAdapter, ModuleWeights, expect, find_linear
from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.moe import Experts
from moeserve.models.router import Router

# LoraConfig fields that change what the adapter computes in ways the serving path does not: field -> why.
REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "lora_bias": "LoRA B biases (lora_bias)",
    "layer_replication": "replicated layers (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) weights",
}
_PREFIX = "base_model.model."
_PAIR = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def read_peft_config(directory: Path) -> LoraConfig:
    """The adapter's LoraConfig as PEFT parses it, refusing what moeserve cannot serve."""
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except (TypeError, ValueError, OSError) as exc:
        raise AdapterError(f"PEFT cannot read the LoRA config in {directory}: {exc}") from exc
    for name, what in REFUSED.items():
        if getattr(config, name, None):
            raise AdapterError(f"this PEFT adapter uses {what}, which moeserve does not serve")
    if config.bias != "none":
        raise AdapterError(f"this PEFT adapter trains biases (bias={config.bias!r}), which moeserve does not serve")
    return config


def check_peft_fields(data: dict[str, Any]) -> None:
    """The fields a LoRA adapter_config.json must have, with their JSON types: PEFT's own defaults (r = 8, alpha = 8)
    would otherwise stand in for a missing one, and a string where a number goes would fail later, as no 400."""

    def number(value: Any, integer: bool) -> bool:
        return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    problems = []
    if "r" not in data or not number(data["r"], True) or data["r"] < 1:
        problems.append(f"'r' must be a positive integer, got {data.get('r', 'nothing')!r}")
    if "lora_alpha" not in data or not number(data["lora_alpha"], False):
        problems.append(f"'lora_alpha' must be a number, got {data.get('lora_alpha', 'nothing')!r}")
    targets, parameters = data.get("target_modules"), data.get("target_parameters")
    if parameters is not None and not names(parameters):
        problems.append(f"'target_parameters' must be a list of names, got {parameters!r}")
    if "target_modules" not in data or not (
        names(targets) or isinstance(targets, str) or (targets is None and names(parameters) and parameters)
    ):
        problems.append(
            "'target_modules' must be a list of module names or a regex string (null only beside target_parameters),"
            f" got {data.get('target_modules', 'nothing')!r}"
        )
    if problems:
        raise AdapterError("PEFT adapter_config.json: " + "; ".join(problems))


def adapter_config_from_peft(data: dict[str, Any], directory: Path, meta: dict[str, str]) -> AdapterConfig:
    """AdapterConfig of a PEFT adapter directory (moeserve's own fields from the safetensors metadata, if any)."""
    if data.get("peft_type") != "LORA":
        raise AdapterError(f"PEFT adapter type {data.get('peft_type')!r} is not supported; only LORA is")
    check_peft_fields(data)
    config = read_peft_config(directory)
    targets = config.target_modules or []
    extra = {"target_parameters": sorted(config.target_parameters or [])} if config.target_parameters else {}
    for name in ("use_rslora", "rank_pattern", "alpha_pattern"):
        if getattr(config, name):
            extra[name] = getattr(config, name)
    return AdapterConfig(
        method="lora",
        base_model_name=meta.get("base_model_name") or config.base_model_name_or_path or "",
        base_fingerprint=meta.get("base_fingerprint"),
        target_modules=[targets] if isinstance(targets, str) else sorted(targets),
        format_version=int(meta.get("moeserve_format_version", FORMAT_VERSION)),
        rank=int(config.r),
        alpha=float(config.lora_alpha),
        extra=extra,
    )


def module_rank_and_scale(config: LoraConfig, key: str) -> tuple[int, float]:
    """(r, scale) PEFT gives the module (or targeted parameter) `key`, e.g. model.layers.0.self_attn.q_proj."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
    return int(rank), alpha / (math.sqrt(rank) if config.use_rslora else rank)


def _scale_for(config: LoraConfig, key: str, rank: int) -> float:
    expected, scale = module_rank_and_scale(config, key)
    if expected != rank:
        raise AdapterError(f"PEFT adapter tensors of {key!r} have rank {rank}, its config gives rank {expected}")
    return scale


def load_peft_lora(
    adapter: LoadedAdapter, model: DecoderForCausalLM, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Fills adapter.modules (linears) and adapter.expert_lora (routed experts) from the PEFT adapter directory.

    tensors: the weights already read (and hashed) by the caller; otherwise PEFT reads them from the directory.
    """
    config = read_peft_config(adapter.path)
    if tensors is None:
        try:
            tensors = load_peft_weights(str(adapter.path), device="cpu")
        except Exception as exc:  # safetensors and torch raise their own types for truncated or corrupt files
            raise AdapterError(f"cannot read the LoRA weights in {adapter.path}: {exc}") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _PAIR.match(key.removeprefix(_PREFIX)) if key.startswith(_PREFIX) else None
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r} in a LoRA adapter")
        pairs.setdefault(m[1], {})[m[2]] = tensor.float()
    per_expert: dict[int, dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"LoRA adapter has only {sorted(ab)} for {name!r}")
        a, b = ab["lora_A"], ab["lora_B"]
        table = name.replace(".base_layer", "")
        experts = _module(model, table, Experts)
        if experts is not None:
            _load_fused(adapter, config, model, table, experts, a, b)
            continue
        router = _module(model, table, Router)
        if router is not None:  # target_parameters on the router weight (PEFT's all-linear on OLMoE, Qwen-MoE)
            layer = next(i for i, block in enumerate(model.model.layers) if getattr(block.mlp, "gate", None) is router)
            a = expect(a, (a.shape[0], router.weight.shape[1]), f"{name}.lora_A.weight")
            b = expect(b, (router.weight.shape[0], a.shape[0]), f"{name}.lora_B.weight")
            scale = _scale_for(config, f"{table}.weight", len(a))
            adapter.router_lora[layer] = ModuleWeights(lora_a=a[None], lora_b=b[None], scale=scale)
            continue
        m = _PER_EXPERT.match(model.checkpoint_key(f"{name}.weight").removesuffix(".weight"))
        if m is not None:
            b = b * _scale_for(config, name, a.shape[0])
            per_expert.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = (a, b)
            continue
        path, linear = find_linear(model, name, name)
        a = expect(a, (a.shape[0], linear.in_features), f"{name}.lora_A.weight")
        b = expect(b, (linear.out_features, a.shape[0]), f"{name}.lora_B.weight")
        adapter.modules[path] = ModuleWeights(lora_a=a[None], lora_b=b[None], scale=_scale_for(config, name, len(a)))
    for layer, experts in per_expert.items():
        _load_per_expert(adapter, model, layer, experts)


def _module(model: DecoderForCausalLM, name: str, kind: type):
    """Our module of kind `kind` that the PEFT module name `name` means, or None."""
    try:
        module = model.get_submodule(model.checkpoint_key(name))
    except AttributeError:
        return None
    return module if isinstance(module, kind) else None


def _layer_of(model: DecoderForCausalLM, experts: Experts) -> int:
    return next(i for i, layer in enumerate(model.model.layers) if getattr(layer.mlp, "experts", None) is experts)


def _load_fused(adapter, config, model, name: str, experts: Experts, a: torch.Tensor, b: torch.Tensor) -> None:
    """One PEFT ParamWrapper pair on a fused expert table: which table it adapts follows from its shapes."""
    num, two_inter, hidden = experts.gate_up_proj.shape
    inter = two_inter // 2
    shapes = {"gate_up_proj": (hidden, two_inter), "down_proj": (inter, hidden)}  # (in, out)
    found = [p for p, (d_in, d_out) in shapes.items() if a.shape[1] == d_in and b.shape[0] == d_out]
    if len(found) != 1 or a.shape[0] % num or b.shape[1] != a.shape[0]:
        raise AdapterError(
            f"LoRA tensors of {name!r} (A {tuple(a.shape)}, B {tuple(b.shape)}) fit neither expert table of the base "
            f"model (gate_up_proj {tuple(experts.gate_up_proj.shape)}, down_proj {tuple(experts.down_proj.shape)})"
        )
    param = found[0]
    rank = a.shape[0] // num
    d_in, d_out = shapes[param]
    scale = _scale_for(config, f"{name}.{param}", rank)
    table_a = expect(a.reshape(num, rank, d_in), (num, rank, d_in), f"{name}.{param} lora_A")  # [E, r, in]
    table_b = expect(b.reshape(d_out, rank, num).permute(2, 0, 1) * scale, (num, d_out, rank), f"{name} lora_B")
    weights = adapter.expert_lora.setdefault(_layer_of(model, experts), ExpertLoRAWeights())
    if param == "gate_up_proj":
        weights.a13, weights.b13 = table_a.contiguous(), table_b.contiguous()
    else:
        weights.a2, weights.b2 = table_a.contiguous(), table_b.contiguous()


def _load_per_expert(adapter, model, layer: int, experts: dict[int, dict[str, tuple]]) -> None:
    """Per-expert LoRA pairs (scaled) of one layer stacked into its tables: gate and up share one w13 LoRA."""
    block = model.model.layers[layer].mlp
    table = getattr(block, "experts", None)
    if not isinstance(table, Experts):
        raise AdapterError(f"LoRA adapter adapts experts of layer {layer}, which is not a MoE layer of the base")
    num, two_inter, hidden = table.gate_up_proj.shape
    inter = two_inter // 2
    prefix = f"model.layers.{layer}.mlp.experts"
    for e, projs in experts.items():
        if e >= num:
            raise AdapterError(f"LoRA adapter names expert {e} of layer {layer}; the layer has {num}")
        for proj, (a, b) in projs.items():
            d_in, d_out = (inter, hidden) if proj == "down_proj" else (hidden, inter)
            expect(a, (a.shape[0], d_in), f"{prefix}.{e}.{proj}.lora_A.weight")
            expect(b, (d_out, a.shape[0]), f"{prefix}.{e}.{proj}.lora_B.weight")
    weights = adapter.expert_lora.setdefault(layer, ExpertLoRAWeights())
    r13 = max((sum(len(p[n][0]) for n in ("gate_proj", "up_proj") if n in p) for p in experts.values()), default=0)
    if r13:
        weights.a13, weights.b13 = torch.zeros(num, r13, hidden), torch.zeros(num, two_inter, r13)
        for e, p in experts.items():
            start = 0
            for half, proj in enumerate(("gate_proj", "up_proj")):
                if proj in p:
                    a, b = p[proj]
                    weights.a13[e, start : start + len(a)] = a
                    weights.b13[e, half * inter : (half + 1) * inter, start : start + len(a)] = b
                    start += len(a)
    r2 = max((len(p["down_proj"][0]) for p in experts.values() if "down_proj" in p), default=0)
    if r2:
        weights.a2, weights.b2 = torch.zeros(num, r2, inter), torch.zeros(num, hidden, r2)
        for e, p in experts.items():
            if "down_proj" in p:
                a, b = p["down_proj"]
                weights.a2[e, : len(a)], weights.b2[e, :, : len(a)] = a, b

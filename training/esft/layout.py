"""Where ESFT's pieces live in a transformers MoE model, and the names an ESFT adapter stores them under.

transformers 5 keeps a layer's routed experts as two fused tables on `model.layers.{l}.mlp.experts`:
`gate_up_proj [E, 2I, H]` (the I gate rows, then the I up rows) and `down_proj [E, H, I]`; the router is
`model.layers.{l}.mlp.gate`, whose forward returns `(router_logits [T, E], topk_weights [T, K], topk_ids [T, K])`.
Dense decoder layers (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers) have no `experts`.

An adapter names a trained expert per expert, as the ESFT reference checkpoints do, whatever the architecture's own
file layout (Mixtral's `block_sparse_moe.experts.{e}.w1` is still stored as `mlp.experts.{e}.gate_proj`).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

# The probability ESFT reads as the expert's affinity s, per supported model type: the router's own pre-top-k
# probability. Softmax routers (including those that renormalise the chosen top-k afterwards, Qwen3-MoE and Mixtral)
# give the paper's s; DeepSeek-V3 scores each expert with a sigmoid and has no softmax at all.
SCORE_SOURCES: dict[str, str] = {
    "olmoe": "softmax",
    "qwen2_moe": "softmax",
    "qwen3_moe": "softmax",
    "mixtral": "softmax",
    "deepseek_v2": "softmax",
    "deepseek_v3": "sigmoid",
}

# Attributes of a MoE block that hold its shared (always active) experts; Qwen2-MoE's shared expert has its own
# sigmoid output gate, which belongs to the shared expert (it scales its output), not to the routed-expert router.
SHARED_EXPERT_ATTRS: tuple[str, ...] = ("shared_expert", "shared_expert_gate", "shared_experts")

EXPERT_PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def score_source(config: PreTrainedConfig) -> str:
    """The router probability ESFT scores this model's experts with ("softmax" or "sigmoid")."""
    model_type = config.model_type
    if model_type not in SCORE_SOURCES:
        raise ValueError(
            f"ESFT does not support model type {model_type!r}; supported: {', '.join(sorted(SCORE_SOURCES))}"
        )
    return SCORE_SOURCES[model_type]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.base_model.layers


def moe_blocks(model: PreTrainedModel) -> dict[int, nn.Module]:
    """Decoder layer index -> that layer's MoE block (a module with a router `gate` and routed `experts`)."""
    blocks = {}
    for idx, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            blocks[idx] = mlp
    if not blocks:
        raise ValueError(f"{model.config.model_type} model has no MoE layers: ESFT needs routed experts")
    return blocks


def layer_prefix(model: PreTrainedModel, layer: int) -> str:
    """The transformers name prefix of decoder layer `layer`, e.g. "model.layers.3"."""
    return f"{model.base_model_prefix}.layers.{layer}"


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    """Adapter tensor name of one trained expert's projection (proj in EXPERT_PROJS)."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def scores_tensor_name(layer: int) -> str:
    """Adapter tensor name of a layer's expert scores [E] (float32), kept for inspection."""
    return f"esft.scores.layer{layer}"


def shared_expert_params(model: PreTrainedModel) -> dict[str, nn.Parameter]:
    """transformers name -> parameter, for every shared expert (and shared-expert output gate) of the model."""
    params = {}
    for layer, block in moe_blocks(model).items():
        for attr in SHARED_EXPERT_ATTRS:
            module = getattr(block, attr, None)
            if module is not None:
                prefix = f"{layer_prefix(model, layer)}.mlp.{attr}"
                params.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    return params


def non_expert_params(model: PreTrainedModel) -> dict[str, nn.Parameter]:
    """transformers name -> parameter, for the "non-expert modules" ESFT may also train.

    These are attention (with its norms), the decoder layers' norms, the final norm, and the MLPs of dense decoder
    layers. Left out: everything inside a MoE block (router, routed and shared experts), and the token embeddings
    and LM head: vocabulary-sized tables that would dwarf the adapter and that every adapter shares when served.
    """
    moe_prefixes = tuple(f"{layer_prefix(model, layer)}.mlp." for layer in moe_blocks(model))
    vocab_params = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                    for p in m.parameters()}  # fmt: skip
    return {
        name: p
        for name, p in model.named_parameters()
        if not name.startswith(moe_prefixes) and id(p) not in vocab_params
    }


def target_modules(param_names: list[str]) -> list[str]:
    """The module-name suffixes (below the decoder layer, or below the model) holding these parameters, e.g.
    "model.layers.3.mlp.experts.gate_up_proj" -> "mlp.experts", "model.norm.weight" -> "norm"."""
    targets = set()
    for name in param_names:
        module = name.rsplit(".", 1)[0]
        parts = module.split(".")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            parts = parts[3:]
        elif len(parts) > 1:
            parts = parts[1:]
        targets.add(".".join(parts))
    return sorted(targets)


def check_experts(model: PreTrainedModel, experts: dict[int, list[int]]) -> None:
    """Raises ValueError unless `experts` names, for MoE layers of `model` only, distinct valid expert ids."""
    blocks = moe_blocks(model)
    for layer, ids in experts.items():
        if layer not in blocks:
            kind = "a dense layer" if 0 <= layer < len(decoder_layers(model)) else "not a decoder layer"
            raise ValueError(f"expert config lists layer {layer}, which is {kind}; MoE layers: {sorted(blocks)}")
        num_experts = blocks[layer].gate.weight.shape[0]
        if not ids:
            raise ValueError(f"expert config lists no experts for layer {layer}")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"layer {layer} has {num_experts} routed experts; expert ids {bad} do not exist")
        if len(set(ids)) != len(ids):
            raise ValueError(f"layer {layer} lists an expert twice: {ids}")

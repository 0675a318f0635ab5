"""Loads a Hugging Face model directory (config.json + safetensors) into our implementation.

Reads single-file and sharded checkpoints (model.safetensors.index.json), routed experts saved per expert
(`mlp.experts.{e}.gate_proj.weight`, as transformers 5 writes them and as the original releases ship them) or as
transformers' fused 3-D tables (`mlp.experts.gate_up_proj [E, 2I, H]`), in fp32, bf16 or fp16. Every parameter must
be filled exactly: a missing tensor, a wrong shape or an unknown key is an error that names it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig

from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.registry import model_class_for
from moeserve.models.rotary_embedding import RotaryEmbedding

logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Keys a checkpoint may carry that have no parameter here: rotary caches of old exports.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\._cos_cached|rotary_emb\._sin_cached)$")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model its config describes."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {model_dir}: {', '.join(missing)}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {model_dir}")
    return files


def _fill(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if target.shape != value.shape:
        raise CheckpointError(f"tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def load_weights(model: DecoderForCausalLM, files: list[Path]) -> None:
    """Fills every parameter and persistent buffer of `model` from the safetensors `files`."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    expected = set(model.state_dict().keys())
    if model.spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    filled: set[str] = set()
    experts_filled: dict[str, set[tuple[int, str]]] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt headers
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        with handle as f:
            for key in f.keys():
                name = model.checkpoint_key(key)
                layer = _LAYER.match(name)
                if _IGNORED.search(name) or (layer and int(layer.group(1)) >= model.spec.num_layers):
                    continue  # e.g. DeepSeek-V3's multi-token-prediction layer beyond num_hidden_layers
                if name == "lm_head.weight" and model.spec.tie_word_embeddings:
                    continue
                per_expert = _PER_EXPERT.match(name)
                if per_expert:
                    _fill_expert(tensors, per_expert, f.get_tensor(key), key)
                    done = experts_filled.setdefault(per_expert["prefix"], set())
                    done.add((int(per_expert["expert"]), per_expert["proj"]))
                    continue
                if name not in tensors:
                    raise CheckpointError(
                        f"tensor {key!r} in {path.name} matches no parameter of {type(model).__name__}"
                    )
                _fill(tensors[name], f.get_tensor(key), key)
                filled.add(name)
    for prefix, done in experts_filled.items():
        num_experts = tensors[f"{prefix}.gate_up_proj"].shape[0]
        for expert in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if (expert, proj) not in done:
                    raise CheckpointError(f"tensor {prefix}.{expert}.{proj}.weight is missing from the checkpoint")
        filled |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
    missing = sorted(expected - filled)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"tensors missing from the checkpoint: {', '.join(missing[:5])}{more}")


def _fill_expert(tensors: dict[str, torch.Tensor], match: re.Match, value: torch.Tensor, key: str) -> None:
    prefix, expert, proj = match["prefix"], int(match["expert"]), match["proj"]
    gate_up, down = tensors.get(f"{prefix}.gate_up_proj"), tensors.get(f"{prefix}.down_proj")
    if gate_up is None or down is None:
        raise CheckpointError(f"tensor {key!r} is a routed expert, but that layer of the model has no experts")
    if expert >= gate_up.shape[0]:
        raise CheckpointError(f"tensor {key!r} names expert {expert}, the layer has {gate_up.shape[0]} experts")
    inter = down.shape[-1]
    if proj == "down_proj":
        _fill(down[expert], value, key)
    else:
        half = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        _fill(gate_up[expert, half], value, key)


def _reset_computed_buffers(model: DecoderForCausalLM, device: torch.device | str) -> None:
    """Non-persistent buffers (RoPE frequencies) are computed, not loaded: recompute them after to_empty."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(model.config, model.spec.rope)
            module.inv_freq = fresh.inv_freq.to(device)
            module.attention_scaling = fresh.attention_scaling


def build_empty(config: PreTrainedConfig, dtype: torch.dtype, device: torch.device | str) -> DecoderForCausalLM:
    """Our model for `config`, with uninitialised weights in `dtype` on `device` (no time spent on random init)."""
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model = model.to_empty(device=device)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.data = buf.data.float()  # kept in fp32, as transformers keeps it
    if model.spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _reset_computed_buffers(model, device)
    return model


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> DecoderForCausalLM:
    """Our implementation of the model in `model_dir`, weights loaded, in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir} has no config.json")
    config = AutoConfig.from_pretrained(model_dir)
    model = build_empty(config, dtype, device)
    load_weights(model, checkpoint_files(model_dir))
    logger.info("loaded %s (%s) from %s in %s", type(model).__name__, config.model_type, model_dir, dtype)
    return model.eval()

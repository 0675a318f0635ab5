"""Moving ESFT adapters between our format and the ESFT reference repository's.

The reference repository trains a whole model directory (every weight, only the listed experts changed) and keeps
`expert_cfg.json` beside it. `import_reference` reads just the listed experts' tensors (plus shared experts and
non-expert modules when the JSON says they were trained) from such a checkpoint into an adapter directory;
`export_merged` does the reverse: base + adapter written into a full checkpoint that plain transformers loads as an
ordinary model, with the tokenizer files and `expert_cfg.json` beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moeserve.adapters import AdapterConfig
from moeserve.training.esft.expert_config import ExpertConfig
from moeserve.training.esft.layout import (
    EXPERT_PROJS,
    check_experts,
    expert_tensor_name,
    non_expert_params,
    score_source,
    scores_tensor_name,
    shared_expert_params,
    target_modules,
)
from moeserve.training.esft.method import apply_adapter, make_adapter_config
from moeserve.training.esft.tensors import check_tensors, expected_shapes, split_expert, write_adapter

logger = logging.getLogger(__name__)

REFERENCE_CONFIG_NAME = "expert_cfg.json"  # the reference repository's name for the expert config of a checkpoint
# Mixtral's checkpoints name an expert's gate / up / down projections w1 / w3 / w2, under block_sparse_moe.
_MIXTRAL_PROJS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template*", "*.model", "*.tiktoken")  # fmt: skip


class _Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint directory (one file or an index of shards)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{directory} has no .safetensors weights")
            self.files = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    self.files.update({name: file for name in f.keys()})

    def get(self, *names: str) -> torch.Tensor | None:
        """The first of `names` the checkpoint has, or None."""
        for name in names:
            if name in self.files:
                with safe_open(str(self.files[name]), framework="pt") as f:
                    return f.get_tensor(name)
        return None

    def expert(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        """One expert's projection, from its per-expert key (any of the layouts transformers writes) or, in a
        checkpoint with fused tables, from its row of the table."""
        prefix = f"model.layers.{layer}"
        tensor = self.get(
            expert_tensor_name(layer, expert, proj),
            f"{prefix}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PROJS[proj]}.weight",
        )
        if tensor is not None:
            return tensor
        gate_up = self.get(f"{prefix}.mlp.experts.gate_up_proj")
        down = self.get(f"{prefix}.mlp.experts.down_proj")
        if gate_up is None or down is None:
            raise ValueError(f"the checkpoint has no weights for expert {expert} of layer {layer} ({proj})")
        return split_expert(gate_up[expert], down[expert])[proj].clone()

    def module_tensor(self, name: str) -> torch.Tensor:
        """A shared-expert or non-expert tensor by its transformers name (Mixtral files say block_sparse_moe)."""
        tensor = self.get(name, name.replace(".mlp.", ".block_sparse_moe."))
        if tensor is None:
            raise ValueError(f"the checkpoint has no tensor {name}")
        return tensor


def import_reference(
    model_dir: str | Path, expert_config: str | Path, out_dir: str | Path, kind: str | None = None,
    base_model_name: str | None = None,
) -> AdapterConfig:  # fmt: skip
    """Writes an adapter directory holding the experts `expert_config` lists, read from the full ESFT-trained
    checkpoint `model_dir`. kind ("gate" / "token") names the method; default: the JSON's, else "gate"."""
    model_dir = Path(model_dir)
    selection = ExpertConfig.load(expert_config)
    kind = kind or selection.score_kind or "gate"
    model_config = AutoConfig.from_pretrained(model_dir)
    if base_model_name:
        model_config._name_or_path = base_model_name
    skeleton = _skeleton(model_config)
    check_experts(skeleton, selection.experts)
    checkpoint = _Checkpoint(model_dir)

    tensors: dict[str, torch.Tensor] = {}
    for layer, ids in sorted(selection.experts.items()):
        for expert in ids:
            for proj in EXPERT_PROJS:
                tensors[expert_tensor_name(layer, expert, proj)] = checkpoint.expert(layer, expert, proj)
    names = []
    if selection.shared_experts:
        names += list(shared_expert_params(skeleton))
        if not names:
            raise ValueError(f"{expert_config} says shared experts were trained, but {model_dir} has none")
    if selection.non_expert_modules:
        names += list(non_expert_params(skeleton))
    tensors.update({name: checkpoint.module_tensor(name) for name in names})
    if selection.scores is not None and selection.score_kind == kind:
        tensors.update({scores_tensor_name(layer): s.float() for layer, s in selection.scores.of_kind(kind).items()})

    targets = target_modules(["model.layers.0.mlp.experts.gate_up_proj", *names])
    config = make_adapter_config(model_config, kind, selection, score_source(model_config), targets)
    check_tensors(tensors, *expected_shapes(skeleton, config))
    write_adapter(out_dir, config, tensors)
    logger.info("imported %d experts of %s into %s", sum(map(len, selection.experts.values())), model_dir, out_dir)
    return config


def export_merged(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes base + adapter as a full transformers checkpoint (plus tokenizer files and expert_cfg.json)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = AdapterConfig.load(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    apply_adapter(model, config, adapter_dir)
    model.save_pretrained(out_dir)
    for pattern in _TOKENIZER_FILES:
        for file in base_dir.glob(pattern):
            if file.is_file():
                shutil.copy2(file, out_dir / file.name)
    ExpertConfig(
        experts={int(layer): ids for layer, ids in (config.experts or {}).items()},
        shared_experts=config.train_shared_experts,
        non_expert_modules=config.train_non_expert_modules,
        score_kind=config.score_kind,
        threshold=config.threshold,
    ).save(out_dir / REFERENCE_CONFIG_NAME)
    logger.info("wrote %s merged with %s to %s", base_dir, adapter_dir, out_dir)
    return out_dir


def _skeleton(model_config) -> PreTrainedModel:
    """The model's module structure and shapes, without memory for weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)

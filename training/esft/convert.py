"""Moving ESFT adapters between our format and the ESFT reference repository's (deepseek-ai/ESFT).

The reference's train.py turns every frozen weight into a non-persistent buffer, so its checkpoints hold only the
trained tensors (the listed experts, plus shared experts / non-expert modules when its expert_cfg.json says so);
train_ep.py writes one such directory per expert-parallel rank. `import_reference` reads the listed experts from
any of these (or from a whole merged model) into an adapter directory. The other way, `export_reference` writes
the experts-only weights + expert_cfg.json that the reference's `add_adapter` loads strictly, and `export_merged`
writes base + adapter as one ordinary transformers checkpoint (tokenizer files and expert_cfg.json beside it).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moeserve.adapters import AdapterConfig
from moeserve.training.esft.esft_method import apply_adapter, make_adapter_config
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
from moeserve.training.esft.tensors import check_tensors, expected_shapes, read_tensors, split_expert, write_adapter

logger = logging.getLogger(__name__)

REFERENCE_CONFIG_NAME = "expert_cfg.json"  # the reference repository's name for the expert config of a checkpoint
REFERENCE_WEIGHTS_NAME = "model.safetensors"  # any *.safetensors name: the reference's load_state_dict reads them all
_EP_DIR = re.compile(r"ep(\d+)$")  # train_ep.py's last_checkpoint_ep{rank}
# Mixtral's checkpoints name an expert's gate / up / down projections w1 / w3 / w2, under block_sparse_moe.
_MIXTRAL_PROJS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "chat_template*", "*.model", "*.tiktoken")  # fmt: skip


class _Checkpoint:
    """Lazy access to the tensors of a safetensors checkpoint directory (one file, several, or an index of shards).

    The ESFT reference code writes three layouts, all read here: train.py's whole-directory or experts-only
    checkpoint (its frozen weights are non-persistent buffers, so `save_model` writes only the trained experts);
    train_ep.py's `last_checkpoint_ep{rank}` directories, one per expert-parallel rank, each with that rank's experts
    (merged); and v1 checkpoints whose keys lack the `model.` prefix (`layers.3.mlp...`, as its load_state_dict).
    """

    def __init__(self, directory: Path) -> None:
        parts = [directory] if _has_weights(directory) else sorted(
            (d for d in directory.iterdir() if d.is_dir() and _EP_DIR.search(d.name) and _has_weights(d)),
            key=lambda d: int(_EP_DIR.search(d.name)[1]),
        )  # fmt: skip
        if not parts:
            raise FileNotFoundError(f"{directory} has no .safetensors weights (nor ESFT ep<rank> directories)")
        self.files: dict[str, tuple[Path, str]] = {}  # tensor name ("model." prefixed) -> (file, key in the file)
        for part in parts:
            index = part / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                keys = {name: part / file for name, file in weight_map.items()}
            else:
                keys = {}
                for file in sorted(part.glob("*.safetensors")):
                    with safe_open(str(file), framework="pt") as f:
                        keys.update({name: file for name in f.keys()})
            for key, file in keys.items():
                self.files["model." + key if key.startswith("layers.") else key] = (file, key)
        self.config_dir = next((part for part in parts if (part / "config.json").is_file()), None)

    def get(self, *names: str) -> torch.Tensor | None:
        """The first of `names` the checkpoint has, or None."""
        for name in names:
            if name in self.files:
                file, key = self.files[name]
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(key)
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
    base_model_name: str | None = None, base_model: str | Path | None = None,
) -> AdapterConfig:  # fmt: skip
    """Writes an adapter directory holding the experts `expert_config` lists, read from the ESFT-trained checkpoint
    `model_dir` (any layout _Checkpoint reads). kind ("gate" / "token") names the method; default: the JSON's, else
    "gate". The base fingerprint comes from `base_model` (a base model directory) when given, else from the
    checkpoint's config.json, which the reference's checkpoints write in transformers 4's (remote-code) form: for
    those, and for checkpoints without one, name the base model."""
    model_dir = Path(model_dir)
    selection = ExpertConfig.load(expert_config)
    kind = kind or selection.score_kind or "gate"
    checkpoint = _Checkpoint(model_dir)
    if base_model is None and checkpoint.config_dir is None:
        raise ValueError(f"{model_dir} has no config.json: name the base model it was trained from (--base)")
    if base_model is None:
        logger.warning(
            "the fingerprint comes from %s/config.json; if the ESFT reference code wrote it (transformers 4, remote "
            "code), serving may refuse the adapter: name the base model with --base",
            checkpoint.config_dir,
        )
    try:
        model_config = AutoConfig.from_pretrained(base_model if base_model is not None else checkpoint.config_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the model config for {model_dir} ({exc}): name the base with --base") from exc
    if base_model_name or base_model is not None:
        model_config._name_or_path = base_model_name or str(base_model)
    skeleton = _skeleton(model_config)
    check_experts(skeleton, selection.experts)

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
    _expert_config_of(config).save(out_dir / REFERENCE_CONFIG_NAME)
    logger.info("wrote %s merged with %s to %s", base_dir, adapter_dir, out_dir)
    return out_dir


def export_reference(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes the adapter in the reference's own layout: the trained tensors only (the listed experts, plus shared
    experts and non-expert modules when trained), under the names the reference's to_esft model keeps as
    parameters, in model.safetensors, with expert_cfg.json; its add_adapter loads them with a strict
    load_state_dict."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = AdapterConfig.load(adapter_dir)
    if not config.is_esft:
        raise ValueError(f"{adapter_dir} is a {config.method} adapter, not ESFT")
    tensors = {k: t.contiguous() for k, t in read_tensors(adapter_dir).items() if not k.startswith("esft.")}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / REFERENCE_WEIGHTS_NAME), metadata={"format": "pt"})
    _expert_config_of(config).save(out_dir / REFERENCE_CONFIG_NAME)
    logger.info("wrote %d tensors of %s in the ESFT reference layout to %s", len(tensors), adapter_dir, out_dir)
    return out_dir


def _expert_config_of(config: AdapterConfig) -> ExpertConfig:
    return ExpertConfig(
        experts={int(layer): ids for layer, ids in (config.experts or {}).items()},
        shared_experts=config.train_shared_experts,
        non_expert_modules=config.train_non_expert_modules,
        score_kind=config.score_kind,
        threshold=config.threshold,
    )


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


def _skeleton(model_config) -> PreTrainedModel:
    """The model's module structure and shapes, without memory for weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)

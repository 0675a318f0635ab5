"""Reads an adapter directory into the tensors serving places, checked against the model it will run on.

Tensor names (written by moeserve.training; see docs/training.md):
- ESFT: `model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight` for the trained experts, plus
  `esft.scores.layer{l}` (not needed to serve).
- LoRA (PEFT): read by PEFT itself, see moeserve/adapters/peft_lora.py (linears, fused expert tables, per-expert
  linears).
- LoRA-expert methods: `<module>.router.weight [E, in]` (absent: one expert, weight 1), `<module>.lora_A [E, r, in]`,
  `<module>.lora_B [E, out, r]`, or for IA3 experts (MoV) `<module>.ia3 [E, dim]`, where dim is the module's output
  size, or its input size for modules listed in config.ia3_scale_input.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from moeserve.adapters.config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, AdapterError
from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.moe import SparseMoeBlock

_ESFT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_KEY = re.compile(r"^(.+)\.(router\.weight|lora_A|lora_B|ia3)$")
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class ModuleWeights:
    """One adapted linear: E LoRA experts (or IA3 vectors) and the router that mixes them."""

    lora_a: torch.Tensor | None = None  # [E, r, in]
    lora_b: torch.Tensor | None = None  # [E, out, r]
    ia3: torch.Tensor | None = None  # [E, dim]
    ia3_input: bool = False  # IA3 scales the module's input (FFN intermediate) instead of its output
    router: torch.Tensor | None = None  # [E, in | dim]; None: a single expert with weight 1 (plain LoRA)
    top_k: int | None = None  # None: soft routing over all experts
    renormalize: bool = False
    scale: float = 1.0  # alpha / r for LoRA experts

    @property
    def num_experts(self) -> int:
        table = self.lora_a if self.lora_a is not None else self.ia3
        return table.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[1]


@dataclass
class ExpertLoRAWeights:
    """LoRA on the routed experts of one MoE layer (moeserve.adapters.peft_lora), the scale folded into B."""

    a13: torch.Tensor | None = None  # [E, r, H]: the gate/up projection's A
    b13: torch.Tensor | None = None  # [E, 2I, r]
    a2: torch.Tensor | None = None  # [E, r', I]: the down projection's A
    b2: torch.Tensor | None = None  # [E, H, r']

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a13, self.b13, self.a2, self.b2) if t is not None]


@dataclass
class LoadedAdapter:
    config: AdapterConfig
    path: Path
    digest: str = ""  # sha256 of adapter_config.json and the weights file, as validated
    experts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # ESFT
    modules: dict[str, ModuleWeights] = field(default_factory=dict)  # our module path -> its delta
    expert_lora: dict[int, ExpertLoRAWeights] = field(default_factory=dict)  # MoE layer -> LoRA on its experts
    router_lora: dict[int, ModuleWeights] = field(default_factory=dict)  # MoE layer -> LoRA on its router weight


class AdapterChangedError(AdapterError):
    """An adapter's files differ from what was validated when it was registered (overwritten, or deleted)."""


def _read(path: Path, max_bytes: int | None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the weights file and the content digest of the directory (config and weights, as read).

    The weights are parsed from the very bytes that are hashed, so what a digest vouches for is what is served.
    """
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterError(f"adapter weights {file} are missing")
    try:
        size = file.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise AdapterError(
                f"adapter weights {file} are {size} bytes, more than the {max_bytes} bytes the largest adapter "
                "these limits allow can take (--max-lora-rank, --max-lora-experts)"
            )
        data = file.read_bytes()
        config_bytes = (path / CONFIG_NAME).read_bytes()
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc}") from exc
    digest = hashlib.sha256()
    for part in (config_bytes, data):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    try:
        return safetensors.torch.load(data), digest.hexdigest()
    except Exception as exc:  # safetensors raises its own types for truncated or corrupt files
        raise AdapterError(f"cannot read {file}: {exc}") from exc


def expect(tensor: torch.Tensor, shape: tuple[int, ...], key: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, the base model needs {shape}")
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"adapter tensor {key!r} holds NaN or infinite values")
    return tensor


def find_linear(model: DecoderForCausalLM, hf_path: str, key: str) -> tuple[str, nn.Linear]:
    path = model.checkpoint_key(hf_path)
    module = dict(model.named_modules()).get(path)
    if module is not None and not isinstance(module, nn.Linear):
        module = getattr(module, "base", None)  # already wrapped by serving
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"adapter tensor {key!r} targets {hf_path!r}, which is not a linear layer of the base model")
    return path, module


@dataclass
class AdapterFiles:
    """An adapter directory as read from disk, not yet checked against a model (read_adapter_files)."""

    path: Path
    config: AdapterConfig | None  # None when reading failed (error says why)
    tensors: dict[str, torch.Tensor]
    digest: str
    error: AdapterError | None = None


def read_adapter_files(path: str | Path, max_bytes: int | None = None) -> AdapterFiles:
    """Reads and parses an adapter directory: the file I/O and hashing, safe to run in a worker thread (it does not
    touch the model). Errors are returned in `error`, for build_adapter to raise where the caller wants them."""
    path = Path(path)
    try:
        config = AdapterConfig.load(path)
        tensors, digest = _read(path, max_bytes)
    except AdapterError as exc:
        return AdapterFiles(path, None, {}, "", exc)
    return AdapterFiles(path, config, tensors, digest)


def load_adapter(
    path: str | Path, model: DecoderForCausalLM, expected_digest: str | None = None, max_bytes: int | None = None
) -> LoadedAdapter:
    """The adapter in `path`, validated for `model` (base fingerprint, config fields, tensor names and shapes).

    expected_digest: the digest this adapter had when it was registered; AdapterChangedError if the files now differ
    (or are gone). max_bytes: the largest weights file accepted, checked before it is read.
    """
    return build_adapter(read_adapter_files(path, max_bytes), model, expected_digest)


def build_adapter(files: AdapterFiles, model: DecoderForCausalLM, expected_digest: str | None = None) -> LoadedAdapter:
    """The adapter read in `files`, validated for `model` (see load_adapter)."""
    path = files.path
    if files.error is not None:
        if expected_digest is not None:
            raise AdapterChangedError(
                f"the adapter files in {path} changed or vanished since it was loaded: {files.error}"
            )
        raise files.error
    if expected_digest is not None and files.digest != expected_digest:
        raise AdapterChangedError(
            f"the adapter files in {path} changed since they were loaded and validated: load the adapter again to "
            "serve the new files"
        )
    config, tensors = files.config, files.tensors
    config.check_base(model.config)
    adapter = LoadedAdapter(config, path, files.digest)
    if config.is_esft:
        _load_esft(adapter, tensors, model)
    elif config.method == "lora":
        from moeserve.adapters.peft_lora import load_peft_lora  # it imports this module

        load_peft_lora(adapter, model, tensors)  # the very tensors that were hashed
    else:
        _load_lora_experts(adapter, tensors, model)
    return adapter


def _load_esft(adapter: LoadedAdapter, tensors: dict[str, torch.Tensor], model: DecoderForCausalLM) -> None:
    config = adapter.config
    if config.train_shared_experts or config.train_non_expert_modules:
        raise AdapterError(
            "this ESFT adapter also trained shared experts or non-expert modules, which cannot be served as an expert "
            "overlay; serve it as a merged model (moeserve esft export)"
        )
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, SparseMoeBlock)}
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("esft.scores."):
            continue
        m = _ESFT_KEY.match(key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r} in an ESFT adapter")
        found.setdefault((int(m[1]), int(m[2])), {})[m[3]] = tensor
    listed = {(int(layer), e) for layer, ids in (config.experts or {}).items() for e in ids}
    if set(found) != listed:
        missing, extra = sorted(listed - set(found)), sorted(set(found) - listed)
        raise AdapterError(f"ESFT adapter tensors do not match its expert list: missing {missing}, unlisted {extra}")
    for (layer, expert), parts in sorted(found.items()):
        block = blocks.get(layer)
        if block is None:
            raise AdapterError(f"ESFT adapter trains experts of layer {layer}, which is not a MoE layer of the base")
        num_experts, two_inter, hidden = block.experts.gate_up_proj.shape
        inter = two_inter // 2
        if expert >= num_experts:
            raise AdapterError(f"ESFT adapter names expert {expert} of layer {layer}; the layer has {num_experts}")
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if proj not in parts:
                raise AdapterError(f"adapter tensor {prefix}.{proj}.weight is missing")
        gate = expect(parts["gate_proj"], (inter, hidden), f"{prefix}.gate_proj.weight")
        up = expect(parts["up_proj"], (inter, hidden), f"{prefix}.up_proj.weight")
        down = expect(parts["down_proj"], (hidden, inter), f"{prefix}.down_proj.weight")
        adapter.experts.setdefault(layer, {})[expert] = (torch.cat([gate, up]), down)


def _load_lora_experts(adapter: LoadedAdapter, tensors: dict[str, torch.Tensor], model: DecoderForCausalLM) -> None:
    config = adapter.config
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            raise AdapterError(f"unexpected tensor {key!r} in a {config.method} adapter")
        parts.setdefault(m[1], {})[m[2]] = tensor
    ia3 = config.expert_kind == "ia3"
    num_layers = model.spec.num_layers
    if isinstance(config.num_experts, list) and len(config.num_experts) != num_layers:
        raise AdapterError(
            f"num_experts lists {len(config.num_experts)} expert counts; the base model has {num_layers} layers"
        )
    for hf_path, p in parts.items():
        path, linear = find_linear(model, hf_path, hf_path)
        needed = {"ia3"} if ia3 else {"lora_A", "lora_B"}
        if not needed <= set(p):
            raise AdapterError(f"{config.method} adapter lacks {sorted(needed - set(p))} for {hf_path!r}")
        w = ModuleWeights(top_k=config.top_k, renormalize=config.renormalize)
        if ia3:
            w.ia3_input = any(hf_path.endswith(s) for s in config.ia3_scale_input)
            dim = linear.in_features if w.ia3_input else linear.out_features
            if p["ia3"].dim() != 2:
                raise AdapterError(f"adapter tensor {hf_path}.ia3 must be [experts, dim]")
            num = p["ia3"].shape[0]
            w.ia3 = expect(p["ia3"], (num, dim), f"{hf_path}.ia3")
            router_dim = dim
        else:
            if p["lora_A"].dim() != 3:
                raise AdapterError(f"adapter tensor {hf_path}.lora_A must be [experts, rank, in]")
            num, rank = p["lora_A"].shape[:2]
            if rank != config.rank:
                raise AdapterError(
                    f"adapter tensor {hf_path}.lora_A has rank {rank}; adapter_config.json says {config.rank}"
                )
            w.lora_a = expect(p["lora_A"], (num, rank, linear.in_features), f"{hf_path}.lora_A")
            w.lora_b = expect(p["lora_B"], (num, linear.out_features, rank), f"{hf_path}.lora_B")
            w.scale = config.alpha / config.rank
            router_dim = linear.in_features
        layer = _layer_of(hf_path)
        if config.num_experts is not None and layer is not None and num != config.experts_in_layer(layer):
            raise AdapterError(
                f"{hf_path} has {num} experts; adapter_config.json's num_experts gives layer {layer} "
                f"{config.experts_in_layer(layer)}"
            )
        if config.top_k is not None and config.top_k > num and config.num_experts is None:
            raise AdapterError(f"top_k {config.top_k} is more than the {num} experts of {hf_path}")
        if "router.weight" in p:
            w.router = expect(p["router.weight"], (num, router_dim), f"{hf_path}.router.weight")
        elif num != 1:
            raise AdapterError(f"{config.method} adapter has {num} experts but no router for {hf_path!r}")
        adapter.modules[path] = w


def _layer_of(hf_path: str) -> int | None:
    m = _LAYER.search(hf_path)
    return int(m[1]) if m else None

"""The adapter format, one dataclass for training (which writes it) and serving (which reads it).

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`.

- `lora` is written in PEFT's own format (`peft_type: "LORA"`, keys `base_model.model.<module>.lora_A.weight`), so
  `PeftModel.from_pretrained` loads it; our own fields (method, base fingerprint, format version) then travel in the
  safetensors header metadata, where PEFT does not look. A PEFT-made LoRA directory (no such metadata) loads too.
- Every other method writes `adapter_config.json` with `"moeserve_format_version"` and the fields below.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from transformers import PreTrainedConfig

from moeserve.errors import ErrorKind

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METHODS = ("esft-gate", "esft-token", "molora", "mov", "loramoe", "mola", "lora")
ESFT_METHODS = ("esft-gate", "esft-token")
LORA_EXPERT_METHODS = ("molora", "mov", "loramoe", "mola")

# Config fields that do not change the model's function or shapes; left out of the fingerprint.
_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    "chunk_size_feed_forward",
    "tie_encoder_decoder",
    "problem_type",
    "id2label",
    "label2id",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "_attn_implementation",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "router_aux_loss_coef",
    "initializer_range",
    "attention_dropout",
    "max_position_embeddings",
}


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked (corrupt, unsupported, or for another base model)."""

    kind = ErrorKind.ADAPTER_INVALID


class AdapterMismatchError(AdapterError):
    """The adapter was made for a different base model."""


def base_fingerprint(config: PreTrainedConfig) -> str:
    """A short hash of the base model's configuration (architecture and shapes, not its name or dtype)."""
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE}
    blob = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class AdapterConfig:
    method: str  # one of METHODS
    base_model_name: str  # the base model's name or path at training time
    base_fingerprint: str | None  # base_fingerprint(base config); None for an imported PEFT adapter
    target_modules: list[str] = field(default_factory=list)  # module name suffixes the adapter touches
    format_version: int = FORMAT_VERSION

    # LoRA and the LoRA-expert methods.
    rank: int | None = None
    alpha: float | None = None
    # Experts per adapted module: one number, or one per decoder layer (MoLA's allocations).
    num_experts: int | list[int] | None = None
    top_k: int | None = None  # None: soft routing over all experts
    renormalize: bool = False  # renormalise the top-k router weights (MoLA)
    expert_kind: str = "lora"  # "lora" (A, B matrices) or "ia3" (MoV's scaling vectors)
    num_world_experts: int = 0  # LoRAMoE: how many of the experts form the world-knowledge group
    # MoV: module-name suffixes whose input (not output) the IA3 vectors scale, e.g. ["down_proj"] for the FFN
    # intermediate activation, y = down_proj(x * l); every other target scales its output, y = W x * l.
    ia3_scale_input: list[str] = field(default_factory=list)

    # ESFT.
    experts: dict[str, list[int]] | None = None  # decoder layer index (as a string) -> trained expert ids
    score_kind: str | None = None  # "gate" or "token"
    threshold: float | None = None  # cumulative-score threshold p
    score_source: str | None = None  # "softmax" (paper) or the router's own pre-top-k probability
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False

    extra: dict[str, Any] = field(default_factory=dict)  # method-specific settings without a field of their own

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdapterError(f"unknown adapter method {self.method!r}; known: {', '.join(METHODS)}")
        if self.format_version > FORMAT_VERSION:
            raise AdapterError(
                f"adapter format version {self.format_version} is newer than this moeserve reads ({FORMAT_VERSION})"
            )
        if self.method in ESFT_METHODS and not self.experts:
            raise AdapterError(f"an {self.method} adapter must list its experts per layer")
        # IA3 experts (MoV) are vectors: they have no rank.
        if self.method not in ESFT_METHODS and self.expert_kind != "ia3" and (self.rank is None or self.rank < 1):
            raise AdapterError(f"a {self.method} adapter needs a positive rank, got {self.rank}")
        if self.expert_kind not in ("lora", "ia3"):
            raise AdapterError(f"expert_kind must be 'lora' or 'ia3', got {self.expert_kind!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise AdapterError(f"alpha must be a positive number, got {self.alpha}")
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts or 1]
        if any(n < 1 for n in counts):
            raise AdapterError(f"num_experts must be positive (per layer), got {self.num_experts}")
        if self.top_k is not None and not 1 <= self.top_k <= (max(counts) if self.num_experts else self.top_k):
            raise AdapterError(f"top_k must be in [1, num_experts = {max(counts)}], got {self.top_k}")
        if not 0 <= self.num_world_experts <= max(counts):
            raise AdapterError(f"num_world_experts must be in [0, num_experts], got {self.num_world_experts}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise AdapterError(f"threshold must be in (0, 1], got {self.threshold}")
        for layer, ids in (self.experts or {}).items():
            if not layer.isdigit() or any(e < 0 for e in ids) or len(set(ids)) != len(ids):
                raise AdapterError(f"experts must map layer indices to distinct expert ids, got {layer!r}: {ids}")

    @property
    def is_esft(self) -> bool:
        return self.method in ESFT_METHODS

    def experts_in_layer(self, layer: int) -> int:
        if isinstance(self.num_experts, list):
            return self.num_experts[layer]
        return self.num_experts or 1

    def check_base(self, config: PreTrainedConfig) -> None:
        """Refuses a base model whose configuration differs from the one the adapter was trained on."""
        if self.base_fingerprint is None:
            return  # an imported PEFT adapter: shapes are checked when its tensors are placed
        ours = base_fingerprint(config)
        if ours != self.base_fingerprint:
            name = getattr(config, "_name_or_path", "") or config.model_type
            raise AdapterMismatchError(
                f"adapter was trained on base model {self.base_model_name!r} (fingerprint {self.base_fingerprint}), "
                f"but the base model is {name!r} (fingerprint {ours})"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moeserve_format_version"] = data.pop("format_version")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        data["format_version"] = data.pop("moeserve_format_version", FORMAT_VERSION)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"adapter_config.json has fields this moeserve does not support: {', '.join(unknown)}")
        try:  # every field's type, strictly (no "8" for 8, no true for 1), then __post_init__'s checks
            return TypeAdapter(cls).validate_json(json.dumps(data), strict=True)
        except ValidationError as exc:
            raise AdapterError(_field_errors(exc)) from None

    def save(self, directory: str | Path) -> None:
        """Writes adapter_config.json (not for `lora`, whose PEFT config the LoRA writer produces)."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise AdapterError(f"{directory} is not an adapter directory: it has no {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise AdapterError(f"{path} must hold a JSON object")
        if data.get("peft_type") is not None:
            return cls._from_peft(data, Path(directory))
        return cls.from_dict(data)

    @classmethod
    def _from_peft(cls, data: dict[str, Any], directory: Path) -> AdapterConfig:
        from moeserve.adapters.peft_lora import adapter_config_from_peft  # it imports this module

        return adapter_config_from_peft(data, directory, _safetensors_metadata(directory / WEIGHTS_NAME))


def _field_errors(exc: ValidationError) -> str:
    """pydantic's errors as one line that names each adapter_config.json field at fault."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("int", "list[", "dict[", "float", "str", "none"))]
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"field {'.'.join(loc)!r}: {msg}" if loc else msg)
    return "adapter_config.json: " + "; ".join(dict.fromkeys(problems))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors header ({} for a file without any)."""
    if not path.is_file():
        raise AdapterError(f"adapter weights {path} are missing")
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > path.stat().st_size - 8:
                raise AdapterError(f"{path} is not a valid safetensors file (header length {size})")
            header = json.loads(f.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not a valid safetensors file: {exc}") from exc
    return dict(header.get("__metadata__") or {})

"""Plain LoRA, trained and saved by PEFT itself so the adapter stays a PEFT adapter.

`prepare` calls `peft.get_peft_model`, which injects the LoRA layers into the transformers model in place (the
training loop trains that model); `save` calls PEFT's `save_pretrained`, then adds moeserve's own fields (method,
base model name, base fingerprint, format version) to the safetensors header metadata of adapter_model.safetensors,
where PEFT does not look and `AdapterConfig.load` does. `apply` is `PeftModel.from_pretrained`, so an adapter made
by PEFT alone (no metadata) loads the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from moeserve.adapters import FORMAT_VERSION, WEIGHTS_NAME, AdapterConfig, AdapterError, base_fingerprint
from moeserve.training.adapter_method import MethodOptions

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0


class LoRAMethod:
    """`lora`: one PEFT LoRA (rank r, alpha) on each target linear, and on each routed expert of a targeted
    fused expert table (PEFT's target_parameters: a rank-r LoRA per expert)."""

    name = "lora"

    def __init__(self) -> None:
        self._peft_model: PeftModel | None = None  # the PEFT wrapper of the model `prepare` adapted

    def prepare(
        self, model: PreTrainedModel, options: MethodOptions, train_token_ids: list[list[int]]
    ) -> AdapterConfig:
        if options.num_experts is not None or options.top_k is not None:
            raise ValueError("lora has no experts or router: drop --num-experts / --top-k")
        targets = list(options.target_modules or DEFAULT_TARGETS)
        rank = options.rank or DEFAULT_RANK
        alpha = options.alpha if options.alpha is not None else DEFAULT_ALPHA
        modules, parameters = split_targets(model, targets)
        modules = qualified_linear_targets(model, modules)
        if parameters and options.dropout:
            raise ValueError("LoRA on the routed experts (PEFT target_parameters) does not take --dropout")
        peft_config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=modules or None, target_parameters=parameters or None,
            lora_dropout=options.dropout, bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
        self._peft_model = get_peft_model(model, peft_config)
        return AdapterConfig(
            method="lora",
            base_model_name=model.name_or_path,
            base_fingerprint=base_fingerprint(model.config),
            target_modules=modules or parameters,  # what PEFT's config names (its target_parameters in extra)
            rank=rank,
            alpha=float(alpha),
            extra={"target_parameters": parameters} if parameters else {},
        )

    def aux_loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def save(self, model: PreTrainedModel, config: AdapterConfig, out_dir: Path) -> None:
        peft_model = model if isinstance(model, PeftModel) else self._peft_model
        if peft_model is None or (peft_model is not model and peft_model.get_base_model() is not model):
            raise ValueError("this LoRA method did not prepare the model it is asked to save")
        out_dir = Path(out_dir)
        peft_model.save_pretrained(out_dir)
        _add_metadata(out_dir / WEIGHTS_NAME, config)
        logger.info("saved LoRA adapter (PEFT format) to %s", out_dir)

    def apply(self, model: PreTrainedModel, config: AdapterConfig, adapter_dir: Path) -> PreTrainedModel:
        config.check_base(model.config)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        except RuntimeError as exc:  # PEFT reports tensors that do not fit the base model as a load_state_dict error
            raise AdapterError(f"LoRA adapter {adapter_dir} does not fit this base model: {exc}") from exc
        return peft_model.get_base_model()


def split_targets(model: PreTrainedModel, targets: list[str]) -> tuple[list[str], list[str]]:
    """Target names -> (PEFT target_modules, PEFT target_parameters).

    A name that ends a 3-D parameter's name (transformers 5 keeps the routed experts of a MoE block fused:
    `mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) targets that expert table; a name
    that ends a linear's name targets the linear. One name can do both (`down_proj`: the routed experts' table and
    the shared expert's linear).
    """
    tables = {name for name, p in model.named_parameters() if p.dim() == 3}
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def ends(names: set[str], target: str) -> bool:
        return any(n == target or n.endswith(f".{target}") for n in names)

    parameters = [t for t in targets if ends(tables, t)]
    modules = [t for t in targets if ends(linears, t) or not ends(tables, t)]  # unknown names: PEFT says so
    return modules, parameters


def qualified_linear_targets(model: PreTrainedModel, modules: list[str]) -> list[str]:
    """PEFT target_modules that mean these linears and nothing else, under every PEFT version.

    On a model whose routed experts are fused tables (transformers 5), PEFT >= 0.22 reads a bare name the way
    transformers 4 laid the model out: `up_proj` or `gate_proj` then also means the experts' fused `gate_up_proj`, and
    one of the two alone is refused ("Cannot convert PEFT target(s) up_proj without also targeting gate_proj"). There a
    linear's name is written with its parent's (`shared_expert.up_proj`, `self_attn.q_proj`), which PEFT matches by
    suffix like any target and does not convert. Dense models, names with a dot already and names that match no
    linear (PEFT reports those) are kept as they are.
    """
    if not any(p.dim() == 3 for p in model.parameters()):
        return modules
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    qualified: list[str] = []
    for target in modules:
        parents = [n.rsplit(".", 2)[-2:] for n in linears if "." not in target and n.endswith(f".{target}")]
        names = sorted({".".join(p) for p in parents}) or [target]
        qualified += [n for n in names if n not in qualified]
    return qualified


def _add_metadata(path: Path, config: AdapterConfig) -> None:
    """Rewrites a safetensors file with moeserve's fields added to its header metadata (values must be strings)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.update(
        method=config.method, base_model_name=config.base_model_name, moeserve_format_version=str(FORMAT_VERSION)
    )
    if config.base_fingerprint is not None:
        metadata["base_fingerprint"] = config.base_fingerprint
    save_file(load_file(str(path)), str(path), metadata=metadata)

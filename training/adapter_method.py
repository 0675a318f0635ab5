"""The contract between the generic training loop and each adapter method.

A method turns a plain transformers causal-LM into one that trains only its adapter, says how to save that adapter
in the common format (moeserve.adapters), and how to put a saved adapter back onto a fresh base model. The same
`apply` is what serving's golden tests use as the reference: "the training-side model with adapter X".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from moeserve.adapters import AdapterConfig


@dataclass
class MethodOptions:
    """What the command line says about the adapter (each method reads the fields it needs)."""

    method: str
    target_modules: list[str] | None = None  # None: the method's default targets
    rank: int | None = None  # None: the method's default (methods.md: MoLoRA/LoRAMoE 4, MoLA/LoRA 8)
    alpha: float | None = None  # None: the method's default (LoRAMoE 32; MoLoRA, MoLA, LoRA 16)
    dropout: float = 0.0
    num_experts: int | list[int] | None = None  # LoRA experts per module, or per layer (MoLA)
    top_k: int | None = None  # None: the method's default (soft for molora/mov/loramoe, 2 for mola)
    allocation: str | None = None  # MoLA preset: triangle, inverted-triangle, hourglass, square
    num_world_experts: int | None = None  # LoRAMoE
    aux_loss_coef: float | None = None  # MoLA load balancing / LoRAMoE localized balancing
    lbc_delta: float = 0.1  # LoRAMoE's delta
    lbc_variant: str = "paper"  # LoRAMoE: "paper" var/mean or "code" var/mean^2
    # ESFT
    threshold: float | None = None  # cumulative-score threshold p (defaults: 0.1 gate, 0.2 token)
    expert_config: Path | None = None  # a precomputed `moeserve esft score` output; else scored on the data
    score_samples: int = 32
    score_tokens: int = 4096
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class AdapterMethod(Protocol):
    """One adapter method, as the training loop and the tests see it."""

    name: str

    def prepare(
        self, model: PreTrainedModel, options: MethodOptions, train_token_ids: list[list[int]]
    ) -> AdapterConfig:
        """Adds trainable adapter modules / overlay parameters to `model` in place and freezes everything else.

        `train_token_ids` are tokenised training samples (ESFT scores its experts on them). Returns the config the
        adapter will be saved with (base_model_name and base_fingerprint filled from model.config).
        """
        ...

    def aux_loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The method's auxiliary loss for the last forward pass (MoLA balancing, LoRAMoE's LBC), or None."""
        ...

    def save(self, model: PreTrainedModel, config: AdapterConfig, out_dir: Path) -> None:
        """Writes adapter_config.json + adapter_model.safetensors: only the adapter's own tensors."""
        ...

    def apply(self, model: PreTrainedModel, config: AdapterConfig, adapter_dir: Path) -> PreTrainedModel:
        """Puts the saved adapter in `adapter_dir` onto a fresh base `model` (after config.check_base)."""
        ...

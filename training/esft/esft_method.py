"""ESFT (Expert-Specialized Fine-Tuning) as an AdapterMethod: `esft-gate` and `esft-token`.

prepare: score the routed experts on the training data (or read an expert config from `moeserve esft score`), select
the most relevant per layer, lay trainable copies of them over the frozen expert tables, freeze everything else.

Tensor naming contract of an ESFT adapter's `adapter_model.safetensors` (what serving reads; L = decoder layer index,
e = routed expert id, both as in `adapter_config.json`'s `experts`; I = expert intermediate size, H = hidden size):

    model.layers.{L}.mlp.experts.{e}.gate_proj.weight   [I, H]  rows 0..I-1 of the fused gate_up_proj[e]
    model.layers.{L}.mlp.experts.{e}.up_proj.weight     [I, H]  rows I..2I-1 of gate_up_proj[e]
    model.layers.{L}.mlp.experts.{e}.down_proj.weight   [H, I]  down_proj[e]
    esft.scores.layer{L}                                [E]     float32, the layer's score of config.score_kind
                                                                (optional; absent in imported adapters)

  exactly one triple per (L, e) listed in `experts`, for every architecture (Mixtral too, whose checkpoints name
  them block_sparse_moe.experts.{e}.w1/w3/w2), in the base model's dtype. These are the full weights of the trained
  experts (not deltas): expert e of layer L is replaced, every other expert is the base model's.
  If `train_shared_experts`: every parameter of the MoE blocks' shared experts under its transformers name
  (`model.layers.{L}.mlp.shared_experts.*`; Qwen2-MoE: `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`).
  If `train_non_expert_modules`: every parameter of attention, norms and dense-layer MLPs under its transformers
  name (not embeddings, LM head or routers). Nothing else may be in the file; `apply` refuses a missing, extra or
  wrongly shaped tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from moeserve.adapters import AdapterConfig, AdapterError, base_fingerprint
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.esft.expert_config import ExpertConfig
from moeserve.training.esft.layout import check_experts, score_source, target_modules
from moeserve.training.esft.overlay import install_overlays, set_trainable
from moeserve.training.esft.scoring import SCORE_KINDS, pack_samples, score_experts
from moeserve.training.esft.selection import DEFAULT_THRESHOLDS, select_experts
from moeserve.training.esft.tensors import (
    check_tensors,
    collect_tensors,
    expected_shapes,
    read_tensors,
    write_adapter,
    write_into_model,
)

logger = logging.getLogger(__name__)


class ESFTMethod:
    """ESFT with experts selected by Average Gate Score (kind "gate") or Token Selection Ratio (kind "token")."""

    def __init__(self, kind: str) -> None:
        kind = kind.removeprefix("esft-")  # the registry may pass the method name itself
        if kind not in SCORE_KINDS:
            raise ValueError(f"ESFT kind must be one of {SCORE_KINDS} (or esft-gate / esft-token), got {kind!r}")
        self.kind = kind
        self.name = f"esft-{kind}"

    def prepare(
        self, model: PreTrainedModel, options: MethodOptions, train_token_ids: list[list[int]]
    ) -> AdapterConfig:
        selection = self._selection(model, options, train_token_ids)
        check_experts(model, selection.experts)
        scores = selection.scores.of_kind(self.kind) if selection.scores is not None else None
        n_total = sum(p.numel() for p in model.parameters())  # before the overlays add their copies
        install_overlays(model, selection.experts, scores)
        trainable = set_trainable(model, selection.shared_experts, selection.non_expert_modules)
        n_train = sum(p.numel() for p in trainable.values())
        logger.info(
            "%s: training %d experts in %d layers (%s), %d parameters (%.2f%% of %d)",
            self.name, sum(map(len, selection.experts.values())), len(selection.experts),
            ", ".join(f"L{layer}: {len(ids)}" for layer, ids in sorted(selection.experts.items())),
            n_train, 100.0 * n_train / n_total, n_total,
        )  # fmt: skip
        source = selection.scores.score_source if selection.scores is not None else score_source(model.config)
        return make_adapter_config(model.config, self.kind, selection, source, target_modules(list(trainable)))

    def aux_loss(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None  # ESFT trains with the LM loss alone

    def save(self, model: PreTrainedModel, config: AdapterConfig, out_dir: Path) -> None:
        tensors = collect_tensors(model, config)
        write_adapter(out_dir, config, tensors)
        logger.info("saved %s adapter (%d tensors) to %s", config.method, len(tensors), out_dir)

    def apply(self, model: PreTrainedModel, config: AdapterConfig, adapter_dir: Path) -> PreTrainedModel:
        return apply_adapter(model, config, adapter_dir)

    def _selection(self, model: PreTrainedModel, options: MethodOptions, token_ids: list[list[int]]) -> ExpertConfig:
        """The experts to train: from options.expert_config if given, else scored and selected on `token_ids`."""
        if options.expert_config is not None:
            selection = ExpertConfig.load(options.expert_config)
            if selection.score_kind is not None and selection.score_kind != self.kind:
                raise ValueError(
                    f"{options.expert_config} selected experts by {selection.score_kind} score; "
                    f"train it with --method esft-{selection.score_kind}, or score again with --kind {self.kind}"
                )
            # The command line can add what the JSON leaves out (the reference configs carry these flags too).
            selection.shared_experts |= options.train_shared_experts
            selection.non_expert_modules |= options.train_non_expert_modules
            logger.info("%s: experts from %s", self.name, options.expert_config)
            return selection
        threshold = options.threshold if options.threshold is not None else DEFAULT_THRESHOLDS[self.kind]
        samples = pack_samples(token_ids, options.score_samples, options.score_tokens)
        scores = score_experts(model, samples)
        return ExpertConfig(
            experts=select_experts(scores.of_kind(self.kind), threshold),
            shared_experts=options.train_shared_experts,
            non_expert_modules=options.train_non_expert_modules,
            score_kind=self.kind,
            threshold=threshold,
            scores=scores,
        )


def make_adapter_config(
    model_config: PreTrainedConfig, kind: str, selection: ExpertConfig, source: str, targets: list[str]
) -> AdapterConfig:
    """The AdapterConfig of an ESFT adapter training (or trained) the experts of `selection` on this base;
    `targets` are the module-name suffixes it trains (layout.target_modules)."""
    return AdapterConfig(
        method=f"esft-{kind}",
        base_model_name=str(getattr(model_config, "_name_or_path", "") or model_config.model_type),
        base_fingerprint=base_fingerprint(model_config),
        target_modules=targets,
        experts={str(layer): list(ids) for layer, ids in sorted(selection.experts.items())},
        score_kind=kind,
        threshold=selection.threshold,
        score_source=source,
        train_shared_experts=selection.shared_experts,
        train_non_expert_modules=selection.non_expert_modules,
    )


def apply_adapter(model: PreTrainedModel, config: AdapterConfig, adapter_dir: str | Path) -> PreTrainedModel:
    """Writes a saved ESFT adapter into a fresh base `model`'s weights; the result computes exactly base + adapter."""
    if not config.is_esft:
        raise AdapterError(f"{adapter_dir} holds a {config.method} adapter, not an ESFT one")
    config.check_base(model.config)
    tensors = read_tensors(adapter_dir)
    required, optional = expected_shapes(model, config)
    check_tensors(tensors, required, optional)
    write_into_model(model, config, tensors)
    return model

"""Pretrain a built-in base model from scratch with transformers' Trainer: tokenizer, model, training, save.

`pretrain(config, out_dir)` writes an ordinary Hugging Face model directory (config.json, model.safetensors,
tokenizer files with the ChatML template, generation_config.json) that transformers and moeserve both load.
Everything is seeded and the training runs with deterministic algorithms: the same config, torch version, thread
count and CPU give bit-identical weights (other CPUs may round differently).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from moeserve.demo.pretraining.config import ModelShape, PretrainConfig
from moeserve.demo.pretraining.corpus import PackedBlocks, build_samples, mixture_report, tokenizer_texts
from moeserve.demo.pretraining.tokenizer import train_tokenizer
from moeserve.tiny.tokenizer import ENDOFTEXT, IM_END

logger = logging.getLogger(__name__)

PRETRAIN_INFO = "pretrain_info.json"  # written next to the weights: the config, mixture and loss curve
# Measured on 2 CPU cores (docs/base_model.md): grouped_mm runs a layer's routed experts as one grouped GEMM,
# 0.22 s per training step against 0.29 s for transformers' per-expert loop ("eager").
_EXPERTS_IMPLEMENTATION = "grouped_mm"
_ADAM_BETAS = (0.9, 0.95)


@dataclass
class PretrainResult:
    out_dir: Path
    total_params: int
    active_params: int  # per token: everything but the routed experts a token does not use
    wall_time_s: float  # the Trainer's training loop only
    final_loss: float  # mean LM loss (with the router's aux loss) over the last logging window
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, logged loss)
    mixture: dict[str, dict[str, int]] = field(default_factory=dict)  # per source: samples, tokens, loss tokens


def model_config(shape: ModelShape, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The qwen2_moe config of `shape`: Qwen1.5-MoE's layout (softmax router without top-k renormalisation, as the
    ESFT paper's gate scores assume; a shared expert behind a sigmoid gate) at toy size, every layer MoE."""
    config = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.shared_expert_size,  # the dense MLP size; unused, every layer is MoE
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        moe_intermediate_size=shape.expert_size,
        shared_expert_intermediate_size=shape.shared_expert_size,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        qkv_bias=True,
        tie_word_embeddings=False,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        router_aux_loss_coef=shape.router_aux_loss_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = torch.float32
    return config


def count_params(config: PreTrainedConfig, model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    active = total - routed + routed * config.num_experts_per_tok // config.num_experts
    return total, active


def _training_args(config: PretrainConfig, work_dir: str) -> TrainingArguments:
    s = config.schedule
    return TrainingArguments(
        output_dir=work_dir,
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup_ratio,  # < 1: a ratio of the steps
        weight_decay=s.weight_decay,
        adam_beta1=_ADAM_BETAS[0],
        adam_beta2=_ADAM_BETAS[1],
        max_grad_norm=s.max_grad_norm,
        seed=s.seed,
        data_seed=s.seed,
        logging_steps=max(1, s.steps // 28),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # position_ids carry the packing; Trainer would drop them otherwise
        dataloader_num_workers=0,
        use_cpu=True,
    )


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: PretrainConfig, out: Path) -> None:
    model.config.use_cache = True
    model.config.output_router_logits = False
    if config.save_dtype == "bfloat16":
        model.to(torch.bfloat16)
    model.config.dtype = getattr(torch, config.save_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END]),
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pretrain(config: PretrainConfig, out_dir: str | Path) -> PretrainResult:
    """Pretrain `config` and write the model directory to `out_dir`; returns sizes, time and the loss curve."""
    out = Path(out_dir)
    set_seed(config.schedule.seed)
    tokenizer = train_tokenizer(tokenizer_texts(config.data), config.model.vocab_size)
    samples = build_samples(tokenizer, config.data, config.schedule.seq_len)
    mixture = mixture_report(samples)
    for source, row in mixture.items():
        logger.info("data %-10s %6d samples %8d tokens %8d with loss", source, *row.values())
    blocks = PackedBlocks(samples, config.schedule.seq_len, tokenizer.pad_token_id, config.schedule.seed)

    hf_config = model_config(config.model, tokenizer)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="sdpa", experts_implementation=_EXPERTS_IMPLEMENTATION
    )
    # Training only: the router's balancing loss joins the LM loss; no KV cache, or packed samples would see
    # each other (transformers honours position-id resets only without a cache).
    model.config.output_router_logits = True
    model.config.use_cache = False
    total, active = count_params(hf_config, model)
    logger.info("%s: %.2fM parameters, %.2fM active per token", config.name, total / 1e6, active / 1e6)

    # Some multi-threaded CPU kernels of the MoE backward accumulate in a varying order: two runs drifted apart after
    # ~100 steps. Deterministic algorithms make reruns bit-identical at no measured cost on 2 cores.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with tempfile.TemporaryDirectory(prefix="moeserve-pretrain-") as work_dir:
            trainer = Trainer(model=model, args=_training_args(config, work_dir), train_dataset=blocks)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    curve = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    _save(model, tokenizer, config, out)
    result = PretrainResult(out, total, active, wall, curve[-1][1], curve, mixture)
    info = {
        "config": asdict(config),
        "total_params": total,
        "active_params": active,
        "train_wall_time_s": round(wall, 1),
        "final_loss": result.final_loss,
        "loss_curve": curve,
        "mixture": mixture,
        "torch": torch.__version__,
    }
    (out / PRETRAIN_INFO).write_text(json.dumps(info, indent=1) + "\n")
    logger.info("pretrained %s in %.0f s, final loss %.3f, saved to %s", config.name, wall, result.final_loss, out)
    return result

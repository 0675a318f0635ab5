"""`moeserve train` and `moeserve adapters inspect`: the training side of the command line.

`add_train_commands(subparsers)` registers both on moeserve's own parser; `python -m moeserve.training.cli` runs
them on their own.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from moeserve.adapters import CONFIG_NAME, LORA_EXPERT_METHODS, WEIGHTS_NAME, AdapterConfig

METHOD_HELP = """\
methods:
  esft-gate   ESFT: fine-tune only the routed experts most relevant to the data, chosen by average gate score
              (MoE models only; threshold p = 0.1)
  esft-token  ESFT, experts chosen by token selection ratio (p = 0.2)
  molora      MoLoRA: 10 rank-4 LoRA experts per linear, soft routing (q, k, v, o, gate, up, down)
  mov         MoV: 10 IA3 scaling vectors per target, soft routing (k, v and the FFN intermediate activation)
  loramoe     LoRAMoE: 8 rank-4 LoRA experts in the FFN (6 task + 2 world knowledge), localized balancing loss
  mola        MoLA: rank-8 LoRA experts, top-2, more experts in higher layers (inverted-triangle 2-4-6-8),
              Switch balancing loss
  lora        plain LoRA through PEFT (rank 8, alpha 16 on q, k, v, o); PEFT-compatible files; with
              --target-modules ...,gate_up_proj,down_proj also LoRA on every routed expert (PEFT target_parameters)

Targets are module-name suffixes of nn.Linear layers: attention projections, dense MLPs and the shared experts of
MoE models (mlp.shared_expert.up_proj in Qwen2-MoE, mlp.shared_experts.gate_proj in DeepSeek). Routed experts of
transformers-5 MoE blocks are fused 3-D parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj): lora adapts
them when named (a rank-r LoRA per expert, PEFT's target_parameters; `down_proj` names both the routed table and
the shared expert's linear); the LoRA-expert methods do not; ESFT fine-tunes whole routed experts.

The data is JSONL: {"prompt", "completion"} or {"messages": [...]} records, optional "type" 0/1 (LoRAMoE).
Checkpoints go to OUT/checkpoints, each also a servable adapter directory; --resume continues from the last one
(refusing another run's), an OUT with files needs --resume or --overwrite. The adapter is written to OUT.
Under torchrun (e.g. torchrun --nproc-per-node 2 -m moeserve.cli train ...) rank 0 writes files and the summary.
"""


def _int_or_list(text: str) -> int | list[int]:
    """'8' -> 8; '2,4,6,8' -> [2, 4, 6, 8] (one count per decoder layer)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one expert count")
    return values[0] if len(values) == 1 and "," not in text else values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers `train` and `adapters inspect` on a parser's subcommands."""
    from moeserve.training.lora_experts import ALLOCATIONS, LBC_VARIANTS
    from moeserve.training.method_registry import method_names

    train = subparsers.add_parser(
        "train", help="train an adapter (ESFT, MoLoRA, MoV, LoRAMoE, MoLA, LoRA) on a transformers model",
        description="Train one adapter on a base model with transformers' Trainer.", epilog=METHOD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.add_argument("--method", required=True, choices=method_names())
    train.add_argument("--model", required=True, type=Path, help="base model directory (transformers format)")
    train.add_argument("--data", required=True, type=Path, help="task data, JSONL")
    train.add_argument("--out", required=True, type=Path, help="adapter output directory")

    data = train.add_argument_group("data")
    data.add_argument("--general-data", type=Path, help="general data (JSONL) mixed into the task data")
    data.add_argument("--mix-ratio", type=float, default=1.0, help="general samples per task sample (default 1.0)")
    data.add_argument("--max-seq-len", type=int, default=1024, help="tokens per packed block; longer samples are cut")

    loop = train.add_argument_group("training loop")
    loop.add_argument("--lr", type=float, help="learning rate (default: the method's paper value)")
    loop.add_argument("--epochs", type=float, default=1.0)
    loop.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    loop.add_argument("--batch-size", type=int, default=8, help="packed blocks per device per step")
    loop.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    loop.add_argument("--warmup", type=float, default=0.0, help="warmup: a ratio of the steps if < 1, else steps")
    loop.add_argument("--weight-decay", type=float, default=0.0)
    loop.add_argument("--max-grad-norm", type=float, default=1.0)
    loop.add_argument("--lr-scheduler", default="linear", help="a transformers scheduler name (linear, cosine, ...)")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    loop.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    loop.add_argument("--logging-steps", type=int, default=10)
    loop.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    loop.add_argument("--overwrite", action="store_true",
                      help="train into an OUT that holds files (its adapter, checkpoints removed)")  # fmt: skip
    loop.add_argument("--eval-split", type=float, default=0.0, metavar="FRACTION",
                      help="hold out this share of the samples; eval loss at checkpoints and the end")  # fmt: skip
    loop.add_argument("--report-to", type=_names, default=["none"],
                      help="Trainer integrations: tensorboard,wandb,mlflow,... (default none)")  # fmt: skip
    loop.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base weights")
    loop.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    loop.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    loop.add_argument("--gradient-checkpointing", action="store_true")

    adapter = train.add_argument_group("adapter (LoRA-expert methods and lora)")
    adapter.add_argument("--target-modules", type=_names, help="comma-separated module-name suffixes")
    adapter.add_argument("--rank", type=int, help="LoRA rank r")
    adapter.add_argument("--alpha", type=float, help="LoRA alpha; the delta is scaled by alpha / r")
    adapter.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input")
    adapter.add_argument("--num-experts", type=_int_or_list, help="experts per module, or one count per layer: 2,4,6,8")
    adapter.add_argument("--top-k", type=int, help="route each token to k experts (default: soft, mola 2)")
    adapter.add_argument("--allocation", choices=list(ALLOCATIONS), help="MoLA experts per layer group")
    adapter.add_argument("--num-world-experts", type=int, help="LoRAMoE world-knowledge experts (default 2)")
    adapter.add_argument("--aux-loss-coef", type=float, help="balancing loss weight (mola 0.001, loramoe 0.1)")
    adapter.add_argument("--lbc-delta", type=float, default=0.1, help="LoRAMoE's delta")
    adapter.add_argument("--lbc-variant", choices=list(LBC_VARIANTS), default="paper",
                         help="LoRAMoE loss: paper var/mean, or the reference code's var/mean^2")  # fmt: skip

    esft = train.add_argument_group("ESFT")
    esft.add_argument("--threshold", type=float, help="cumulative score threshold p (default 0.1 gate, 0.2 token)")
    esft.add_argument("--expert-config", type=Path, help="a precomputed expert selection; else scored on --data")
    esft.add_argument("--score-samples", type=int, default=32, help="samples scored")
    esft.add_argument("--score-tokens", type=int, default=4096, help="tokens per scored sample")
    esft.add_argument("--train-shared-experts", action="store_true")
    esft.add_argument("--train-non-expert-modules", action="store_true")
    train.set_defaults(func=run_train)

    adapters = subparsers.add_parser("adapters", help="inspect adapter directories")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    inspect = adapters_sub.add_parser("inspect", help="method, base model, size, parameters, experts per layer")
    inspect.add_argument("dir", type=Path)
    inspect.set_defaults(func=run_inspect)


def train_args_from_namespace(args: argparse.Namespace):
    """The TrainArgs a parsed `train` command line asks for."""
    from moeserve.training.adapter_method import MethodOptions
    from moeserve.training.trainer import TrainArgs

    options = MethodOptions(
        method=args.method, target_modules=args.target_modules, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, num_experts=args.num_experts, top_k=args.top_k, allocation=args.allocation,
        num_world_experts=args.num_world_experts, aux_loss_coef=args.aux_loss_coef, lbc_delta=args.lbc_delta,
        lbc_variant=args.lbc_variant, threshold=args.threshold, expert_config=args.expert_config,
        score_samples=args.score_samples, score_tokens=args.score_tokens,
        train_shared_experts=args.train_shared_experts, train_non_expert_modules=args.train_non_expert_modules,
    )  # fmt: skip
    return TrainArgs(
        options=options, model=args.model, data=args.data, out=args.out, general_data=args.general_data,
        mix_ratio=args.mix_ratio, max_seq_len=args.max_seq_len, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, lr_scheduler=args.lr_scheduler,
        seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, resume=args.resume, dtype=args.dtype, bf16=args.bf16, fp16=args.fp16,
        gradient_checkpointing=args.gradient_checkpointing, eval_split=args.eval_split, report_to=args.report_to,
        overwrite=args.overwrite,
    )  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from moeserve.training.trainer import train

    result = train(train_args_from_namespace(args))
    if not result.is_main_process:  # under torchrun, rank 0 reports
        return 0
    evaluated = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"
    print(
        f"{result.method} adapter written to {result.out_dir}: {result.trainable_params:,} trainable parameters "
        f"({100 * result.trainable_share:.3f}% of {result.total_params:,}), {result.adapter_bytes / 1024:.1f} KiB, "
        f"{result.global_step} steps in {result.wall_time_s:.1f} s, final loss {result.final_loss:.4f}{evaluated}"
    )
    return 0


_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def inspect_adapter(directory: str | Path) -> dict[str, Any]:
    """What `adapters inspect` reports, as a dict."""
    from safetensors import safe_open

    directory = Path(directory)
    config = AdapterConfig.load(directory)
    info: dict[str, Any] = {
        "method": config.method,
        "base_model_name": config.base_model_name,
        "base_fingerprint": config.base_fingerprint,
        "size_bytes": sum((directory / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)),
        "target_modules": config.target_modules,
    }
    experts: dict[int, dict[str, int]] = {}
    parameters = 0
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            parameters += math.prod(shape)
            match = _LAYER_PATH.search(key)
            if config.method in LORA_EXPERT_METHODS and key.endswith(".router.weight") and match:
                module = match.group(2).removesuffix(".router.weight")
                experts.setdefault(int(match.group(1)), {})[module] = shape[0]
    info["parameters"] = parameters
    if config.method in LORA_EXPERT_METHODS:
        info["experts_per_layer"] = dict(sorted(experts.items()))
        info |= {"expert_kind": config.expert_kind, "top_k": config.top_k, "rank": config.rank, "alpha": config.alpha}
    elif config.is_esft:
        info["experts_per_layer"] = dict(sorted((int(layer), ids) for layer, ids in config.experts.items()))
    else:
        info |= {"rank": config.rank, "alpha": config.alpha}
    return info


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.dir)
    print(f"adapter:      {args.dir}")
    print(f"method:       {info['method']}")
    print(f"base model:   {info['base_model_name']} (fingerprint {info['base_fingerprint'] or 'none: imported'})")
    print(f"size on disk: {info['size_bytes'] / 1024:.1f} KiB")
    print(f"parameters:   {info['parameters']:,}")
    print(f"targets:      {', '.join(info['target_modules']) or '-'}")
    if "rank" in info:
        print(f"rank / alpha: {info['rank']} / {info['alpha']}")
    if "experts_per_layer" in info:
        print("experts per layer:")
        for layer, experts in info["experts_per_layer"].items():
            if isinstance(experts, dict):
                text = ", ".join(f"{module} {n}" for module, n in experts.items())
            else:
                text = f"{len(experts)}: {experts}"
            print(f"  layer {layer}: {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    # Under torchrun every rank runs this; only rank 0 tells the story (the others still warn).
    level = args.log_level if os.environ.get("RANK", "0") == "0" else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"moeserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

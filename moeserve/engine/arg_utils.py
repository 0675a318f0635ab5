"""Command-line flags for the engine, shared by `moeserve generate` and `moeserve serve`."""

from __future__ import annotations

import argparse

from moeserve.adapters.manager import AdapterLimits
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=0, help="engine seed (requests without their own seed)")
    group.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a CPU shared with other work)"
    )
    group.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: run decode steps eagerly instead of from CUDA graphs"
    )
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: from memory)")
    group.add_argument("--kv-cache-memory-fraction", type=float, default=0.8, help="of free GPU memory")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    group.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    adapters = parser.add_argument_group("adapters")
    adapters.add_argument("--max-adapters", type=int, default=4, help="adapters resident on the device at once")
    adapters.add_argument("--max-cpu-adapters", type=int, default=16, help="adapters kept in host memory")
    adapters.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank accepted")
    adapters.add_argument("--max-lora-experts", type=int, default=16, help="most LoRA experts per adapted module")
    adapters.add_argument(
        "--esft-rows-per-layer",
        type=int,
        default=None,
        help="ESFT overlay expert rows per MoE layer (default: max-adapters * experts / 4)",
    )


def engine_config_from_args(model: str, args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        num_threads=args.threads,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_fraction=args.kv_cache_memory_fraction,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
        adapters=AdapterLimits(
            max_slots=args.max_adapters,
            max_cpu_adapters=args.max_cpu_adapters,
            max_lora_rank=args.max_lora_rank,
            max_lora_experts=args.max_lora_experts,
            esft_rows_per_layer=args.esft_rows_per_layer,
        ),
    )

"""Command-line flags for the engine, shared by `moeserve generate` and `moeserve serve`.

Each flag's dest is an engine option (moeserve.engine.config.ENGINE_OPTIONS) and its default is that option's field
default, so the flags, `LLM`'s keywords and the config dataclasses cannot disagree.
"""

from __future__ import annotations

import argparse

from moeserve.engine.config import DTYPES, ENGINE_OPTIONS, EngineConfig, build_engine_config, option_default


def _flag(group: argparse._ArgumentGroup, flag: str, option: str, **kwargs) -> None:
    group.add_argument(flag, dest=option, default=option_default(option), **kwargs)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    _flag(group, "--dtype", "dtype", choices=list(DTYPES))
    _flag(group, "--device", "device", help="cpu, cuda, cuda:1, ...")
    _flag(group, "--seed", "seed", type=int, help="engine seed (requests without their own seed)")
    _flag(
        group,
        "--threads",
        "num_threads",
        type=int,
        metavar="THREADS",
        help="torch CPU threads (1 is fastest on a CPU shared with other work)",
    )
    _flag(
        group,
        "--enforce-eager",
        "enforce_eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of from CUDA graphs",
    )
    _flag(group, "--block-size", "block_size", type=int, help="tokens per KV-cache block")
    _flag(group, "--num-kv-blocks", "num_kv_blocks", type=int, help="KV-cache blocks (default: from memory)")
    _flag(group, "--kv-cache-memory-fraction", "kv_cache_memory_fraction", type=float, help="of free GPU memory")
    _flag(group, "--no-prefix-caching", "enable_prefix_caching", action="store_false", help="disable prefix caching")
    _flag(group, "--max-num-seqs", "max_num_seqs", type=int, help="sequences running at once")
    _flag(group, "--max-num-batched-tokens", "max_num_batched_tokens", type=int, help="token budget of one step")
    _flag(group, "--max-model-len", "max_model_len", type=int, help="context length (default: the model's)")
    adapters = parser.add_argument_group("adapters")
    _flag(adapters, "--max-adapters", "max_adapters", type=int, help="adapters resident on the device at once")
    _flag(adapters, "--max-cpu-adapters", "max_cpu_adapters", type=int, help="adapters kept in host memory")
    _flag(adapters, "--max-lora-rank", "max_lora_rank", type=int, help="largest LoRA rank accepted")
    _flag(adapters, "--max-lora-experts", "max_lora_experts", type=int, help="most LoRA experts per adapted module")
    _flag(
        adapters,
        "--esft-rows-per-layer",
        "esft_rows_per_layer",
        type=int,
        help="ESFT overlay expert rows per MoE layer (default: max-adapters * experts / 4)",
    )


def engine_config_from_args(model: str, args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the engine flags in `args` (those add_engine_args added)."""
    return build_engine_config(model, **{name: getattr(args, name) for name in ENGINE_OPTIONS if hasattr(args, name)})

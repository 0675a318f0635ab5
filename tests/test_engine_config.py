"""Engine defaults have one home (the config dataclasses): the CLI flags and LLM's keywords are built from them."""

from __future__ import annotations

import pytest

from moeserve.cli import build_parser
from moeserve.engine.arg_utils import engine_config_from_args
from moeserve.engine.config import ENGINE_OPTIONS, EngineConfig, build_engine_config
from moeserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_flags_left_out_give_the_dataclass_defaults(command):
    args = build_parser().parse_args([command, "--model", "m"])
    assert engine_config_from_args("m", args) == build_engine_config("m") == EngineConfig(model="m")


def test_every_flag_sets_its_option():
    parser = build_parser()
    flags = [
        "--dtype", "bfloat16", "--device", "cuda:1", "--seed", "7", "--threads", "3", "--enforce-eager",
        "--block-size", "8", "--num-kv-blocks", "99", "--kv-cache-memory-fraction", "0.5", "--no-prefix-caching",
        "--max-num-seqs", "5", "--max-num-batched-tokens", "300", "--max-model-len", "77", "--max-adapters", "2",
        "--max-cpu-adapters", "3", "--max-lora-rank", "8", "--max-lora-experts", "4", "--esft-rows-per-layer", "6",
    ]  # fmt: skip
    got = engine_config_from_args("m", parser.parse_args(["serve", *flags]))
    expected = build_engine_config(
        "m", dtype="bfloat16", device="cuda:1", seed=7, num_threads=3, enforce_eager=True, block_size=8,
        num_kv_blocks=99, kv_cache_memory_fraction=0.5, enable_prefix_caching=False, max_num_seqs=5,
        max_num_batched_tokens=300, max_model_len=77, max_adapters=2, max_cpu_adapters=3, max_lora_rank=8,
        max_lora_experts=4, esft_rows_per_layer=6,
    )  # fmt: skip
    assert got == expected
    assert (got.cache.num_blocks, got.adapters.max_slots, got.num_threads) == (99, 2, 3)
    # Every option but the CPU cache budget has a flag.
    assert set(ENGINE_OPTIONS) - set(vars(parser.parse_args(["serve"]))) == {"kv_cache_memory_bytes"}


def test_unknown_engine_option_is_refused():
    with pytest.raises(TypeError, match="unknown engine options \\['num_blocks'\\]"):
        build_engine_config("m", num_blocks=4)  # the field's name; the option is num_kv_blocks


def test_choices_fan_out_with_consecutive_seeds():
    seeded = SamplingParams(n=3, seed=10, temperature=0.7).choices("req")
    assert [(rid, p.seed) for rid, p in seeded] == [("req-0", 10), ("req-1", 11), ("req-2", 12)]
    assert all(p.temperature == 0.7 and p.n == 3 for _, p in seeded)
    assert [p.seed for _, p in SamplingParams(n=2).choices("r")] == [None, None]

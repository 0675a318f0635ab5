"""The real-size benchmark's arithmetic and report (benchmarks/model_params.py, bench_real_size.py) and its checkpoints'
tokenizer (bench_roofline.py); nothing timed, no peers, no weights: configs only."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_real_size  # noqa: E402
from model_params import kv_per_token, layer_params, prompt_flops, step_bytes, total_params  # noqa: E402


@pytest.mark.parametrize("shape", bench_real_size.REAL_SHAPES)
def test_parameter_count_equals_transformers(shape):
    config = bench_real_size.shape_config(shape, 2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert abs(total_params(config) - real) <= 1e-4 * real  # Qwen3's per-head q/k norms are counted as an upper bound


def test_tokenizer_covers_the_vocabulary_and_round_trips_random_prompts(tmp_path):
    from bench_roofline import bpe_tokenizer
    from serving_workload import prompt_vocab

    bpe_tokenizer(50304, tmp_path)  # OLMoE's vocabulary size
    AutoConfig.for_model("olmoe", vocab_size=50304).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 50304 and tok.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 50304
    texts = [tok.decode([i]) for i in range(len(tok))]
    assert all(t and t.isascii() for t in texts)  # one complete chunk per streamed token
    vocab = prompt_vocab(tmp_path)
    assert len(vocab) == 50304 - 4
    rng = random.Random(0)
    words = [i for i in vocab if texts[i].startswith(" ")]
    prompt = [rng.choice(words) for _ in range(64)]
    assert tok.encode(tok.decode(prompt), add_special_tokens=False) == prompt
    prompt = [rng.choice(vocab) for _ in range(64)]
    assert tok.decode(tok.encode(tok.decode(prompt), add_special_tokens=False)) == tok.decode(prompt)


def test_mla_reads_the_compressed_latent_cache():
    config = bench_real_size.shape_config("deepseek-v2-lite", 2)
    assert kv_per_token(config) == 512 + 64  # kv_lora_rank + qk_rope_head_dim, not 2 x 16 heads x 192
    b = step_bytes(config, batch=32, context=136, dtype_bytes=2)
    assert b.kv == 2 * 32 * 136 * 576 * 2
    dense, moe = layer_params(config)  # first_k_dense_replace = 1
    assert dense.experts == 0 and dense.dense == 3 * 2048 * 10944
    assert moe.experts == 64 and moe.top_k == 6 and moe.shared == 2 * 3 * 2048 * 1408
    q, kv_a, kv_b, o = 2048 * 16 * 192, 2048 * 576 + 512, 512 * 16 * 256, 16 * 128 * 2048
    assert moe.attention == q + kv_a + kv_b + o + 2 * 2048


def test_decode_bytes_and_prompt_flops_follow_the_routing():
    config = bench_real_size.shape_config("olmoe-1b-7b", 1)
    (layer,) = layer_params(config)
    assert layer.touched(1) == pytest.approx(8) and layer.touched(10_000) == pytest.approx(64)
    one, many = step_bytes(config, 1, 0, 4), step_bytes(config, 32, 0, 4)
    expert_bytes = 3 * 2048 * 1024 * 4
    assert many.weights - one.weights == pytest.approx((layer.touched(32) - 8) * expert_bytes + 31 * 2048 * 4)
    per_token = layer.attention + layer.router + 8 * layer.expert
    assert prompt_flops(config, 120, 1) == 2 * 120 * per_token + 2 * 50304 * 2048


def test_layers_that_fit_the_memory_budget():
    # fp32, three engines at once: Qwen3's 152k vocabulary leaves room for one layer in 20 GiB, OLMoE's for two
    assert bench_real_size.layers_that_fit("qwen3-30b-a3b", "float32", 3, 20.0, 2) == 1
    assert bench_real_size.layers_that_fit("olmoe-1b-7b", "float32", 3, 20.0, 2) == 2
    assert bench_real_size.layers_that_fit("olmoe-1b-7b", "bfloat16", 1, 20.0, 4) == 4
    assert bench_real_size.bench_n(["32x8", "32x0"]) == 32


def test_llama_cpp_is_skipped_on_deepseek_v2_lite_with_fewer_layers(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(
        bench_real_size.subprocess, "run", lambda cmd: commands.append(cmd) or SimpleNamespace(returncode=1)
    )
    args = SimpleNamespace(systems=["moeserve", "vllm", "llama-server"], peer_cells=["4x0", "4x2"], prompt_len=8,
                           out_len=2, reps=1, models_dir=tmp_path, out_dir=tmp_path, max_seconds=60.0, run_timeout=60.0,
                           peer_start_timeout=60.0)  # fmt: skip
    config = bench_real_size.shape_config("deepseek-v2-lite", 2)
    reports = bench_real_size.serving_runs(args, "deepseek-v2-lite", config, "bfloat16", 1, tmp_path / "m")
    assert "deepseek2.attention.q_lora_rank" in reports[0]["peers_skipped"]["llama-server"]
    assert commands and not any("llama-server" in cmd for cmd in commands)
    assert (
        bench_real_size.peer_cannot_load("llama-server", bench_real_size.shape_config("deepseek-v2-lite", 27)) is None
    )
    assert bench_real_size.peer_cannot_load("llama-server", bench_real_size.shape_config("olmoe-1b-7b", 1)) is None


def _report() -> dict:
    peaks = {"1": {"threads": 1, "read_gb_s": 20.0, "copy_gb_s": 20.0,
                   "matmul_gflop_s": {"float32": 100.0, "bfloat16": 200.0}}}  # fmt: skip

    def system(tok_s: float, itl: float = 0.5) -> dict:
        return {"tok_s": tok_s, "ttft_p50": 4.0, "ttft_p99": 8.0, "itl_p50": itl, "tok_s_spread": 0.0, "reps": 1}

    serving = {"peers_skipped": {"llama-server": "llama-server skipped: not installed here"},
               "cells": [{"cell": "N=32 base", "k": 0, "systems": {"moeserve": system(60.0), "vllm": system(50.0)}},
                         {"cell": "N=32 K=8 lora uniform", "k": 8, "systems": {"moeserve": system(55.0)}}]}  # fmt: skip
    runs = [{"shape": "olmoe-1b-7b", "layers": 1, "dtype": "float32", "threads": t, "n": 32, "prompt_len": 120,
             "out_len": 32, "serving": [serving],
             "offline": {"prefill_s": 10.0, "decode_step_s": 0.25, "tok_s": 100.0 * t}} for t in (1, 2)]  # fmt: skip
    peaks["2"] = peaks["1"] | {"threads": 2}
    machine = {"cpu": "test cpu", "cores": "2", "date": "today", "commit": "abc", "torch": torch.__version__}
    config = {"n": 32, "prompt_len": 120, "out_len": 32, "reps": 1, "offline_reps": 1}
    models = {"olmoe-1b-7b": {"layers": 1, "params": 6e8, "dir": "/m", "memory_gib": 9.0}}
    return {"command": "bench_real_size.py run", "machine": machine, "config": config, "machine_peaks": peaks,
            "models": models, "runs": runs}  # fmt: skip


def test_report_rows_ratios_rooflines_and_thread_scaling(tmp_path):
    report = _report()
    config = bench_real_size.shape_config("olmoe-1b-7b", 1)
    text = bench_real_size._write(report, tmp_path, {"olmoe-1b-7b": config})

    row = report["rows"][0]
    base, lora = row["cells"]
    assert base["ratios"] == {"vllm": pytest.approx(1.2)} and lora["ratios"] == {}
    b = step_bytes(config, 32, 120 + 16, 4)
    roof = row["roofline"]
    assert roof["roofline_ms"] == pytest.approx(1000 * (b.weights + b.kv) / 20e9)
    assert roof["offline_efficiency"] == pytest.approx(roof["roofline_ms"] / 250)
    assert roof["http_efficiency"] == pytest.approx(roof["roofline_ms"] / 500)
    assert roof["offline_prefill_gflop_s"] == pytest.approx(prompt_flops(config, 32 * 120, 32) / 10.0 / 1e9)
    assert roof["http_prefill_gflop_s"] == pytest.approx(prompt_flops(config, 32 * 120, 32) / 8.0 / 1e9)
    assert report["thread_scaling"] == [{"shape": "olmoe-1b-7b", "dtype": "float32", "tok_s": {1: 100.0, 2: 200.0},
                                         "ratio": {1: 1.0, 2: 2.0}}]  # fmt: skip

    assert (tmp_path / "report.json").exists() and (tmp_path / "report.md").read_text() == text
    assert "| olmoe-1b-7b | float32 | 1 | N=32 base | 60.0 | 50.0 | - | 1.20 | - |" in text
    assert "| olmoe-1b-7b | float32 | 100.0 | 200.0 | 2.00 |" in text
    assert "llama-server skipped: not installed here" in text

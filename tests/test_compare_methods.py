"""benchmarks/compare_methods.py on the small built-in base: full fine-tuning and an adapter, scored, tabulated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_methods  # noqa: E402

from moeserve.builtin import small_test_base  # noqa: E402


def test_fft_and_an_adapter_are_trained_scored_and_tabulated(tmp_path):
    base = small_test_base()
    out = tmp_path / "out"
    argv = ["--model", str(base), "--tasks", "intent", "--methods", "fft", "esft-gate", "--steps", "3"]
    argv += ["--train-examples", "40", "--eval-examples", "4", "--lr", "fft=1e-3", "--out-dir", str(out)]
    assert compare_methods.main(argv) == 0

    header, *rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert set(header["base_scores"]) == {"intent", "general"}
    assert [(r["task"], r["method"]) for r in rows] == [("intent", "fft"), ("intent", "esft-gate")]
    fft, esft = rows
    assert fft["learning_rate"] == 1e-3 and esft["learning_rate"] == compare_methods.LEARNING_RATES["esft-gate"]
    assert fft["trainable_params"] == fft["total_params"] > esft["trainable_params"] > 0
    assert fft["stored_bytes"] > esft["stored_bytes"] > 0
    for r in rows:
        assert 0.0 <= r["task_score"] <= 1.0 and 0.0 <= r["general_score"] <= 1.0

    # Full fine-tuning wrote a whole model that differs from the base in every kind of weight.
    fft_dir = next((out / "runs").glob("intent-fft-*"))
    tuned, original = load_file(fft_dir / "model.safetensors"), load_file(base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert not torch.allclose(tuned[name].float(), original[name].float()), name

    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| intent | esft-gate |" in table

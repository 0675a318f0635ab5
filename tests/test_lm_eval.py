"""lm-eval's local-completions against the server: log-likelihood tasks (echo + logprobs, max_tokens 1) score as
lm-eval's own transformers backend does on the same model, and generate_until tasks run. The tasks and their data
are files in tests/lm_eval_tasks (no network)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

TASKS = Path(__file__).parent / "lm_eval_tasks"


def task_config(name: str) -> dict:
    config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(TASKS / path) for split, path in files.items()}
    return config


def by_doc(result: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s for s in result["samples"][task]}


def test_local_completions_loglikelihoods_equal_transformers(tiny_dir, monkeypatch):
    import lm_eval  # the dev extra; imported here, as it is slow to import

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_dir("llama")
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(max_model_len=256)
    )
    with BackgroundServer(build_server(engine_config, ServerConfig("base", str(base)))) as server:
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{server.url}/v1/completions",
                "model": "base",
                "tokenizer": str(base),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "batch_size": 4,
                "max_retries": 1,
            },
            tasks=[task_config("moeserve_mc"), task_config("moeserve_gen")],
            log_samples=True,
        )
        direct = [
            httpx.post(
                f"{server.url}/v1/completions",
                json={"prompt": s["doc"]["prompt"], "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
                timeout=60,
            ).json()["choices"][0]["text"]
            for s in served["samples"]["moeserve_gen"]
        ]
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(base), "dtype": "float32", "device": "cpu"},
        tasks=[task_config("moeserve_mc")],
        log_samples=True,
    )
    ours, theirs = by_doc(served, "moeserve_mc"), by_doc(reference, "moeserve_mc")
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    for doc_id, sample in ours.items():
        got = [float(r[0][0]) for r in sample["resps"]]
        want = [float(r[0][0]) for r in theirs[doc_id]["resps"]]
        assert got == pytest.approx(want, abs=1e-4), doc_id
        assert [bool(r[0][1]) for r in sample["resps"]] == [bool(r[0][1]) for r in theirs[doc_id]["resps"]]
        assert all(g < 0 for g in got)  # a real score, not an empty context's 0
    assert served["results"]["moeserve_mc"]["acc,none"] == reference["results"]["moeserve_mc"]["acc,none"]
    generated = [s["resps"][0][0] for s in served["samples"]["moeserve_gen"]]
    assert len(generated) == 4 and generated == direct

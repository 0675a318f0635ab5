"""The built-in base models: shipped, loadable by transformers and moeserve alike, and they know something."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moeserve.builtin import BUILTIN_MODELS, builtin_model_dir, locate, small_test_base
from moeserve.demo.offline_eval import complete
from moeserve.demo.pretraining.config import BASE, PRESETS, SMALL_TEST, DataMix, ModelShape, Schedule
from moeserve.demo.pretraining.ensure import ensure_builtin_model
from moeserve.demo.tasks import TASKS, get_task
from moeserve.forward_context import ForwardContext, forward_context
from moeserve.models import load_model

MAX_TOKENS = 128  # prompt + completion of every task example must fit well inside this


@pytest.fixture(scope="module", params=["base", "small-test"])
def model_dir(request):
    return builtin_model_dir(request.param)


def test_both_presets_are_shipped():
    for config in (BASE, SMALL_TEST):
        assert locate.is_model_dir(locate.DATA_DIR / config.name), f"{config.name} is not shipped"
    assert small_test_base() == locate.DATA_DIR / SMALL_TEST.name
    with pytest.raises(ValueError, match="unknown built-in model"):
        builtin_model_dir("huge")
    assert {preset: config.name for preset, config in PRESETS.items()} == BUILTIN_MODELS


def test_serving_only_looks_for_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "DATA_DIR", tmp_path / "not-shipped")
    monkeypatch.setenv("MOESERVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="moeserve-small-test is neither shipped .* nor in the cache"):
        small_test_base()
    assert not (tmp_path / "cache").exists()


def test_shipped_config_matches_the_preset(model_dir):
    preset = next(p for p in PRESETS.values() if p.name == model_dir.name)
    config = AutoConfig.from_pretrained(model_dir)
    shape = preset.model
    assert config.model_type == "qwen2_moe"
    assert (config.num_experts, config.num_experts_per_tok) == (shape.num_experts, shape.top_k)
    assert (config.num_hidden_layers, config.hidden_size) == (shape.num_layers, shape.hidden_size)
    assert config.shared_expert_intermediate_size == shape.shared_expert_size
    assert config.vocab_size == shape.vocab_size
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    assert size < 20 * 2**20  # the package may ship at most 20 MB


def test_tokenizer_chat_template_and_lengths(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|endoftext|>"
    hi = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(hi, tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.tokenize(" 42") == ["Ġ", "4", "2"]  # one token per digit
    for name, task in TASKS.items():
        for rec in task.generate("test", 100, seed=0):
            n = len(tokenizer(rec["prompt"])["input_ids"]) + len(tokenizer(rec["completion"])["input_ids"])
            assert n < MAX_TOKENS, (name, rec)
            completion = len(tokenizer(rec["completion"])["input_ids"])
            assert completion < task.max_new_tokens, (name, rec)


def test_moeserve_matches_transformers(model_dir):
    """Our implementation gives transformers' logits on the shipped weights (a packed batch of two prompts)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [r["prompt"] for name in ("math", "intent") for r in get_task(name).generate("test", 1, seed=0)]
    seqs = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir, dtype=torch.float32)
    lens = [len(s) for s in seqs]
    with torch.no_grad(), forward_context(ForwardContext.for_sequences(lens)):
        got = ours.compute_logits(ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens])))
    with torch.no_grad():
        expected = torch.cat([reference(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task_name", ["math", "intent", "translate", "general"])
def test_greedy_generation_agrees_between_moeserve_and_transformers(task_name):
    task = get_task(task_name)
    prompts = [r["prompt"] for r in task.generate("test", 4, seed=0)]
    base = builtin_model_dir()
    assert complete(base, prompts, task.max_new_tokens, "moeserve") == complete(
        base, prompts, task.max_new_tokens, "transformers"
    )


def test_transformers_backend_refuses_adapters(tmp_path):
    with pytest.raises(ValueError, match="transformers backend scores base models only"):
        complete(builtin_model_dir(), ["1 + 1 ="], 4, "transformers", adapter=tmp_path)


def test_base_knows_something():
    """The base scores above zero on its test splits (a few examples each, so the test stays fast)."""
    base = builtin_model_dir()
    scores = {}
    for name in ("math", "intent", "translate", "general"):
        task = get_task(name)
        records = task.generate("test", 8, seed=0)
        predictions = complete(base, [r["prompt"] for r in records], task.max_new_tokens)
        scores[name] = task.evaluate(predictions, [r["completion"] for r in records])["score"]
    assert max(scores.values()) > 0, scores
    assert sum(score > 0 for score in scores.values()) >= 2, scores


MICRO = replace(
    SMALL_TEST,
    name="moeserve-micro-test",
    model=ModelShape(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=4,
                     top_k=2, expert_size=16, shared_expert_size=32),
    data=DataMix(examples={"math": 20, "intent": 20, "translate": 20, "general": 20}),
    schedule=Schedule(steps=2, batch_size=2, seq_len=128),
)  # fmt: skip


def test_missing_model_is_pretrained_into_the_cache_reproducibly(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "DATA_DIR", tmp_path / "not-shipped")
    monkeypatch.setitem(PRESETS, "micro", MICRO)
    monkeypatch.setenv("MOESERVE_CACHE", str(tmp_path / "cache"))
    first = ensure_builtin_model("micro")
    assert first == tmp_path / "cache" / MICRO.name and locate.is_model_dir(first)
    assert ensure_builtin_model("micro") == first  # cached: not trained again
    weights = load_file(first / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    load_model(first)  # moeserve loads what the pretraining wrote

    from moeserve.demo.pretraining.pretrain import pretrain

    again = load_file(pretrain(MICRO, tmp_path / "again").out_dir / "model.safetensors")
    assert weights.keys() == again.keys()
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], atol=0, rtol=0)

"""Greedy generations of the engine against transformers' generate, on every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeserve import LLM, SamplingParams

PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "a",
    "The quick brown fox",
    "Hello world, this is a somewhat longer prompt that spans several KV blocks of four tokens each.",
]
MAX_TOKENS = 10


def hf_greedy(model_dir, tokenizer, prompts, max_tokens):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # compare full-length generations, as ignore_eos does
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = ref.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def references(tiny_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            llm = LLM(tiny_dir(arch), num_kv_blocks=256, max_model_len=256)
            cache[arch] = hf_greedy(tiny_dir(arch), llm.tokenizer, PROMPTS, MAX_TOKENS)
        return cache[arch]

    return get


def greedy(max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_batch_submitted_together_matches_transformers(tiny_dir, arch, references):
    # Small blocks and a small token budget: prompts cross block boundaries and prefill in chunks.
    llm = LLM(tiny_dir(arch), block_size=4, num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in outs] == references(arch)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_staggered_arrivals_match_transformers(tiny_dir, arch, references):
    """Requests added while others are mid-generation get exactly what they get alone."""
    llm = LLM(tiny_dir(arch), block_size=4, num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=24)
    engine = llm.engine
    results: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, greedy())
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [results[f"r{i}"] for i in range(len(PROMPTS))] == references(arch)

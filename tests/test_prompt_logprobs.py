"""Prompt logprobs from the prefill the engine runs anyway (chunked or not), against transformers' log_softmax, and
their OpenAI (echo + logprobs, max_tokens 0) and vLLM (prompt_logprobs) shapes over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve import LLM, SamplingParams
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

PROMPT = "Return a new list with the items of the sequence, sorted, and the sum of the items at the end."


def reference(model_dir, token_ids: list[int], k: int) -> list[tuple[float, dict[int, float], int]]:
    """(logprob of token i given the ones before, top k, rank) for i >= 1, from transformers' logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)  # [L, V]
    out = []
    for i in range(1, len(token_ids)):
        row, chosen = logprobs[i - 1], logprobs[i - 1, token_ids[i]]
        top = row.topk(k)
        rank = int((row > chosen).sum()) + 1
        out.append((chosen.item(), dict(zip(top.indices.tolist(), top.values.tolist())), rank))
    return out


@pytest.mark.parametrize("chunk", [4096, 7], ids=["one-prefill", "chunked"])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny_dir, chunk):
    base = tiny_dir("olmoe")
    llm = LLM(base, block_size=4, num_kv_blocks=128, max_model_len=128, max_num_batched_tokens=chunk)
    ids = llm.tokenizer.encode(PROMPT)
    expected = reference(base, ids, 3)
    for max_tokens in (0, 2):
        # Twice: the second request would find the prompt in the prefix cache; it must still get every logprob.
        for _ in range(2):
            out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=3))[0]
            got = out.prompt_logprobs
            assert got[0] is None and len(got) == len(ids)
            for lp, token, (want, top, rank) in zip(got[1:], ids[1:], expected):
                assert lp.token_id == token
                assert lp.logprob == pytest.approx(want, abs=1e-4)
                assert list(lp.top) == list(top)
                assert list(lp.top.values()) == pytest.approx(list(top.values()), abs=1e-4)
                assert lp.rank == rank
            assert len(out.outputs[0].token_ids) == max_tokens
            assert out.outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def server(tiny_dir):
    base = tiny_dir("llama")
    engine_config = EngineConfig(
        model=str(base),
        cache=CacheConfig(block_size=4, num_blocks=128),
        scheduler=SchedulerConfig(max_model_len=128, max_num_batched_tokens=9),  # prompts prefill in chunks
    )
    with BackgroundServer(build_server(engine_config, ServerConfig("base", str(base)))) as s:
        yield s, base


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_echo_with_logprobs_in_openai_shape(server):
    s, base = server
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.encode(PROMPT)
    expected = reference(base, ids, 2)
    for max_tokens in (0, 3):
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": 2, "temperature": 0}
        choice = post(s, "/v1/completions", body).json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for got, (want, *_) in zip(lp["token_logprobs"][1 : len(ids)], expected):
            assert got == pytest.approx(want, abs=1e-4)
        for top, (_, alternatives, _) in zip(lp["top_logprobs"][1 : len(ids)], expected):
            # Keyed by text, as OpenAI's: two ids that decode alike (partial UTF-8 bytes) share an entry.
            assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(max(alternatives.values()), abs=1e-4)
        assert choice["text"].startswith(PROMPT)
        if max_tokens == 0:
            assert choice["text"] == PROMPT
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets)
        assert "".join(lp["tokens"]) == choice["text"]
        assert all(choice["text"].startswith(t, o) for o, t in zip(offsets, lp["tokens"]))
        # Streamed, the echo and its logprobs come first, then the answer's.
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}) as r:
            pieces = [json.loads(line[6:])["choices"] for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c[0]["text"] for c in pieces if c) == choice["text"]
        streamed = [x for c in pieces if c and c[0]["logprobs"] for x in c[0]["logprobs"]["token_logprobs"]]
        assert streamed == lp["token_logprobs"]


def test_vllm_prompt_logprobs_on_completions_and_chat(server):
    s, base = server
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.encode(PROMPT)
    expected = reference(base, ids, 1)
    choice = post(s, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1}).json()["choices"][0]
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for entry, token, (want, *_) in zip(plp[1:], ids[1:], expected):
        assert entry[str(token)]["logprob"] == pytest.approx(want, abs=1e-4)
        assert entry[str(token)]["decoded_token"] == tok.decode([token])
        assert 1 <= len(entry) <= 2 and all(v["rank"] >= 1 for v in entry.values())
    messages = [{"role": "user", "content": "Sort the list."}]
    chat = post(s, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "prompt_logprobs": 0}).json()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tok.encode(text, add_special_tokens=False)
    assert len(chat["prompt_logprobs"]) == len(chat_ids) and chat["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])
    # Streaming sends them once, with the first chunk that has text.
    body = {"prompt": PROMPT, "max_tokens": 2, "stream": True, "prompt_logprobs": 0}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    with_plp = [json.loads(c[6:])["choices"][0].get("prompt_logprobs") for c in chunks]
    assert sum(p is not None for p in with_plp) == 1 and len(next(p for p in with_plp if p)) == len(ids)

"""The HTTP server on loopback, driven by the official openai client and by plain HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import openai
import pytest
from adapter_factory import make_esft, make_peft_lora
from prometheus_client.parser import text_string_to_metric_families

from moeserve import LLM, SamplingParams
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

KEY = "test-key"
PROMPTS = ["The list type is", "A dictionary maps keys", "Return the sum of the items"]


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("served")
    adapters = {
        "esft": make_esft(base, root / "esft", seed=1)[0],
        "lora": make_peft_lora(base, root / "lora", seed=2, targets=("q_proj", "o_proj"))[0],
    }
    spare = make_esft(base, root / "spare", seed=3)[0]
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(max_model_len=128)
    )
    config = ServerConfig(
        served_model_name="base",
        model_path=str(base),
        api_key=KEY,
        enable_adapter_loading=True,
        allowed_adapter_dirs=[root],
    )
    app = build_server(engine_config, config, adapters)
    with BackgroundServer(app) as server:
        offline = LLM(base, block_size=4, num_kv_blocks=256, max_model_len=128, adapters=adapters)
        yield server, offline, app, spare, root


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def offline_text(offline, prompt, adapter, **kw):
    params = SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 12), ignore_eos=True, **kw)
    return offline.generate(prompt, params, adapter=adapter)[0].outputs[0]


def test_completions_match_offline_engine_for_base_and_adapters(setup):
    server, offline, *_ = setup
    c = client(server)
    for model, adapter in (("base", None), ("esft", "esft"), ("lora", "lora")):
        r = c.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        expected = offline_text(offline, PROMPTS[0], adapter)
        assert r.choices[0].text == expected.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPTS[0]))
    base = (
        c.completions.create(
            model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    tuned = (
        c.completions.create(
            model="esft", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    assert base != tuned


def test_concurrent_streams_for_mixed_adapters_match_offline(setup):
    server, offline, *_ = setup

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

        async def one(model, prompt):
            stream = await c.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        jobs = [(m, p) for m in ("base", "esft", "lora") for p in PROMPTS]
        return jobs, await asyncio.gather(*(one(m, p) for m, p in jobs))

    jobs, results = asyncio.run(run())
    for (model, prompt), (text, finish) in zip(jobs, results):
        assert text == offline_text(offline, prompt, None if model == "base" else model).text
        assert finish == "length"


def test_chat_streamed_and_not_match_offline(setup):
    server, offline, *_ = setup
    c = client(server)
    messages = [{"role": "user", "content": "Say something about lists."}]
    prompt_ids = offline.tokenizer.encode(
        offline.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    expected = offline_text(offline, prompt_ids, "lora", max_tokens=10)
    r = c.chat.completions.create(
        model="lora", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    stream = c.chat.completions.create(
        model="lora",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_n_seed_and_logprobs(setup):
    server, offline, *_ = setup
    c = client(server)
    r = c.completions.create(
        model="base",
        prompt=PROMPTS[1],
        max_tokens=6,
        temperature=1.0,
        n=2,
        seed=7,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in r.choices] == [0, 1]
    for i, choice in enumerate(r.choices):
        solo = offline.generate(
            PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=6, seed=7 + i, ignore_eos=True, logprobs=3)
        )[0].outputs[0]
        assert choice.text == solo.text
        assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in solo.logprobs], abs=1e-5)
        assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    chat = c.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_models_lists_base_and_adapters(setup):
    server, *_ = setup
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) >= {"base", "esft", "lora"}
    assert models["esft"].parent == "base" and models["esft"].root.endswith("esft")


def test_load_use_unload_over_http(setup):
    server, offline, _, spare, _ = setup
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": str(spare)})
        assert r.status_code == 200, r.text
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": str(spare)}).status_code == 400
        c = client(server)
        out = c.completions.create(
            model="spare", prompt=PROMPTS[2], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        offline.engine.adapters.register("spare", spare)
        assert out.choices[0].text == offline_text(offline, PROMPTS[2], "spare", max_tokens=8).text

        # A long request in flight while the adapter is unloaded still finishes.
        with h.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "spare",
                "prompt": PROMPTS[2],
                "max_tokens": 40,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            },
        ) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"]
            assert h.post("/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 200
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(x[5:])["choices"][0]["finish_reason"] for x in rest[:-1] if json.loads(x[5:])["choices"]]
        assert finishes[-1] == "length"
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="spare", prompt="x", max_tokens=2)
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 404


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
    return body["error"]


def test_error_statuses_and_shapes(setup, tmp_path):
    server, _, app, _, root = setup
    good = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        error_of(h.post("/v1/completions", json={"model": "base", "prompt": "x"}), 401)
        error_of(
            h.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers={"Authorization": "Bearer no"}),
            401,
        )
        error_of(h.get("/v1/models"), 401)
        error_of(h.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=good), 404)
        error_of(
            h.post(
                "/v1/chat/completions",
                json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                headers=good,
            ),
            404,
        )
        e = error_of(
            h.post("/v1/completions", json={"model": "base", "prompt": "x", "temperature": -1}, headers=good), 400
        )
        assert "temperature" in e["message"]
        error_of(h.post("/v1/completions", json={"model": "base"}, headers=good), 400)
        error_of(
            h.post("/v1/completions", content=b"{not json", headers={**good, "content-type": "application/json"}), 400
        )
        e = error_of(h.post("/v1/completions", json={"model": "base", "prompt": "word " * 300}, headers=good), 400)
        assert "context" in e["message"]
        e = error_of(
            h.post("/v1/completions", json={"model": "base", "prompt": "word " * 300, "stream": True}, headers=good),
            400,
        )
        error_of(h.post("/v1/chat/completions", json={"model": "base", "messages": []}, headers=good), 400)
        error_of(
            h.post(
                "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / ".." / "..")}, headers=good
            ),
            400,
        )
        error_of(h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=good), 400)
        bad = shutil.copytree(root / "esft", root / "corrupt")
        (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
        e = error_of(h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(bad)}, headers=good), 400)
        assert "safetensors" in e["message"] or "cannot read" in e["message"]
        assert h.get("/health").status_code == 200
        # Nothing above broke the server.
        ok = h.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2}, headers=good)
        assert ok.status_code == 200


def test_full_queue_is_refused_with_429(tiny_dir):
    base = tiny_dir("llama")
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_model_len=128)
    )
    app = build_server(engine_config, ServerConfig(served_model_name="base", model_path=str(base)), max_waiting=0)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as h:
        error_of(h.post("/v1/completions", json={"model": "base", "prompt": "x"}), 429)


def test_disconnected_stream_is_aborted_and_frees_its_blocks(setup):
    server, _, app, *_ = setup
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        with h.stream(
            "POST",
            "/v1/completions",
            json={"model": "base", "prompt": PROMPTS[0], "max_tokens": 100, "stream": True, "ignore_eos": True},
        ) as s:
            next(line for line in s.iter_lines() if line.startswith("data:"))
        # closed after the first chunk: the engine core must drop the request and free its blocks
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            gauges = {
                s.name: s.value
                for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                for s in f.samples
            }
            if gauges["vllm:num_requests_running"] == 0 and gauges["vllm:num_requests_waiting"] == 0:
                break
            time.sleep(0.05)
        assert gauges["vllm:num_requests_running"] == 0 and gauges["vllm:kv_cache_usage_perc"] == 0.0


def test_metrics_parse_and_move_with_traffic(setup):
    server, *_ = setup

    def scrape():
        text = httpx.get(f"{server.url}/metrics").text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values.setdefault(sample.name, 0.0)
                values[sample.name] += sample.value
        return values

    before = scrape()
    client(server).completions.create(
        model="esft", prompt="hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    after = scrape()
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 5
    assert after["vllm:prompt_tokens_total"] > before.get("vllm:prompt_tokens_total", 0)
    assert after["vllm:e2e_request_latency_seconds_count"] > before.get("vllm:e2e_request_latency_seconds_count", 0)
    assert after["vllm:time_to_first_token_seconds_count"] > before.get("vllm:time_to_first_token_seconds_count", 0)
    assert "vllm:kv_cache_usage_perc" in after and "vllm:lora_requests_info" in after
    assert after["moeserve:adapter_slots_resident"] >= 1


def test_openapi_documents_every_route(setup):
    server, *_ = setup
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for route in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/health",
        "/version",
        "/metrics",
    ):
        assert route in paths
    assert httpx.get(f"{server.url}/version").json()["version"]

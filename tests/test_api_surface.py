"""The API's surface beside generation: every OpenAI request field honoured or refused, /tokenize, /detokenize,
/ping, CORS, `model` omitted, and the cache metrics gateways read."""

from __future__ import annotations

import httpx
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from prometheus_client.parser import text_string_to_metric_families

from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

KEY = "surface-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Say something."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}

# Every field of OpenAI's request schemas (the `openai` package's own types), with a value that asks for something:
# each is honoured (200) or refused (400 naming it). A field OpenAI adds later fails the walk until it is sorted.
COMPLETION_HONOURED = {
    "model": "base",
    "prompt": "Hello",
    "best_of": 1,
    "echo": True,
    "frequency_penalty": 0.5,
    "logit_bias": {"5": 1.0},
    "logprobs": 2,
    "max_tokens": 3,
    "n": 2,
    "presence_penalty": 0.5,
    "seed": 7,
    "stop": ["\n\n"],
    "stream": False,
    "stream_options": {"include_usage": True},
    "temperature": 0.7,
    "top_p": 0.9,
    "user": "user-1",
}
COMPLETION_REFUSED = {"suffix": " world"}
CHAT_HONOURED = {
    "model": "base",
    "messages": MESSAGES,
    "frequency_penalty": 0.5,
    "logit_bias": {"5": 1.0},
    "logprobs": True,
    "top_logprobs": 2,
    "max_completion_tokens": 3,
    "max_tokens": 3,
    "modalities": ["text"],
    "n": 2,
    "parallel_tool_calls": False,
    "presence_penalty": 0.5,
    "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}},
    "safety_identifier": "user-1",
    "seed": 7,
    "service_tier": "auto",
    "stop": ["\n\n"],
    "store": False,
    "stream": False,
    "stream_options": {"include_usage": True},
    "temperature": 0.7,
    "tool_choice": "required",
    "tools": [TOOL],
    "top_p": 0.9,
    "user": "user-1",
}
CHAT_REFUSED = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "function_call": "auto",
    "functions": [TOOL["function"]],
    "metadata": {"k": "v"},
    "moderation": {"model": "omni-moderation-latest"},
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "auto"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
}
# Values of honoured fields that ask for what we lack, and vLLM fields we do not implement: refused by name.
CHAT_REFUSED_VALUES = {"modalities": ["text", "audio"], "service_tier": "flex", "store": True}
UNKNOWN_FIELDS = {"use_beam_search": True, "min_tokens": 2, "chat_template_kwargs": {"x": 1}, "priority": 1}


@pytest.fixture(scope="module")
def server(tiny_dir):
    base = tiny_dir("llama")
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(max_model_len=512)
    )
    config = ServerConfig(
        served_model_name="base",
        model_path=str(base),
        api_key=KEY,
        allowed_origins=["https://app.example"],
        tool_call_parser="hermes",
    )
    with BackgroundServer(build_server(engine_config, config)) as s:
        yield s


def post(server, path, body, headers=AUTH):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


def refused_naming(response, field):
    assert response.status_code == 400, (field, response.text)
    error = response.json()["error"]
    assert field in (error.get("param") or "") or field in error["message"], (field, error)


def test_schema_fields_are_all_sorted():
    completion = set(completion_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    chat = set(chat_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert completion == set(COMPLETION_HONOURED) | set(COMPLETION_REFUSED)
    assert chat == set(CHAT_HONOURED) | set(CHAT_REFUSED)


def test_every_completion_field_is_honoured_or_refused(server):
    base = {"model": "base", "prompt": "Hello", "max_tokens": 3}
    for field, value in COMPLETION_HONOURED.items():
        r = post(server, "/v1/completions", {**base, field: value})
        assert r.status_code == 200, (field, r.text)
    for field, value in {**COMPLETION_REFUSED, **UNKNOWN_FIELDS}.items():
        refused_naming(post(server, "/v1/completions", {**base, field: value}), field)


def test_every_chat_field_is_honoured_or_refused(server):
    base = {"model": "base", "messages": MESSAGES, "max_tokens": 3}
    for field, value in CHAT_HONOURED.items():
        body = {**base, field: value}
        if field == "tool_choice":
            body["tools"] = [TOOL]
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 200, (field, r.text)
    for field, value in {**CHAT_REFUSED, **CHAT_REFUSED_VALUES, **UNKNOWN_FIELDS}.items():
        refused_naming(post(server, "/v1/chat/completions", {**base, field: value}), field)
    bad_message = {**base, "messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}
    refused_naming(post(server, "/v1/chat/completions", bad_message), "audio")


def test_logit_bias_moves_the_greedy_token(server):
    body = {"model": "base", "prompt": "Hello", "max_tokens": 1, "temperature": 0, "logprobs": 0}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"][0]
    target = 300 if plain != "x" else 301
    biased = post(server, "/v1/completions", {**body, "logit_bias": {str(target): 100}}).json()
    ids = post(server, "/tokenize", {"prompt": biased["choices"][0]["text"], "add_special_tokens": False}).json()
    assert ids["tokens"] == [target]
    refused_naming(post(server, "/v1/completions", {**body, "logit_bias": {"99999": 1}}), "logit_bias")
    refused_naming(post(server, "/v1/completions", {**body, "logit_bias": {"5": 101}}), "logit_bias")


def test_model_omitted_is_the_base_model(server):
    with_model = post(server, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
    without = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert without.status_code == 200 and without.json()["model"] == "base"
    assert without.json()["choices"][0]["text"] == with_model.json()["choices"][0]["text"]
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["model"] == "base"


def test_tokenize_and_detokenize_in_vllm_shapes(server, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir("llama"))
    r = post(server, "/tokenize", {"model": "base", "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    plain = post(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("Hello world", add_special_tokens=False) and plain["token_strs"] is None
    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    back = post(server, "/detokenize", {"model": "base", "tokens": plain["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    refused_naming(post(server, "/detokenize", {"tokens": [10**7]}), "tokens")
    refused_naming(post(server, "/tokenize", {"prompt": "x", "truncate": 3}), "truncate")


def test_ping_and_cors(server):
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert httpx.post(f"{server.url}/ping").status_code == 200
    preflight = httpx.options(
        f"{server.url}/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200  # no key: browsers send none with a preflight
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{server.url}/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # A real request without the key is still refused, and the browser may read why.
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x"}, headers={"Origin": "https://app.example"}, timeout=60
    )
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


def scrape(server):
    values: dict[str, float] = {}
    labels: dict[str, dict] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            labels[sample.name] = sample.labels
    return values, labels


def test_cache_metrics(server):
    before, labels = scrape(server)
    expected = {"block_size": "4", "num_gpu_blocks": "256", "enable_prefix_caching": "True"}
    assert labels["vllm:cache_config_info"] == expected
    prompt = "The same long prompt, sent twice, shares its cached blocks."
    for _ in range(2):
        post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    after, _ = scrape(server)
    queries = after["vllm:prefix_cache_queries_total"] - before.get("vllm:prefix_cache_queries_total", 0)
    hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0)
    n = post(server, "/tokenize", {"prompt": prompt}).json()["count"]
    assert queries == 2 * n
    assert hits == (n - 1) // 4 * 4  # the second request finds every full block but the last token's
    assert "vllm:num_preemptions_total" in after


def test_preemptions_are_counted(tiny_dir):
    base = tiny_dir("llama")
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=12), scheduler=SchedulerConfig(max_model_len=40)
    )
    config = ServerConfig(served_model_name="base", model_path=str(base))
    with BackgroundServer(build_server(engine_config, config)) as s:
        import concurrent.futures

        body = {"prompt": "one two three four five", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: post(s, "/v1/completions", body, {}), range(4)))
        assert all(r.status_code == 200 for r in results)
        assert len({r.json()["choices"][0]["text"] for r in results}) == 1  # recomputation lost nothing
        values, _ = scrape(s)
        assert values["vllm:num_preemptions_total"] >= 1

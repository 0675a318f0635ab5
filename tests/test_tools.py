"""Tools on chat: rendered by the chat template, calls parsed from the output (Hermes format), tool_choice
"required" and named functions enforced with structured outputs, streamed tool-call deltas."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from moeserve.builtin import small_test_base
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server
from moeserve.server.tool_parser import HermesToolParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIMER = {
    "type": "function",
    "function": {
        "name": "set_timer",
        "description": "Start a kitchen timer.",
        "parameters": {
            "type": "object",
            "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120}},
            "required": ["minutes"],
        },
    },
}
TOOLS = [WEATHER, TIMER]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, and set a timer for 10 minutes."}]


@pytest.fixture(scope="module")
def server():
    base = small_test_base()
    # The tools in the system turn take ~490 of the model's 512 positions: let the answer run past them (the grammar
    # holds its shape; RoPE positions are computed, not tabled).
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=16, num_blocks=256), scheduler=SchedulerConfig(max_model_len=1024)
    )
    config = ServerConfig(served_model_name="base", model_path=str(base), tool_call_parser="hermes")
    with BackgroundServer(build_server(engine_config, config)) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def check_calls(calls):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def required(server, **kw):
    body = {"model": "base", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 100}
    return client(server).chat.completions.create(**{**body, **kw})


@pytest.mark.parametrize("seed", [0, 1])
def test_required_tool_call_validates_against_its_schema(server, seed):
    choice = required(server, temperature=1.0, seed=seed, parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)


def test_required_parallel_calls_all_validate(server):
    choice = required(server, temperature=1.0, seed=2).choices[0]
    # The model may keep calling until max_tokens: every complete call is returned; a cut one is not.
    assert choice.finish_reason in ("tool_calls", "length")
    check_calls(choice.message.tool_calls)


def test_named_tool_choice(server):
    r = required(server, tool_choice={"type": "function", "function": {"name": "set_timer"}}, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["set_timer"] and r.choices[0].finish_reason == "tool_calls"
    check_calls(calls)


def test_required_tool_calls_streamed(server):
    stream = required(server, temperature=1.0, seed=4, parallel_tool_calls=False, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls" and len(calls) == 1
    for call in calls.values():
        assert call["id"]
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    # The same request unstreamed gives the same call.
    whole = required(server, temperature=1.0, seed=4, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in whole] == [(calls[0]["name"], calls[0]["arguments"])]


def test_tool_results_round_trip_through_the_template(server):
    c = client(server)
    first = required(server, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = MESSAGES + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
    ]
    second = c.chat.completions.create(model="base", messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in text and call.function.name in text


def test_tool_requests_refused_by_name(server, tiny_dir, tmp_path):
    base = {"model": "base", "messages": MESSAGES, "max_tokens": 4}

    def error(body, field, url=server.url):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert field in (e.get("param") or "") + e["message"], e

    error({**base, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")
    error({**base, "tool_choice": "required"}, "tool_choice")  # no tools to choose from
    error({**base, "tools": [{"type": "web_search"}]}, "tools")
    both = {**base, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}
    error(both, "response_format")
    # A server without --tool-call-parser refuses "auto"; a model whose chat template cannot render tools refuses
    # them (rather than leaving them out of the prompt).
    plain = shutil.copytree(tiny_dir("llama"), tmp_path / "plain")
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    engine_config = EngineConfig(
        model=str(plain), cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_model_len=128)
    )
    with BackgroundServer(build_server(engine_config, ServerConfig("base", str(plain)))) as other:
        error({**base, "tools": TOOLS}, "tool_choice", other.url)  # auto is the default with tools
        error({**base, "tools": TOOLS, "tool_choice": "required"}, "tools", other.url)
        body = {**base, "tools": TOOLS, "tool_choice": "none"}
        ok = httpx.post(f"{other.url}/v1/chat/completions", json=body, timeout=60)
        assert ok.status_code == 200 and not ok.json()["choices"][0]["message"].get("tool_calls")


def test_hermes_parser_whole_and_streamed():
    parser = HermesToolParser()
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 10}}\n</tool_call>'
    )
    content, calls = parser.extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("set_timer", {"minutes": 10}),
    ]
    assert parser.extract("no calls here") == ("no calls here", [])
    assert parser.extract("<tool_call>\nnot json\n</tool_call>")[1] == []
    for step in (1, 3, 7, len(text)):
        stream, content, streamed = parser.stream(), "", []
        for i in range(0, len(text), step):
            piece, done = stream.feed(text[i : i + step])
            content += piece
            streamed += done
        content += stream.finish()
        assert content.strip() == "Let me check."
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    stream = parser.stream()
    assert stream.feed("a <tool_c") == ("a ", [])
    assert stream.feed("hat> b") == ("<tool_chat> b", [])

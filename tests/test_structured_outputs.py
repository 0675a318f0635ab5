"""Structured outputs: JSON schema, json_object, choice, regex and EBNF, through the HTTP API (the openai client) and
the offline engine, base model and adapter mixed in one batch, grammars compiled once."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from adapter_factory import make_peft_lora

from moeserve import LLM, SamplingParams
from moeserve.builtin import small_test_base
from moeserve.demo.tasks.intent import IntentTask, intent_schema
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.engine.sampling_params import StructuredOutputsParams
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

SCHEMA = intent_schema()
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe later"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = small_test_base()
    # A mild adapter: it changes the answers, and leaves a model that still writes JSON when asked for an object.
    lora_dir = tmp_path_factory.mktemp("so") / "lora"
    adapter = make_peft_lora(base, lora_dir, seed=4, targets=("q_proj", "o_proj"), scale=0.05)[0]
    engine_config = EngineConfig(
        model=str(base),
        cache=CacheConfig(block_size=16, num_blocks=1024),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=128),
    )
    app = build_server(engine_config, ServerConfig(served_model_name="base", model_path=str(base)), {"intent": adapter})
    with BackgroundServer(app) as server:
        yield server, base, adapter


def commands(n: int) -> list[str]:
    return [r["prompt"] for r in IntentTask().generate("test", n, seed=3)]


def test_json_schema_100_requests_base_and_adapter_mixed(served):
    server, *_ = served

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA, "strict": True}}

        async def one(i, command):
            return await c.chat.completions.create(
                model="intent" if i % 2 else "base",
                messages=[{"role": "user", "content": command}],
                response_format=fmt,
                max_tokens=64,
                temperature=0 if i % 4 < 2 else 1.0,
                seed=i,
            )

        return await asyncio.gather(*(one(i, cmd) for i, cmd in enumerate(commands(100))))

    replies = asyncio.run(run())
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert {r.model for r in replies} == {"base", "intent"}


def test_json_object_always_parses(served):
    server, *_ = served
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    for i, command in enumerate(commands(8)):
        r = c.completions.create(
            model="intent" if i % 2 else "base",
            prompt=command,
            max_tokens=128,
            temperature=0 if i < 4 else 0.7,
            seed=i,
            extra_body={"response_format": {"type": "json_object"}},
        )
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].text), dict)


def post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_choice_regex_and_grammar_on_completions_and_chat(served):
    server, *_ = served
    for i, prompt in enumerate(commands(2)):  # base, then the adapter
        model = "intent" if i % 2 else "base"
        sampled = {"temperature": 1.0, "seed": i, "max_tokens": 24}
        for field, value in (("structured_outputs", {"choice": CHOICES}), ("guided_choice", CHOICES)):
            text = post(server, "/v1/completions", {"model": model, "prompt": prompt, field: value, **sampled})
            assert text.json()["choices"][0]["text"] in CHOICES
        for field, value in (("structured_outputs", {"regex": REGEX}), ("guided_regex", REGEX)):
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], field: value, **sampled}
            reply = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
            assert re.fullmatch(REGEX, reply), reply
        grammar = 'root ::= "on" | "off" | "level " [1-9]'
        for field, value in (("structured_outputs", {"grammar": grammar}), ("guided_grammar", grammar)):
            text = post(server, "/v1/completions", {"model": model, "prompt": prompt, field: value, **sampled})
            assert re.fullmatch(r"on|off|level [1-9]", text.json()["choices"][0]["text"])
        schema = {"structured_outputs": {"json": SCHEMA}, "max_tokens": 64, "temperature": 0}
        text = post(server, "/v1/completions", {"model": model, "prompt": prompt, **schema}).json()
        jsonschema.validate(json.loads(text["choices"][0]["text"]), SCHEMA)
        old = {"guided_json": json.dumps(SCHEMA), "max_tokens": 64, "temperature": 0}
        again = post(server, "/v1/completions", {"model": model, "prompt": prompt, **old}).json()
        assert again["choices"][0]["text"] == text["choices"][0]["text"]


def test_streamed_structured_outputs(served):
    server, *_ = served
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA}}
    for model in ("base", "intent"):
        stream = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": commands(1)[0]}],
            response_format=fmt,
            max_tokens=64,
            temperature=1.0,
            seed=5,
            stream=True,
        )
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
        streamed = c.completions.create(
            model=model, prompt=commands(2)[1], max_tokens=24, stream=True, extra_body={"guided_choice": CHOICES}
        )
        assert "".join(chunk.choices[0].text for chunk in streamed) in CHOICES


def error_of(response, field):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in (error.get("param") or "") + error["message"], error
    return error


def test_bad_grammars_and_conflicts_are_refused(served):
    server, *_ = served
    base = {"model": "base", "prompt": "x", "max_tokens": 4}
    error_of(post(server, "/v1/completions", {**base, "structured_outputs": {"regex": "([a-z"}}), "regex")
    error_of(post(server, "/v1/completions", {**base, "guided_json": "{not json"}), "json")
    error_of(post(server, "/v1/completions", {**base, "structured_outputs": {"grammar": "root ::= "}}), "grammar")
    both = {**base, "structured_outputs": {"regex": "a", "choice": ["b"]}}
    error_of(post(server, "/v1/completions", both), "structured_outputs")
    two = {**base, "guided_regex": "a", "response_format": {"type": "json_object"}}
    error_of(post(server, "/v1/completions", two), "guided_regex")
    error_of(post(server, "/v1/completions", {**base, "structured_outputs": {"whitespace_pattern": " "}}), "whitespace")
    error_of(post(server, "/v1/completions", {**base, "response_format": {"type": "json_schema"}}), "json_schema")
    # The server is fine afterwards.
    assert post(server, "/v1/completions", base).status_code == 200


def test_offline_engine_caches_grammars_and_keeps_them_through_preemption(tmp_path):
    base = small_test_base()
    llm = LLM(base, block_size=4, num_kv_blocks=40, max_model_len=128)
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=64, structured_outputs=spec)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = commands(8)
    # Constrained and unconstrained rows in one batch; few KV blocks, so sequences are preempted and recomputed.
    outs = llm.generate(prompts, [params if i % 2 else plain for i in range(len(prompts))])
    assert llm.engine.scheduler.num_preemptions > 0
    for i, out in enumerate(outs):
        if i % 2:
            assert out.outputs[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
        else:
            assert out.outputs[0].token_ids == llm.generate(prompts[i], plain)[0].outputs[0].token_ids
    assert llm.engine.core.structured.num_compiled == 1  # one schema, compiled once for four requests
    llm.generate(prompts[:2], params)
    assert llm.engine.core.structured.num_compiled == 1

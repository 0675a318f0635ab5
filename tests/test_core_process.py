"""The engine core in its own process: killed while requests stream, the server fails those requests, restarts the
core with the adapters registered at that moment, and answers as before."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from adapter_factory import make_esft, make_peft_lora

from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

PROMPT = "The list type is"


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("core")
    adapters = {"esft": make_esft(base, root / "esft", seed=1)[0]}
    late = make_peft_lora(base, root / "late", seed=2, targets=("q_proj", "o_proj"))[0]
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(max_model_len=128)
    )
    config = ServerConfig(
        served_model_name="base", model_path=str(base), enable_adapter_loading=True, allowed_adapter_dirs=[root]
    )
    app = build_server(engine_config, config, adapters)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as h:
        yield server, app, h, late


def complete(h, model, max_tokens=8):
    r = h.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_core_runs_in_its_own_process(served):
    _, app, *_ = served
    engine = app.state.async_engine
    assert engine.proc.pid != os.getpid() and engine.proc.is_alive()


def test_killed_core_fails_streams_restarts_and_serves_the_same(served):
    server, app, h, late = served
    assert h.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(late)}).status_code == 200
    before = {m: complete(h, m) for m in ("base", "esft", "late")}
    engine = app.state.async_engine
    old_pid = engine.proc.pid

    events: list[str] = []
    started: list[int] = [0, 0]  # chunks each stream has received

    def stream(i: int):
        # max_tokens null: until the context is full
        body = {"model": "esft", "prompt": PROMPT, "max_tokens": None, "ignore_eos": True, "stream": True,
                "temperature": 0}  # fmt: skip
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    started[i] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while min(started) < 2 and time.monotonic() < deadline:  # both streams running in the core
        time.sleep(0.01)
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    errors = [e for e in events if '"error"' in e]
    assert len(errors) == 2 and all("engine core process died" in e for e in errors)
    assert events.count("[DONE]") == 2

    # A request sent while the core restarts waits for it, then succeeds.
    assert complete(h, "esft") == before["esft"]
    deadline = time.monotonic() + 120
    while h.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.get("/health").status_code == 200
    assert engine.proc.pid != old_pid and engine.restarts == 1
    assert {m: complete(h, m) for m in ("base", "esft", "late")} == before  # the loaded adapter came back too


def test_serve_with_a_bad_adapter_fails_at_start_with_a_clear_error(tiny_dir, tmp_path, capsys):
    from moeserve.cli import main

    code = main(["serve", "--model", str(tiny_dir("llama")), "--adapter", f"x={tmp_path / 'missing'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "moeserve serve: error:" in err and "is not an adapter directory" in err


def test_stop_string_found_in_the_front_end_ends_the_core_request(served):
    server, app, h, _ = served
    free = complete(h, "base", max_tokens=12)
    at = next(i for i in range(3, len(free) - 1) if "\ufffd" not in free[i : i + 2])
    stop = free[at : at + 2]  # a string from the middle of the free answer
    r = h.post(
        "/v1/completions",
        json={"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
              "stop": [stop]},  # fmt: skip
    ).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop
    assert r["text"] == free[: free.index(stop)]
    idle = 'vllm:num_requests_running{model_name="base"} 0.0'
    deadline = time.monotonic() + 10  # the core dropped it: nothing left running, no KV blocks held
    while idle not in h.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = h.get("/metrics").text
    assert idle in metrics and 'vllm:kv_cache_usage_perc{model_name="base"} 0.0' in metrics

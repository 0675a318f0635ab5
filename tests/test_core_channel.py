"""The channel between the front end and the engine core process: its framing, the error kinds that cross it, the
lm-eval-style burst that used to wedge both processes, a wedged core detected and restarted, and faults while placing
an adapter answered as the server's errors."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import httpx
import jsonschema
import pytest
import torch
from adapter_factory import make_peft_lora
from core_faults import PLACEMENT_FAULTS, run_core_with_placement_faults

from moeserve.adapters import AdapterError
from moeserve.adapters.manager import UnknownAdapterError
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.engine.core_channel import AddRequest, CallResult, WireError, encode, read_message, recv_message
from moeserve.engine.core_messages import EngineCoreRequest, StepFailedError
from moeserve.engine.sampling_params import SamplingParams
from moeserve.errors import ErrorKind, RequestError, kind_of
from moeserve.server.app import ServerConfig
from moeserve.server.async_engine import EngineDeadError, QueueFullError, error_from_core
from moeserve.server.errors import api_error_of
from moeserve.server.launch import BackgroundServer, build_server

# --- framing and error kinds ---


def test_messages_cross_whole_both_ways_and_large():
    big = AddRequest(EngineCoreRequest("r", list(range(300_000)), SamplingParams(max_tokens=3), "a", 1.5))
    error = CallResult(7, error=WireError(ErrorKind.ADAPTER_NOT_FOUND, "no adapter named 'x'"))
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=lambda: [a.sendall(encode(m)) for m in (big, error)])
        sender.start()
        assert recv_message(b) == big  # 2.4 MB: far past the socket buffer, read whole
        assert recv_message(b) == error
        sender.join()
        a.sendall(encode(error)[:5])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):  # a torn message is the channel closing, never a half message
            recv_message(b)

    async def read_async():
        reader = asyncio.StreamReader()
        reader.feed_data(encode(big) + encode(error))
        reader.feed_eof()
        assert await read_message(reader) == big
        assert await read_message(reader) == error
        with pytest.raises(EOFError):
            await read_message(reader)

    asyncio.run(read_async())


def test_every_error_has_one_kind_and_status():
    assert ErrorKind.parse("no such kind") is ErrorKind.ENGINE  # unknown: the server's fault, never a 400
    assert ErrorKind.parse(None) is ErrorKind.ENGINE
    cases = [
        (AdapterError("corrupt"), ErrorKind.ADAPTER_INVALID, 400),
        (UnknownAdapterError("no adapter named 'x'"), ErrorKind.ADAPTER_NOT_FOUND, 404),
        (StepFailedError("the step failed"), ErrorKind.ENGINE, 500),
        (QueueFullError("full"), ErrorKind.QUEUE_FULL, 429),
        (EngineDeadError("restarting"), ErrorKind.UNAVAILABLE, 503),
        (ValueError("invalid json_schema"), ErrorKind.BAD_REQUEST, 400),
        (RuntimeError("tables"), ErrorKind.ENGINE, 500),
        (torch.OutOfMemoryError("CUDA out of memory"), ErrorKind.ENGINE, 500),
        (MemoryError(), ErrorKind.ENGINE, 500),
    ]
    for exc, kind, status in cases:
        assert kind_of(exc) is kind and kind.status == status, exc
        # across the channel: kind and message, and the front end's exception answers with the same status
        back = error_from_core(kind_of(exc), str(exc))
        assert kind_of(back) is kind
        assert api_error_of(back).status == status
    assert api_error_of(error_from_core(None, "?")).status == 500
    assert api_error_of(KeyError("a bug")) is None  # no kind: the 500 handler logs the traceback
    assert isinstance(error_from_core(ErrorKind.BAD_REQUEST, "x"), RequestError)


# --- the burst that wedged the server: echo + prompt logprobs, streams and fresh schemas at once ---

PROMPT_TOKENS = 410


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def builtin_server():
    """`moeserve serve` on the built-in base, as a user starts it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moeserve.cli import main; raise SystemExit(main())", "--log-level", "WARNING",
         "serve", "--port", str(port), "--served-model-name", "base"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(16, 2000) for _ in range(PROMPT_TOKENS)]


def _schema(i: int) -> dict:
    return {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string", "maxLength": 8}, f"count_{i}": {"type": "integer"}},
        "required": [f"field_{i}", f"count_{i}"],
        "additionalProperties": False,
    }


async def _burst(url: str, echo: int, streams: int, schemas: int, seed: int) -> dict:
    """Sends it all at once with /health polled every 100 ms; returns each part's answers and the polls' latencies."""
    rng = random.Random(seed)
    results: dict = {"echo": [], "stream": [], "schema": [], "health": []}
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:

        async def poll_health():
            # a connection per poll, as a load balancer's probe: a kept-alive one the server closed while the
            # burst's answers were read would count as a failed poll
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as probe:
                while not done.is_set():
                    t0 = time.monotonic()
                    async with probe.get(f"{url}/health") as r:
                        await r.read()
                        results["health"].append((time.monotonic() - t0, r.status))
                    await asyncio.sleep(0.1)

        async def echo_one(ids):
            body = {"model": "base", "prompt": ids, "echo": True, "logprobs": 20, "max_tokens": 1}
            async with http.post(f"{url}/v1/completions", json=body) as r:
                results["echo"].append((ids, r.status, await r.json()))

        async def stream_one():
            body = {"model": "base", "prompt": "The list type is", "max_tokens": 64, "ignore_eos": True}
            events = []
            async with http.post(f"{url}/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        events.append(line[5:].strip().decode())
                results["stream"].append((r.status, events))

        async def schema_one(i):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": _schema(i)}}
            body = {"model": "base", "prompt": f"Record {i} as JSON:", "max_tokens": 48, "response_format": fmt}
            async with http.post(f"{url}/v1/completions", json=body) as r:
                results["schema"].append((i, r.status, await r.json()))

        poller = asyncio.create_task(poll_health())
        work = [echo_one(_prompt(rng)) for _ in range(echo)]
        work += [stream_one() for _ in range(streams)] + [schema_one(seed * 1000 + i) for i in range(schemas)]
        rng.shuffle(work)
        try:
            await asyncio.wait_for(asyncio.gather(*work), timeout=400)
        finally:
            done.set()
            await poller
    return results


def _check_burst(results: dict, echo: int, streams: int, schemas: int) -> None:
    assert len(results["echo"]) == echo
    for ids, status, body in results["echo"]:
        assert status == 200, body
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == PROMPT_TOKENS + 1 and len(lp["token_logprobs"]) == PROMPT_TOKENS + 1
        assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
        assert all(1 <= len(top) <= 21 for top in lp["top_logprobs"][1:])  # 20, and the sampled/echoed token
        assert body["usage"]["prompt_tokens"] == PROMPT_TOKENS and body["usage"]["completion_tokens"] == 1
    assert len(results["stream"]) == streams
    for status, events in results["stream"]:
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(results["schema"]) == schemas
    for i, status, body in results["schema"]:
        assert status == 200, body
        choice = body["choices"][0]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["text"]), _schema(i))
    slowest = max(latency for latency, _ in results["health"])
    assert all(status == 200 for _, status in results["health"])
    assert slowest < 1.0, f"a /health poll waited {slowest:.2f} s"


def test_prompt_logprob_burst_with_streams_and_fresh_schemas_is_served(builtin_server):
    """192 echo + logprobs 20 + max_tokens 1 requests on 410-token prompts, 8 streams of 64 tokens and 16 fresh JSON
    schemas at once: the burst that left both processes blocked in send() for good."""
    results = asyncio.run(_burst(builtin_server, echo=192, streams=8, schemas=16, seed=1))
    _check_burst(results, echo=192, streams=8, schemas=16)
    # one of them again, alone: the same logprobs as in the burst
    ids, _, body = results["echo"][0]
    alone = httpx.post(
        f"{builtin_server}/v1/completions",
        json={"model": "base", "prompt": ids, "echo": True, "logprobs": 20, "max_tokens": 1},
        timeout=60,
    ).json()
    got, want = alone["choices"][0]["logprobs"]["token_logprobs"], body["choices"][0]["logprobs"]["token_logprobs"]
    # the prompt's tokens (the last entry is the sampled token's)
    assert max(abs(a - b) for a, b in zip(got[1:PROMPT_TOKENS], want[1:PROMPT_TOKENS])) < 1e-3


def test_a_thousand_echo_requests_at_once_are_served(builtin_server):
    results = asyncio.run(_burst(builtin_server, echo=1000, streams=0, schemas=0, seed=2))
    _check_burst(results, echo=1000, streams=0, schemas=0)


# --- a wedged core, and faults while placing an adapter ---


@pytest.fixture(scope="module")
def fault_server(tiny_dir, tmp_path_factory):
    """A server on a tiny model whose core fails to place the adapters of PLACEMENT_FAULTS, with a short stall
    timeout."""
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("faults")
    lora = make_peft_lora(base, root / "lora", seed=2, targets=("q_proj", "o_proj"))[0]
    adapters = {"lora": lora}
    for name in PLACEMENT_FAULTS:
        adapters[name] = shutil.copytree(lora, root / name)
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=256), scheduler=SchedulerConfig(max_model_len=128)
    )
    config = ServerConfig(served_model_name="base", model_path=str(base), engine_stall_timeout=3.0)
    app = build_server(engine_config, config, adapters, core_target=run_core_with_placement_faults)
    with BackgroundServer(app) as server:
        yield server, app


def _complete(url: str, model: str, **kw) -> httpx.Response:
    body = {"model": model, "prompt": "The list type is", "max_tokens": 4, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("name", sorted(PLACEMENT_FAULTS))
def test_a_fault_placing_an_adapter_is_that_requests_500(fault_server, name):
    server, _ = fault_server
    r = _complete(server.url, name)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "InternalServerError" and error["code"] == 500 and "injected" in error["message"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": name, "prompt": "x", "stream": True}) as s:
        assert s.status_code == 500
    for model in ("base", "lora"):  # the others are served as before
        assert _complete(server.url, model).status_code == 200


def test_a_wedged_core_is_killed_its_requests_fail_and_a_new_one_serves(fault_server):
    server, app = fault_server
    engine = app.state.async_engine
    before, pid = engine.restarts, engine.proc.pid
    os.kill(pid, signal.SIGSTOP)  # frozen: alive, silent, never reading or stepping
    try:
        t0 = time.monotonic()
        r = _complete(server.url, "base", max_tokens=8)
        assert r.status_code == 503, r.text
        assert "no progress" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 30
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 120
    while engine.restarts == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.restarts == before + 1
    assert _complete(server.url, "base").status_code == 200
    assert _complete(server.url, "lora").status_code == 200

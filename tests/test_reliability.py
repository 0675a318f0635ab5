"""No request, adapter file or client takes the server down or changes another request's answer (real HTTP on
loopback): the bad-input catalogue, the requests that used to kill the engine, adapter files changed under a
running server, client disconnects, failures inside the engine core, and schemathesis against /openapi.json."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from adapter_factory import make_esft, make_peft_lora
from bad_inputs import CONTEXT, VOCAB, catalogue, hostile_adapters
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from test_adapter_methods_serving import make_adapter

from moeserve import LLM, SamplingParams
from moeserve.adapters.manager import AdapterLimits
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

PROMPT = "The list type is"
NORMAL = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("adapters")
    outside = tmp_path_factory.mktemp("outside")
    token_ids = [[1, 2, 3, 4, 5, 6]]
    adapters = {
        "esft": make_esft(base, root / "esft", seed=1)[0],
        "lora": make_peft_lora(base, root / "lora", seed=2, targets=("q_proj", "o_proj"))[0],
        "molora": make_adapter(base, root / "molora", "molora", "olmoe", token_ids),
    }
    hostile_adapters(root, outside)
    engine_config = EngineConfig(
        model=str(base),
        cache=CacheConfig(block_size=4, num_blocks=256),
        scheduler=SchedulerConfig(max_model_len=CONTEXT),
        adapters=AdapterLimits(max_slots=1, max_cpu_adapters=1),  # every switch evicts, and re-reads from disk
    )
    config = ServerConfig(
        served_model_name="base", model_path=str(base), enable_adapter_loading=True, allowed_adapter_dirs=[root]
    )
    app = build_server(engine_config, config, adapters)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as h:
        yield server, app, h, root, base


def complete(h: httpx.Client, model: str, **fields) -> str:
    r = h.post("/v1/completions", json={"model": model, **NORMAL, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"] and body["error"]["type"]
    return body["error"]


def scrape(server) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()) if k == "finished_reason")
            values[key] = values.get(key, 0.0) + s.value
    return values


def test_bad_input_catalogue(served):
    server, app, h, root, _ = served
    before = {m: complete(h, m) for m in ("base", "esft")}
    cases = catalogue()
    assert len(cases) >= 80
    for name, method, path, body, status in cases:
        if callable(body):
            body = body(root)
        started = time.monotonic()
        if isinstance(body, bytes):
            r = h.request(method, path, content=body, headers={"content-type": "application/json"})
        else:
            r = h.request(method, path, json=body) if body is not None else h.request(method, path)
        try:
            openai_error(r, status)
        except AssertionError as exc:
            raise AssertionError(f"catalogue case {name!r}: {exc}") from None
        assert time.monotonic() - started < 10, f"{name!r} took {time.monotonic() - started:.1f} s"
    assert h.get("/health").status_code == 200
    assert {m: complete(h, m) for m in ("base", "esft")} == before  # same answers after it
    assert {c.id for c in _models(h)} == {"base", "esft", "lora", "molora"}  # no hostile load registered


def _models(h):
    class Card:
        def __init__(self, d):
            self.id = d["id"]

    return [Card(d) for d in h.get("/v1/models").json()["data"]]


def test_errors_name_the_field(served):
    _, _, h, root, _ = served
    assert (
        openai_error(h.post("/v1/completions", json={"model": "base", "prompt": "x", "top_k": 10**6}), 400)["param"]
        == "top_k"
    )
    assert (
        openai_error(h.post("/v1/completions", json={"model": "base", "prompt": "x", "seed": 2**64}), 400)["param"]
        == "seed"
    )
    e = openai_error(h.post("/v1/completions", json={"model": "base", "prompt": [1] * 100, "max_tokens": 40}), 400)
    assert e["param"] == "max_tokens" and "maximum context length is 128" in e["message"]
    e = openai_error(h.post("/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": str(root / "hostile" /
        "rank--eight-")}), 400)  # fmt: skip
    assert "'rank'" in e["message"]
    e = openai_error(h.post("/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": str(root / "hostile" /
        "top-k-1000000")}), 400)  # fmt: skip
    assert "top_k" in e["message"]
    e = openai_error(h.post("/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": str(root / "hostile" /
        "weights-symlinked-outside")}), 400)  # fmt: skip
    assert "outside the allowed" in e["message"]
    e = openai_error(h.post("/v1/completions", content=b"[" * 100_000, headers={"content-type": "application/json"}),
                     400)  # fmt: skip
    assert "JSON" in e["message"]


def test_stream_errors_are_openai_shaped(served):
    server, _, h, _, _ = served
    # An error before the first chunk is an HTTP error; the engine's per-request errors mid-stream are events.
    openai_error(h.post("/v1/completions", json={"model": "nope", "prompt": "x", "stream": True}), 404)
    with h.stream("POST", "/v1/completions", json={"model": "base", **NORMAL, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-40},
        {"temperature": 1e-6, "top_k": 1},
        {"repetition_penalty": 1e-40},
        {"repetition_penalty": 1e-40, "temperature": 1e-5},
        {"repetition_penalty": 100, "temperature": 100},
        {"top_k": VOCAB, "top_p": 1e-30, "min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2, "temperature": 2},
        {"seed": 2**63 - 1, "n": 3, "temperature": 1},
        {"seed": -(2**63), "n": 2, "temperature": 1},
        {"logprobs": 20, "n": 4, "temperature": 1, "repetition_penalty": 1e-40},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_former_engine_killers_are_served_and_the_next_request_succeeds(served, fields):
    _, _, h, _, _ = served
    r = h.post("/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 6, **fields})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
    assert h.get("/health").status_code == 200
    complete(h, "esft")


def test_adapter_files_overwritten_or_deleted_are_never_served(served, tmp_path):
    """One slot and one host copy: every switch evicts and re-reads from disk. A changed file is refused (that
    adapter's requests get a 400 saying so), a deleted one too, and nothing else is touched."""
    server, app, h, root, _ = served
    a = shutil.copytree(root / "molora", root / "victim-a")
    b = shutil.copytree(root / "molora", root / "victim-b")
    for name, d in (("victim-a", a), ("victim-b", b)):
        assert h.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(d)}).status_code == 200
    before = {m: complete(h, m) for m in ("base", "esft", "lora", "victim-a", "victim-b")}
    # Overwrite a's weights with different (valid) ones, delete b's directory.
    tensors = load_file(a / "adapter_model.safetensors")
    save_file({k: v * 3 for k, v in tensors.items()}, str(a / "adapter_model.safetensors"))
    shutil.rmtree(b)
    complete(h, "esft")  # evicts whatever was resident, and drops the host copies
    for name in ("victim-a", "victim-b"):
        e = openai_error(h.post("/v1/completions", json={"model": name, **NORMAL}), 400)
        assert "changed" in e["message"] and e["param"] == "model", e
        with h.stream("POST", "/v1/completions", json={"model": name, **NORMAL, "stream": True}) as r:
            assert r.status_code == 400
    assert {m: complete(h, m) for m in ("base", "esft", "lora")} == {m: before[m] for m in ("base", "esft", "lora")}
    assert h.get("/health").status_code == 200
    # Loading the new files (unload, load again) serves them: what a name serves changes only by a load.
    assert h.post("/v1/unload_lora_adapter", json={"lora_name": "victim-a"}).status_code == 200
    assert h.post("/v1/load_lora_adapter", json={"lora_name": "victim-a", "lora_path": str(a)}).status_code == 200
    assert complete(h, "victim-a") != before["victim-a"]
    for name in ("victim-a", "victim-b"):
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_non_streaming_disconnect_aborts_and_counts(served):
    """A non-streaming client that hangs up while its choices run: the rest are aborted in the core, counted under
    finished_reason="abort", and every block is freed."""
    import socket

    server, app, h, _, _ = served
    before = scrape(server)
    n = 128  # two rounds of max_num_seqs (64): the second cannot finish before the hang-up
    body = json.dumps({"model": "base", "prompt": PROMPT, "max_tokens": CONTEXT - 10, "ignore_eos": True, "n": n})
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}".encode()
    )
    deadline = time.monotonic() + 20
    while scrape(server)["vllm:num_requests_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    sock.close()  # hang up while its choices run
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = scrape(server)
        if now["vllm:num_requests_running"] == now["vllm:num_requests_waiting"] == now["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    keys = {r: f"vllm:request_success_total{{finished_reason={r}}}" for r in ("abort", "length")}
    moved = {r: now.get(k, 0) - before.get(k, 0) for r, k in keys.items()}
    assert moved["abort"] >= 1 and moved["abort"] + moved["length"] == n, moved
    assert now["vllm:num_requests_running"] == now["vllm:num_requests_waiting"] == 0
    assert now["vllm:kv_cache_usage_perc"] == 0.0


def test_failures_inside_the_core_stay_with_their_requests(tiny_dir, tmp_path):
    """In-process core: a step that raises fails the requests it ran and only those; the next steps serve."""
    base = tiny_dir("llama")
    llm = LLM(base, num_kv_blocks=64, max_model_len=64)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = llm.generate(PROMPT, params)[0].outputs[0].text
    runner, calls = engine.core.runner, {"n": 0}
    real = runner.execute

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(batch)

    runner.execute = flaky
    engine.add_request("first", PROMPT, params)
    engine.step()  # the first request's prefill
    results = {out.request_id: out for out in engine.step()}  # the failing step
    assert results["first"].error is not None and "boom" in results["first"].error
    assert not engine.has_unfinished_requests() and engine.kv.pool.usage == 0.0
    engine.add_request("second", PROMPT, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.outputs[0].text for o in outs if o.finished and o.request_id == "second"] == [expected]
    assert engine.kv.pool.usage == 0.0


def test_schemathesis_against_openapi(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server, _, h, _, _ = served
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    models = st.sampled_from(["base", "esft", "lora", "nope"])
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            continue  # the hostile-load catalogue covers them; random names would unload the fixtures' adapters

        @given(case=operation.as_strategy(), model=models)
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case, model):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
                for key in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(key), int):
                        case.body[key] = min(case.body[key], 8)  # bounded work per example
                if isinstance(case.body.get("n"), int):
                    case.body["n"] = min(case.body["n"], 2)
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code < 500, (operation.path, case.body, response.text[:300])
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and body["error"]["code"] == response.status_code, body

        check()
        checked += 1
    assert checked >= 5
    assert h.get("/health").status_code == 200


def test_sigterm_ends_every_stream_and_exits_in_time(tiny_dir, tmp_path):
    """`moeserve serve --shutdown-timeout 1`, SIGTERM while long streams run: each stream ends with an error event
    and [DONE] (or finishes), a waiting non-streaming client gets a 503 in OpenAI's shape, the process exits."""
    import signal
    import socket
    import subprocess
    import sys

    base = tiny_dir("llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moeserve.cli import main; raise SystemExit(main())", "--log-level", "WARNING",
         "serve", "--model", str(base), "--port", str(port), "--shutdown-timeout", "1",
         "--max-model-len", "512", "--num-kv-blocks", "512", "--max-num-seqs", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        long = {"model": base.name, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}
        streams: list[list[str]] = [[] for _ in range(4)]
        answers: list[httpx.Response] = []

        def stream(events):
            with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                if r.status_code != 200:  # still waiting for its first token at shutdown: a plain 503
                    r.read()
                    events.append(r)
                    return
                events.extend(line[5:].strip() for line in r.iter_lines() if line.startswith("data:"))

        def wait():
            answers.append(httpx.post(f"{url}/v1/completions", json={**long, "n": 4}, timeout=60))

        threads = [threading.Thread(target=stream, args=(e,)) for e in streams] + [threading.Thread(target=wait)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(map(len, streams)) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        exited = time.monotonic() - sent
        for t in threads:
            t.join(timeout=30)
    finally:
        proc.kill()
    assert exited < 1 + 10, exited  # the shutdown timeout, plus the engine core's exit
    for events in streams:
        if len(events) == 1 and isinstance(events[0], httpx.Response):
            openai_error(events[0], 503)
            continue
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == 503 and set(last["error"]) == {"message", "type", "param", "code"}
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert any(isinstance(e[-1], httpx.Response) or "error" in json.loads(e[-2]) for e in streams)
    (answer,) = answers
    if answer.status_code != 200:
        openai_error(answer, 503)


def test_adapter_rereads_run_off_the_step(tiny_dir, tmp_path):
    """An adapter dropped from host memory is read again in the reader thread: the step that needs it runs without
    its request (the base request goes on), and the request is served the same answer once the files are in."""
    base = tiny_dir("olmoe")
    a, b = make_esft(base, tmp_path / "a", seed=1)[0], make_esft(base, tmp_path / "b", seed=2)[0]
    llm = LLM(base, num_kv_blocks=64, max_model_len=64, max_adapters=1, max_cpu_adapters=1,
              adapters={"a": str(a), "b": str(b)})  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = llm.generate(PROMPT, params, adapter="a")[0].outputs[0].text
    llm.generate(PROMPT, params, adapter="b")  # takes the slot and the one host copy from "a"
    engine = llm.engine
    reads = engine.adapters.stats.host_loads
    engine.add_request("base", PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.add_request("a", PROMPT, params, adapter="a")
    outs = engine.step()
    assert engine.adapters.reading and [o.request_id for o in outs] == ["base"]
    assert engine.adapters.stats.host_loads == reads  # nothing was read on the step's thread
    texts = {}
    while engine.has_unfinished_requests():
        texts |= {o.request_id: o.outputs[0].text for o in engine.step() if o.finished}
    assert texts["a"] == expected and engine.adapters.stats.host_loads == reads + 1

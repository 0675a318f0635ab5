"""A bounded soak over loopback HTTP: 16 clients for about a minute against the base and one adapter of every
method, streaming and not, some hanging up mid-answer, while another client unloads an adapter and loads it again
from a fresh directory, on a KV cache small enough that sequences get preempted and adapter slots few enough that
adapters get evicted. Nothing may be lost, every greedy answer must equal the same request run alone, and the server
must be idle and empty afterwards (docs/reliability.md has the figures)."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time

import httpx
import pytest
from adapter_factory import make_esft
from prometheus_client.parser import text_string_to_metric_families
from test_adapter_methods_serving import make_adapter

from moeserve.adapters.manager import AdapterLimits
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server

SOAK_SECONDS = 60
CLIENTS = 16
METHODS = ["esft-gate", "esft-token", "lora", "molora", "mov", "loramoe", "mola"]
PROMPTS = ["The list type is", "A dictionary maps keys to", "def parse(text):"]
RELOADED = "reloaded"  # the adapter that is unloaded and loaded again in a loop


def metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


@pytest.fixture(scope="module")
def soak_server(tiny_dir, tmp_path_factory):
    base = tiny_dir("qwen2_moe")
    root = tmp_path_factory.mktemp("soak")
    token_ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    adapters = {m: make_adapter(base, root / m, m, "qwen2_moe", token_ids) for m in METHODS}
    adapters[RELOADED] = make_esft(base, root / RELOADED, seed=5)[0]
    engine_config = EngineConfig(
        model=str(base),
        cache=CacheConfig(block_size=4, num_blocks=40),  # 160 tokens for 16 clients: preemption is routine
        scheduler=SchedulerConfig(max_model_len=64, max_num_seqs=16),
        adapters=AdapterLimits(max_slots=3, max_cpu_adapters=16),  # 8 adapters, 3 slots: evictions are routine
    )
    config = ServerConfig(
        served_model_name="base", model_path=str(base), enable_adapter_loading=True, allowed_adapter_dirs=[root]
    )
    with BackgroundServer(build_server(engine_config, config, adapters)) as server:
        yield server, root


def request_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def run(client: httpx.Client, body: dict, hang_up_after: int | None = None) -> tuple[int, str | None]:
    """(status, text); text None for a client that hung up on purpose."""
    if not body["stream"]:
        r = client.post("/v1/completions", json=body)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    text, events = "", 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return 200, text
            chunk = json.loads(data)
            if "error" in chunk:
                return chunk["error"]["code"], chunk["error"]["message"]
            text += chunk["choices"][0]["text"]
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                return 200, None
    return 599, "stream ended without [DONE]"


def test_soak(soak_server):
    server, root = soak_server
    models = ["base", *METHODS, RELOADED]
    cases = [(m, p, n) for m in models for p in PROMPTS for n in (6, 14)]
    with httpx.Client(base_url=server.url, timeout=120) as h:
        solo = {case: run(h, request_body(*case, stream=False))[1] for case in cases}  # one at a time
    before = metrics(server.url)

    stop_at = time.monotonic() + SOAK_SECONDS
    tally = {"ok": 0, "streamed": 0, "hung_up": 0, "reload_404": 0, "reloads": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while time.monotonic() < stop_at:
                case = rng.choice(cases)
                stream = rng.random() < 0.5
                hang_up = rng.choice([1, 2, 3]) if stream and rng.random() < 0.2 else None
                status, text = run(c, request_body(*case, stream=stream), hang_up)
                with lock:
                    if status == 404 and case[0] == RELOADED:
                        tally["reload_404"] += 1  # asked while it was unloaded: refused, not lost
                    elif status != 200:
                        failures.append(f"{case} stream={stream}: {status} {text}")
                    elif text is None:
                        tally["hung_up"] += 1
                    elif text != solo[case]:
                        failures.append(f"{case} stream={stream}: {text!r} != solo {solo[case]!r}")
                    else:
                        tally["ok"] += 1
                        tally["streamed"] += stream

    def reloader() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            n = 0
            while time.monotonic() < stop_at - 2:
                time.sleep(1.0)
                n += 1
                fresh = shutil.copytree(root / RELOADED, root / f"{RELOADED}-{n}")  # same files, a new directory
                r1 = c.post("/v1/unload_lora_adapter", json={"lora_name": RELOADED})
                r2 = c.post("/v1/load_lora_adapter", json={"lora_name": RELOADED, "lora_path": str(fresh)})
                with lock:
                    if r1.status_code != 200 or r2.status_code != 200:
                        failures.append(f"reload {n}: {r1.status_code} {r1.text} / {r2.status_code} {r2.text}")
                    tally["reloads"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)] + [threading.Thread(target=reloader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SOAK_SECONDS + 120)
    assert not any(t.is_alive() for t in threads)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = metrics(server.url)
        if after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    moved = {k: after[k] - before[k] for k in ("vllm:num_preemptions_total", "moeserve:adapter_evictions_total")}
    print(f"soak: {tally}, {moved}")
    assert not failures, failures[:10]
    assert tally["ok"] >= 100 and tally["streamed"] > 0 and tally["hung_up"] > 0 and tally["reloads"] >= 10
    assert all(v > 0 for v in moved.values()), moved  # preemption and eviction both happened
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    with httpx.Client(base_url=server.url, timeout=120) as h:  # and it still answers as it did
        assert {case: run(h, request_body(*case, stream=False))[1] for case in cases[:10]} == {
            case: solo[case] for case in cases[:10]
        }

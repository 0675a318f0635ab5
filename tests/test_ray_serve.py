"""Two engine replicas behind Ray Serve on loopback, six adapters of mixed methods, room for two per replica.

Every answer equals the one-process engine's; after warm-up, requests land on a replica that already holds their
adapter (read from the replicas' own metrics); a replica killed mid-load loses no request that had not started
streaming. One Ray cluster for the module, two CPUs.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
import pytest
import ray
from adapter_factory import make_esft, make_peft_lora
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from test_adapter_methods_serving import make_adapter

from moeserve import LLM, SamplingParams
from moeserve.deploy.ray_config import RayServeConfig
from moeserve.deploy.ray_serve import build_ray_app, run_ray_app
from moeserve.engine.config import AdapterLimits, CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig

PROMPTS = ["The list type is", "A dictionary maps keys", "Return the sum of the items", "Strings are"]
MAX_TOKENS = 8
PHASES = [["esft", "lora", "molora", "mov"], ["molora", "mov", "mola", "esft-token"]]  # 4 = 2 replicas x 2 slots
TIMINGS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tiny_dir, tmp_path_factory):
    started = time.monotonic()
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("ray-adapters")
    offline = LLM(base, block_size=4, num_kv_blocks=256, max_model_len=96, max_adapters=2)
    token_ids = [offline.tokenizer.encode(p) for p in PROMPTS]
    adapters = {
        "esft": make_esft(base, root / "esft", seed=1)[0],
        "lora": make_peft_lora(base, root / "lora", seed=2, targets=("q_proj", "o_proj"))[0],
        **{m: make_adapter(base, root / m, m, "olmoe", token_ids) for m in ("molora", "mov", "mola", "esft-token")},
    }
    spare = make_esft(base, root / "spare", seed=3)[0]  # registered at run time, through the ingress
    for name, path in {**adapters, "spare": spare}.items():
        offline.engine.adapters.register(name, path)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=3 * MAX_TOKENS, ignore_eos=True)
    expected = {}
    for model in ["base", *adapters, "spare"]:
        adapter = None if model == "base" else model
        for params in (greedy, long):
            for prompt, out in zip(PROMPTS, offline.generate(PROMPTS, params, adapter=adapter)):
                expected[(model, prompt, params.max_tokens)] = out.outputs[0].text
    del offline
    TIMINGS["adapters and reference outputs"] = time.monotonic() - started

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    engine_config = EngineConfig(
        model=str(base),
        num_threads=1,
        cache=CacheConfig(block_size=4, num_blocks=256),
        scheduler=SchedulerConfig(max_model_len=96),
        adapters=AdapterLimits(max_slots=2),
    )
    server_config = ServerConfig(
        served_model_name="base", model_path=str(base), enable_adapter_loading=True, allowed_adapter_dirs=[root]
    )
    config = RayServeConfig(num_replicas=2, replica_cpus=0.5)
    app = build_ray_app(engine_config, server_config, adapters, config)
    url = run_ray_app(app, config, "127.0.0.1", _free_port())
    TIMINGS["ray and two replicas up"] = time.monotonic() - started
    try:
        yield url, expected, spare
    finally:
        serve.shutdown()
        ray.shutdown()


async def _complete(client, url, model, prompt, max_tokens=MAX_TOKENS):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = await client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers["x-moeserve-replica"]


def _replica_metrics(url) -> dict[str, dict[str, float]]:
    """Per replica: adapter requests finished and adapter slot loads, from the replicas' own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            replica = s.labels.get("replica")
            if s.name == "moeserve:adapter_requests_total" and s.labels["adapter"] != "base":
                out.setdefault(replica, {"requests": 0.0, "loads": 0.0})["requests"] += s.value
            elif s.name == "moeserve:adapter_loads_total":
                out.setdefault(replica, {"requests": 0.0, "loads": 0.0})["loads"] += s.value
            elif s.name == "moeserve:request_retries_total":
                out.setdefault("ingress", {})["retries"] = s.value
            elif s.name == "moeserve:broken_streams_total":
                out.setdefault("ingress", {})["broken_streams"] = s.value
    return out


def _totals(url, adapter_requests: int) -> tuple[float, float]:
    """(adapter requests, adapter loads) summed over replicas, once the replicas have reported `adapter_requests`."""
    deadline = time.monotonic() + 30
    while True:
        per = [m for r, m in _replica_metrics(url).items() if r != "ingress"]
        requests, loads = sum(m["requests"] for m in per), sum(m["loads"] for m in per)
        if requests >= adapter_requests or time.monotonic() > deadline:
            assert requests == adapter_requests, f"replicas report {requests} adapter requests, {adapter_requests} sent"
            return requests, loads
        time.sleep(0.25)


def test_outputs_match_one_engine_and_requests_find_their_adapter_resident(deployment):
    url, expected, _ = deployment
    rng = random.Random(0)
    sent, window_requests, window_loads, warmup_rounds = 0, 0.0, 0.0, []

    async def run():
        nonlocal sent, window_requests, window_loads
        async with httpx.AsyncClient(timeout=120) as client:
            text, _ = await _complete(client, url, "base", PROMPTS[0])
            assert text == expected[("base", PROMPTS[0], MAX_TOKENS)]
            for phase in PHASES:
                # Warm-up: rounds over the phase's adapters, one request at a time, until a round loads nothing.
                loads_before = _totals(url, sent)[1]
                for rounds in range(1, 11):
                    for i, model in enumerate(phase):
                        text, _ = await _complete(client, url, model, PROMPTS[i % len(PROMPTS)])
                        assert text == expected[(model, PROMPTS[i % len(PROMPTS)], MAX_TOKENS)], model
                        sent += 1
                    await asyncio.sleep(0.3)  # routing info (which replica holds what) reaches the router
                    requests, loads = _totals(url, sent)
                    if loads == loads_before:
                        break
                    loads_before = loads
                warmup_rounds.append(rounds)
                # Load: 40 concurrent requests over the phase's adapters.
                jobs = [(rng.choice(phase), rng.choice(PROMPTS)) for _ in range(40)]
                results = await asyncio.gather(*(_complete(client, url, m, p) for m, p in jobs))
                for (model, prompt), (text, _) in zip(jobs, results):
                    assert text == expected[(model, prompt, MAX_TOKENS)], (model, prompt)
                sent += len(jobs)
                after_requests, after_loads = _totals(url, sent)
                window_requests += after_requests - requests
                window_loads += after_loads - loads

    started = time.monotonic()
    asyncio.run(run())
    TIMINGS["phases (warm-up + 2 x 40 requests)"] = time.monotonic() - started
    hit_rate = 1 - window_loads / window_requests
    TIMINGS["hit rate after warm-up"] = hit_rate
    TIMINGS["warm-up rounds per phase"] = float(sum(warmup_rounds)) / len(warmup_rounds)
    print(f"\nray serve: hit rate {hit_rate:.3f} over {window_requests:.0f} requests; warm-up rounds {warmup_rounds}")
    assert hit_rate >= 0.9, f"only {hit_rate:.1%} of requests found their adapter resident"


def test_adapters_registered_through_the_ingress_are_served_and_unloaded(deployment):
    url, expected, spare = deployment

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            load = {"lora_name": "spare", "lora_path": str(spare)}
            r = await client.post(f"{url}/v1/load_lora_adapter", json=load)
            assert r.status_code == 200, r.text
            again = await client.post(f"{url}/v1/load_lora_adapter", json=load)
            assert again.status_code == 400 and "already" in again.json()["error"]["message"]
            outside = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
            assert outside.status_code == 400 and outside.json()["error"]["param"] == "lora_path"
            models = {m["id"] for m in (await client.get(f"{url}/v1/models")).json()["data"]}
            assert models == {"base", "esft", "lora", "molora", "mov", "mola", "esft-token", "spare"}
            results = await asyncio.gather(*(_complete(client, url, "spare", p) for p in PROMPTS))
            assert [text for text, _ in results] == [expected[("spare", p, MAX_TOKENS)] for p in PROMPTS]
            r = await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "spare"})
            assert r.status_code == 200, r.text
            gone = await client.post(f"{url}/v1/completions", json={"model": "spare", "prompt": "x", "max_tokens": 2})
            assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"

    asyncio.run(run())


def test_the_deployment_metrics_cover_every_replica_and_what_the_dashboard_reads(deployment):
    url, *_ = deployment
    from test_deploy import _referenced_metrics

    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    running = {s.labels["replica"] for s in samples if s.name == "vllm:num_requests_running"}
    assert len(running) == 2 and all(r.startswith("SERVE_REPLICA::") for r in running)
    missing = _referenced_metrics()["grafana dashboard"] - {s.name for s in samples}
    assert not missing, f"the dashboard reads metrics the Ray deployment does not export: {sorted(missing)}"


def test_killing_a_replica_mid_load_loses_no_request_that_had_not_started_streaming(deployment):
    url, expected, _ = deployment
    long = 3 * MAX_TOKENS
    rng = random.Random(1)
    models = ["base", *PHASES[-1]]
    victim: list[str] = []

    def kill(replica: str) -> None:
        if not victim:
            victim.append(replica)
            ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)

    async def stream(client, model, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": long, "temperature": 0, "ignore_eos": True}
        text, error = "", None
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            replica = r.headers["x-moeserve-replica"]
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                text += event["choices"][0]["text"]
                kill(replica)  # the first chunk anywhere: kill the replica that sent it
        return text, error, replica

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            jobs = [(rng.choice(models), rng.choice(PROMPTS), i % 2 == 0) for i in range(24)]
            results = await asyncio.gather(
                *(stream(client, m, p) if s else _complete(client, url, m, p, long) for m, p, s in jobs)
            )
            # Afterwards every adapter is still served (by the survivor, or by the replacement replica).
            after = await asyncio.gather(*(_complete(client, url, m, PROMPTS[0]) for m in models))
            return jobs, results, after

    started = time.monotonic()
    jobs, results, after = asyncio.run(run())
    TIMINGS["kill test"] = time.monotonic() - started
    assert victim, "no stream ever started"
    broken = 0
    for (model, prompt, streamed), result in zip(jobs, results):
        want = expected[(model, prompt, long)]
        if not streamed:
            assert result[0] == want, (model, prompt)  # retried if it was on the killed replica
            continue
        text, error, replica = result
        if error is None:
            assert text == want, (model, prompt)
        else:  # it had started streaming on the killed replica: it ends with a clear error
            broken += 1
            assert replica == victim[0] and error["code"] == 503 and "died" in error["message"], error
            assert want.startswith(text) and text, (text, want)
    for model, (text, replica) in zip(models, after):
        assert text == expected[(model, PROMPTS[0], MAX_TOKENS)] and replica != victim[0]
    ingress = _replica_metrics(url)["ingress"]
    TIMINGS["retried requests"], TIMINGS["broken streams"] = ingress["retries"], float(broken)
    assert ingress["broken_streams"] == broken
    assert ingress["retries"] + broken >= 1, "the killed replica had no request in flight: the test proved nothing"
    print(
        f"\nray serve kill: {ingress['retries']:.0f} retried, {broken} streams ended with an error; timings {TIMINGS}"
    )

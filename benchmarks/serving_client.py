"""Drives moeserve: a server over HTTP (started on loopback; a run's requests sent as concurrent streams), and the
same engine in this process without HTTP (`OfflineEngine`, to tell the engine's time from the server's).

Timing is on the client, as a user sees it: TTFT = first streamed token chunk - the moment the run started (all N
requests are sent at once), inter-token latency = gaps between a request's consecutive chunks. The server sends a
chunk for each engine step that produced text for the request; a token whose text is held back (part of a multi-byte
character) rides in the next chunk, so `chunks` may be below the token count (reported, never hidden).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import httpx
from serving_timings import RunTimings
from serving_workload import BASE, Workload

logger = logging.getLogger(__name__)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the benchmark only talks to loopback addresses, not {host!r}")


@contextlib.contextmanager
def start_server(
    model_dir: Path,
    adapters: dict[str, Path],
    engine_args: dict[str, int | str],
    mode: str = "subprocess",
    startup_timeout: float = 300.0,
    threads: int = 0,
) -> Iterator[str]:
    """A moeserve server for `model_dir` with `adapters`; yields its base URL.

    mode "subprocess": `moeserve serve` in its own process (the benchmark client does not share the server's GIL);
    "inprocess": `BackgroundServer` in a thread of this process (fast to start; what the smoke test uses).
    `engine_args` are `moeserve serve` engine flags without dashes (num_kv_blocks=..., max_adapters=...).
    `threads` > 0 sets the subprocess's OMP_NUM_THREADS (inprocess: the caller's torch.set_num_threads applies).
    """
    if mode == "inprocess":
        from moeserve.server.app import ServerConfig
        from moeserve.server.launch import BackgroundServer, build_server

        app = build_server(engine_config(model_dir, engine_args),
                           ServerConfig(served_model_name=BASE, model_path=str(model_dir)), adapters)  # fmt: skip
        with BackgroundServer(app) as server:
            yield server.url
        return
    if mode != "subprocess":
        raise ValueError(f"unknown server mode {mode!r}; use subprocess or inprocess")
    with socket.socket() as s:  # a free loopback port (tiny race with other processes, checked by the health wait)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moeserve.cli", "--log-level", "WARNING", "serve", "--model", str(model_dir),
           "--served-model-name", BASE, "--host", "127.0.0.1", "--port", str(port), *_flags(engine_args)]  # fmt: skip
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    log = tempfile.NamedTemporaryFile("w+", prefix="moeserve-bench-server-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moeserve serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moeserve serve did not answer /health in {startup_timeout:.0f} s (log: {log.name})"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        os.unlink(log.name)


def engine_config(model_dir: Path, engine_args: dict[str, int | str]):
    """The EngineConfig `moeserve serve` would build from these engine flags."""
    from moeserve.engine.arg_utils import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_config_from_args(str(model_dir), parser.parse_args(_flags(engine_args)))


def _flags(engine_args: dict[str, int | str]) -> list[str]:
    flags = []
    for key, value in engine_args.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def moeserve_body(adapter: str | None, prompt: list[int], out_len: int) -> dict:
    """A streamed /v1/completions request for moeserve (and vLLM): the adapter is picked by `model`."""
    return {"model": adapter or BASE, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def _one(session: aiohttp.ClientSession, url: str, body: dict, t0: float):
    """Streams one completion; returns (chunk arrival times relative to t0, completion tokens from usage)."""
    arrivals: list[float] = []
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{body.get('model')}: HTTP {response.status}: {(await response.read())[:500]!r}")
        async for raw in response.content:  # one SSE line at a time
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter() - t0)
    return arrivals, tokens


async def _run(url: str, work: Workload, timeout: float, body: Callable, keepalive: bool) -> RunTimings:
    # aiohttp, as vLLM's own serving benchmark: httpx spends ~25 ms of its own before the 32nd request of a wave is on
    # the wire (measured against a trivial server), time that no server can win back. A fresh session per run, so
    # every wave opens its own connections; keepalive=False also closes each one after its response (vLLM stalls
    # every other wave on connections kept from the previous one: shared/peers/README.md).
    connector = aiohttp.TCPConnector(limit=len(work.prompts) + 4, force_close=not keepalive)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        jobs = [_one(session, url, body(a, p, work.out_len), t0) for p, a in zip(work.prompts, work.adapters)]
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=timeout)
    wall = max(arr[-1] for arr, _ in results if arr)
    tokens = sum(t for _, t in results)
    if tokens != work.output_tokens:
        raise RuntimeError(f"{url} returned {tokens} output tokens, expected {work.output_tokens}")
    return RunTimings.from_arrivals(wall, tokens, [arr for arr, _ in results])


def run_http(
    url: str, work: Workload, timeout: float = 600.0, body: Callable = moeserve_body, keepalive: bool = True
) -> RunTimings:
    """One run: all of the workload's requests at once as concurrent streams; bounded by `timeout` seconds.

    `body(adapter, prompt_ids, out_len)` makes each request's JSON (it differs between servers: serving_peers.py).
    """
    check_loopback(url)
    return asyncio.run(_run(url, work, timeout, body, keepalive))


class OfflineEngine:
    """moeserve's engine stepped in this process (no HTTP, no server thread); a token's time is its step's end."""

    name = "moeserve offline"

    def __init__(self, model_dir: Path, adapters: dict[str, Path], engine_args: dict[str, int | str]) -> None:
        from moeserve.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(engine_config(model_dir, engine_args), adapters)
        self.runs = 0
        self.last_tokens: list[list[int]] = []  # the last run's output token ids per request (--check-outputs)

    def run(self, work: Workload, timeout: float = 600.0) -> RunTimings:
        from moeserve.engine.sampling_params import SamplingParams

        self.runs += 1
        params = SamplingParams(temperature=0.0, max_tokens=work.out_len, ignore_eos=True)
        arrivals: dict[str, list[float]] = {}
        finals: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        for i, (prompt, adapter) in enumerate(zip(work.prompts, work.adapters)):
            rid = f"{self.runs}-{i}"
            arrivals[rid] = []
            self.engine.add_request(rid, prompt, params, adapter=adapter)
        max_steps = len(work.prompts) * (len(work.prompts[0]) + work.out_len) + 100  # chunked prefill, preemption
        for _ in range(max_steps):
            if not self.engine.has_unfinished_requests():
                break
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the offline engine did not finish in {timeout:.0f} s")
            outputs = self.engine.step()
            now = time.perf_counter() - t0
            for out in outputs:
                arrivals[out.request_id] += [now] * len(out.new_token_ids)
                finals[out.request_id] = out.outputs[0].token_ids
        self.last_tokens = [finals[rid] for rid in arrivals]
        tokens = sum(map(len, arrivals.values()))
        if tokens != work.output_tokens:
            raise RuntimeError(f"the offline engine made {tokens} tokens, expected {work.output_tokens}")
        return RunTimings.from_arrivals(max(a[-1] for a in arrivals.values()), tokens, list(arrivals.values()))

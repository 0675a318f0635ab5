"""The peer engines of the serving benchmark: vLLM's CPU build and llama.cpp's llama-server, each its own
OpenAI-compatible server on loopback, started with the scripts of shared/peers (README.md there has every quirk).

Both get the same model, the same prompt token ids, the same attention-LoRA adapters and the same output lengths
(greedy, ignore_eos) as moeserve. What differs per peer is only how a request names its adapter:

  vllm          "model": the adapter's name (served with --lora-modules NAME=DIR), or the base's served name
  llama-server  "lora": [{"id": i, "scale": 1.0}] for the i-th adapter of its --lora list, and an explicit
                [{"id": 0, "scale": 0.0}] for the base (shared/peers/README.md, quirk c: a request without the list
                runs under the global scales and may reuse a prompt cache computed under another adapter)

A peer whose install is missing is reported as skipped (`peer_missing`), never a crash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LLAMA", "PEERS", "VLLM", "PeerPaths", "peer_missing", "start_llama", "start_vllm"]

import httpx
from serving_client import moeserve_body
from serving_report import LLAMA, PEERS, VLLM
from serving_workload import BASE

logger = logging.getLogger(__name__)

ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}  # what vLLM on CPU adapts (README quirk 4), and llama.cpp too
_GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class PeerPaths:
    """Where the peers' scripts and installs are (bench_serving's --peers-dir, --vllm-venv, --llama-cpp-dir)."""

    peers_dir: Path  # shared/peers: start_vllm.sh, convert.sh, start_llama_server.sh
    vllm_venv: Path  # install_vllm_cpu.sh's venv
    llama_cpp: Path  # install_llama_cpp.sh's DIR/llama.cpp (sources, converters, build/bin/llama-server)

    @property
    def llama_server(self) -> Path:
        return self.llama_cpp / "build" / "bin" / "llama-server"


def peer_missing(system: str, paths: PeerPaths) -> str | None:
    """Why `system` cannot run here (a sentence naming what is missing and how to install it), or None."""
    script = {VLLM: "start_vllm.sh", LLAMA: "start_llama_server.sh"}[system]
    needed = [paths.peers_dir / script]
    if system == VLLM:
        needed.append(paths.vllm_venv / "bin" / "python")
        install = f"{paths.peers_dir}/install_vllm_cpu.sh {paths.vllm_venv}"
    else:
        needed += [paths.peers_dir / "convert.sh", paths.llama_server, paths.llama_cpp / "convert_hf_to_gguf.py"]
        install = f"{paths.peers_dir}/install_llama_cpp.sh {paths.llama_cpp.parent}"
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return f"{system} skipped: not installed here ({', '.join(absent)} missing; install with {install})"
    return None


def check_attention_lora(adapters: dict[str, Path]) -> None:
    """Refuses adapters a peer would serve differently: anything but PEFT LoRA on q/k/v/o."""
    for name, path in adapters.items():
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        targets = config.get("target_modules") or []
        targets = {targets} if isinstance(targets, str) else set(targets)
        targets = {t.rsplit(".", 1)[-1] for t in targets}  # PEFT matches suffixes: self_attn.q_proj is q_proj
        if config.get("peft_type") != "LORA" or not targets or not targets <= ATTENTION:
            raise ValueError(f"adapter {name} ({path}) is {config.get('peft_type')} on {sorted(targets)}: the peers "
                             "serve plain LoRA on q_proj/k_proj/v_proj/o_proj only")  # fmt: skip


vllm_body = moeserve_body  # vLLM picks the adapter by `model`, as moeserve does


def llama_body(lora_ids: dict[str, int], adapter: str | None, prompt: list[int], out_len: int) -> dict:
    """A streamed /v1/completions request for llama-server: the adapter is picked by an explicit `lora` list."""
    lora = [{"id": 0, "scale": 0.0}] if adapter is None else [{"id": lora_ids[adapter], "scale": 1.0}]
    return {"model": BASE, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "lora": lora}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:  # a tiny race with other processes, caught by the readiness wait
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], name: str, ready: Callable[[str], bool], timeout: float):
    """Runs `cmd` in its own process group until the context ends; `ready(log_text)` says when it serves."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    clean = False  # the log is kept (and named in the error) when the server failed to start or a run failed
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = Path(log.name).read_text(errors="replace")
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} at start:\n{text[-4000:]}")
            if ready(text):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready in {timeout:.0f} s (log: {log.name})")
            time.sleep(0.5)
        logger.info("%s ready (log %s)", name, log.name)
        yield
        clean = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the scripts' servers and workers share the group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        if clean:
            os.unlink(log.name)


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    return False


@contextlib.contextmanager
def start_vllm(paths: PeerPaths, model_dir: Path, adapters: dict[str, Path], dtype: str, threads: int,
               timeout: float = 600.0, max_model_len: int = 2048) -> Iterator[tuple[str, Callable]]:  # fmt: skip
    """vLLM's OpenAI server through start_vllm.sh; yields (base URL, request builder).

    max_model_len: at least the longest prompt + output sent. Left to vLLM it is the model's max_position_embeddings.
    On MLA (DeepSeek) vLLM's CPU platform turns chunked prefill off and sets its token budget per step to
    max(max_model_len, 2048), and its warm-up runs a batch of that many tokens: with DeepSeek-V2-Lite's 163840 the
    server was still warming up after 6 min on 2 cores; with 2048 it served in about a minute."""
    check_attention_lora(adapters)
    port = _free_port()
    env = {**os.environ, "VLLM_VENV": str(paths.vllm_venv), "MODEL_DIR": str(model_dir), "SERVED_NAME": BASE,
           "PORT": str(port), "DTYPE": dtype, "PYTHONSAFEPATH": "1", "MAX_MODEL_LEN": str(max_model_len)}  # fmt: skip
    if threads > 0:
        env["THREADS"] = str(threads)
    if adapters:
        env["ADAPTERS"] = " ".join(f"{n}={p}" for n, p in adapters.items())
        env["MAX_LORA_RANK"] = str(max(_rank(p) for p in adapters.values()))
    url = f"http://127.0.0.1:{port}"
    with _server([str(paths.peers_dir / "start_vllm.sh")], env, VLLM, lambda _: _healthy(url), timeout):
        yield url, vllm_body


def _rank(adapter_dir: Path) -> int:
    r = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])
    return next(x for x in (8, 16, 32, 64, 128, 256) if x >= r)  # vLLM accepts only these max ranks


def convert_gguf(paths: PeerPaths, model_dir: Path, adapters: dict[str, Path], dtype: str, out_dir: Path) -> dict:
    """The base and adapters as GGUF files (convert.sh, ~5 s each; kept in out_dir and reused)."""
    kind = _GGUF_TYPES[dtype]
    files = {None: out_dir / f"base-{kind}.gguf"} | {n: out_dir / f"{n}-{kind}.gguf" for n in adapters}
    todo = [n for n, f in files.items() if not f.exists() and n is not None]
    if not files[None].exists() or todo:
        cmd = [str(paths.peers_dir / "convert.sh"), str(paths.llama_cpp), str(model_dir), str(out_dir),
               *(f"{n}={adapters[n]}" for n in todo)]  # fmt: skip
        env = {**os.environ, "PY": sys.executable, "OUTTYPE": kind}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert.sh failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        logger.info("%s", done.stdout.strip())
    return files


@contextlib.contextmanager
def start_llama(paths: PeerPaths, model_dir: Path, adapters: dict[str, Path], dtype: str, threads: int, slots: int,
                gguf_dir: Path, timeout: float = 120.0) -> Iterator[tuple[str, Callable]]:  # fmt: skip
    """llama-server through start_llama_server.sh over GGUF conversions; yields (base URL, request builder)."""
    check_attention_lora(adapters)
    files = convert_gguf(paths, model_dir, adapters, dtype, gguf_dir)
    names = list(adapters)  # adapter ids 0, 1, ... follow the LORAS order
    port = _free_port()
    env = {**os.environ, "LLAMA_SERVER": str(paths.llama_server), "GGUF": str(files[None]), "SERVED_NAME": BASE,
           "PORT": str(port), "THREADS": str(max(threads, 1)), "SLOTS": str(slots),
           "LORAS": " ".join(f"{n}={files[n]}" for n in names)}  # fmt: skip
    lora_ids = {n: i for i, n in enumerate(names)}
    url = f"http://127.0.0.1:{port}"
    # /health answers before the script has zeroed the global adapter scales: wait for the script's own line
    with _server([str(paths.peers_dir / "start_llama_server.sh")], env, LLAMA,
                 lambda text: "llama-server ready on" in text, timeout):  # fmt: skip
        yield url, lambda adapter, prompt, out_len: llama_body(lora_ids, adapter, prompt, out_len)

"""The engine core in a process of its own, so the model never waits for HTTP, JSON or detokenizing (and they never
wait for the model): the two sides share no interpreter lock.

The front end and the core talk over one duplex pipe of pickled tuples:

    front end -> core   ("add", EngineCoreRequest) | ("abort", [request ids]) | ("call", call_id, method, args)
                        | ("shutdown",)
    core -> front end   ("ready", CoreInfo) | ("outputs", EngineCoreOutputs) | ("result", call_id, ok, value)
                        | ("failed", message)

The core drains every message waiting before each step (so requests that arrive together are batched together),
steps while it has work, and blocks on the pipe when idle.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from moeserve.engine.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.core_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)


@dataclass
class CoreInfo:
    """What the front end needs to know of the model to check requests itself."""

    max_model_len: int
    vocab_size: int
    pid: int
    num_blocks: int = 0  # KV-cache blocks (for vllm:cache_config_info)
    adapter_digests: dict[str, str] = field(default_factory=dict)  # name -> content digest of what was registered
    dropped_adapters: dict[str, str] = field(default_factory=dict)  # name -> why a restart could not register it


# The calls the front end may make on the core between steps (adapter management and stats).
CALLS = ("register_adapter", "unregister_adapter", "list_adapters", "stats")


class _CoreServer:
    def __init__(self, core: EngineCore, conn: Connection) -> None:
        self.core = core
        self.conn = conn
        # register_adapter calls whose files the reader thread is still reading: (call id, name, replace, files)
        self.registering: list[tuple[int, str, bool, Future]] = []

    def register_adapter(self, name: str, path: str, replace: bool = False):
        return self.core.adapters.register(name, path, replace=replace)

    def _start_registering(self, call_id: int, name: str, path: str, replace: bool = False) -> None:
        """Reads the adapter's files off the engine's thread; the steps go on, the call is answered when done."""
        self.registering.append((call_id, name, replace, self.core.adapters.read_files(path)))

    def _finish_registering(self) -> bool:
        """Answers the register_adapter calls whose files are read; True if there were any."""
        still = []
        for call_id, name, replace, read in self.registering:
            if not read.done():
                still.append((call_id, name, replace, read))
                continue
            try:
                files = read.result()
                info = self.core.adapters.register(name, files.path, replace=replace, files=files)
                self.conn.send(("result", call_id, True, info))
            except Exception as exc:
                self.conn.send(("result", call_id, False, exc))
        finished = len(still) < len(self.registering)
        self.registering = still
        return finished

    def unregister_adapter(self, name: str) -> None:
        self.core.adapters.unregister(name)

    def list_adapters(self):
        return self.core.adapters.list()

    def stats(self):
        return self.core.stats()

    def handle(self, message: tuple) -> bool:
        """Applies one message; False on shutdown."""
        kind = message[0]
        if kind == "add":
            request: EngineCoreRequest = message[1]
            try:
                self.core.add_request(request)
            except Exception as exc:  # this request alone is refused (an adapter unregistered meanwhile, ...)
                error = EngineCoreOutput(request.request_id, [], error=str(exc), error_kind=type(exc).__name__)
                self.conn.send(("outputs", EngineCoreOutputs([error])))
        elif kind == "abort":
            self.core.abort_requests(message[1])
        elif kind == "call":
            _, call_id, method, args = message
            if method == "register_adapter":
                self._start_registering(call_id, *args)
                return True
            try:
                if method not in CALLS:
                    raise ValueError(f"unknown engine core call {method!r}")
                self.conn.send(("result", call_id, True, getattr(self, method)(*args)))
            except Exception as exc:
                self.conn.send(("result", call_id, False, exc))
        elif kind == "shutdown":
            return False
        return True

    def run(self) -> None:
        core, conn = self.core, self.conn
        while True:
            if not core.has_unfinished_requests():
                # Idle: sleep until the front end says something (or, while files are being read, briefly).
                conn.poll(0.002 if self.registering or core.adapters.reading else None)
            changed = False
            while conn.poll(0):
                if not self.handle(conn.recv()):
                    return
                changed = True
            if self.registering:
                changed |= self._finish_registering()
            if core.has_unfinished_requests():
                outputs = core.step()
                conn.send(("outputs", EngineCoreOutputs(outputs, core.stats())))
                if not outputs and core.adapters.reading:
                    conn.poll(0.002)  # nothing ran: the waiting requests' adapter is still being read
            elif changed:  # the messages changed the state without a step (aborts, adapters): publish the snapshot
                conn.send(("outputs", EngineCoreOutputs([], core.stats())))


def run_engine_core(config: EngineConfig, adapters: list[tuple[str, str, str | None]], conn: Connection) -> None:
    """Entry point of the core process: build the core, register the adapters, serve the pipe until shutdown.

    adapters: (name, path, digest), as EngineCore.register_adapters takes them (a bad one named at start fails it).
    """
    # Ctrl-C reaches the whole process group; the front end decides when the core stops (it sends "shutdown").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        core = EngineCore(config)
        dropped = core.register_adapters(adapters)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    digests = {info.name: info.digest for info in core.adapters.list()}
    pid = multiprocessing.current_process().pid
    info = CoreInfo(core.max_model_len, core.model.spec.vocab_size, pid, core.kv.pool.num_blocks, digests, dropped)
    conn.send(("ready", info))
    try:
        _CoreServer(core, conn).run()
    except (EOFError, BrokenPipeError):  # the front end is gone
        pass


class CoreStartError(RuntimeError):
    """The engine core process could not start (its message says why: a bad model or adapter directory, ...)."""


def start_core_process(
    config: EngineConfig, adapters: list[tuple[str, str, str | None]], timeout: float = 600.0
) -> tuple[multiprocessing.Process, Connection, CoreInfo]:
    """Spawns the core process and waits until it has loaded the model and the adapters."""
    ctx = multiprocessing.get_context("spawn")  # no fork: the front end has threads (uvicorn, tokenizers)
    ours, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=run_engine_core, args=(config, adapters, theirs), name="moeserve-core", daemon=True)
    proc.start()
    theirs.close()
    deadline = time.monotonic() + timeout
    while not ours.poll(0.1):
        if not proc.is_alive():
            raise CoreStartError(f"the engine core process exited with code {proc.exitcode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise CoreStartError(f"the engine core was not ready after {timeout:.0f} s")
    message = ours.recv()
    if message[0] != "ready":
        proc.join(timeout=10)
        raise CoreStartError(message[1])
    return proc, ours, message[1]

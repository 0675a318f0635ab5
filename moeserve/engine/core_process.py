"""The engine core in a process of its own, so the model never waits for HTTP, JSON or detokenizing (and they never
wait for the model): the two sides share no interpreter lock.

As vLLM's EngineCoreProc, the process runs three threads around one core_channel socket:
- the input thread receives messages and pre-processes requests (compiles their grammars, so a first JSON schema never
  stalls a step); a request it cannot take gets its error output at once;
- the output thread sends: step outputs, call results, and a Heartbeat whenever it has sent nothing for
  HEARTBEAT_S, saying whether the busy loop is mid-iteration and since when (the front end's wedge watchdog);
- the busy loop drains what the input thread queued (everything waiting, so requests that arrive together are batched
  together), steps while it has work, and blocks on the input queue when idle.
The front end closing its end of the socket shuts the core down.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import select
import signal
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from moeserve.engine.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.core_channel import (
    AbortRequests,
    AddRequest,
    CallResult,
    CoreCall,
    CoreInfo,
    Heartbeat,
    Message,
    Ready,
    StartFailed,
    StepOutputs,
    WireError,
    recv_message,
    send_message,
)
from moeserve.engine.core_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from moeserve.errors import kind_of

logger = logging.getLogger(__name__)

# The calls the front end may make on the core between steps (adapter management and stats).
CALLS = ("register_adapter", "unregister_adapter", "list_adapters", "stats")
HEARTBEAT_S = 1.0  # the output thread's longest silence


@dataclass
class _Prepared:
    """A request the input thread has checked and compiled, ready for the busy loop to queue."""

    request: EngineCoreRequest
    grammar: Any


class _Closed:
    """Put on the input queue when the front end's end of the socket has closed: the busy loop returns."""


def _error(exc: BaseException) -> WireError:
    return WireError(kind_of(exc), str(exc) or type(exc).__name__)


class EngineCoreProc:
    def __init__(self, core: EngineCore, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.inputs: queue.Queue = queue.Queue()  # _Prepared | AbortRequests | CoreCall | _Closed
        self.outputs: queue.Queue = queue.Queue()  # messages for the output thread; None ends it
        self.busy_since: float | None = None  # when the busy loop's current iteration began; None while idle
        # register_adapter calls whose files the reader thread is still reading: (call id, name, replace, files)
        self.registering: list[tuple[int, str, bool, Future]] = []

    # --- the input and output threads ---

    def _receive(self) -> None:
        try:
            while True:
                message = recv_message(self.sock)
                if isinstance(message, AddRequest):
                    try:
                        grammar = self.core.compile_grammar(message.request)
                    except Exception as exc:  # a bad grammar: this request alone is refused
                        self._refuse(message.request.request_id, exc)
                        continue
                    self.inputs.put(_Prepared(message.request, grammar))
                else:
                    self.inputs.put(message)
        except (EOFError, OSError):
            pass
        except Exception:  # a message that does not unpickle: the channel cannot be trusted any more
            logger.exception("the engine core's input channel failed")
        self.inputs.put(_Closed())

    def _send_loop(self) -> None:
        while True:
            try:
                message = self.outputs.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                message = Heartbeat(self.busy_since)
            if message is None:
                return
            try:
                send_message(self.sock, message)
            except OSError:  # the front end is gone; the input thread sees it too and ends the busy loop
                return

    def _send(self, message: Message) -> None:
        self.outputs.put(message)

    def _refuse(self, request_id: str, exc: BaseException) -> None:
        wire = _error(exc)
        error = EngineCoreOutput(request_id, [], error=wire.message, error_kind=wire.kind)
        self._send(StepOutputs(EngineCoreOutputs([error])))

    # --- the calls ---

    def unregister_adapter(self, name: str) -> None:
        self.core.adapters.unregister(name)

    def list_adapters(self):
        return self.core.adapters.list()

    def stats(self):
        return self.core.stats()

    def _start_registering(self, call_id: int, name: str, path: str, replace: bool = False) -> None:
        """Reads the adapter's files off the busy loop; the steps go on, the call is answered when done."""
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
                self._send(CallResult(call_id, info))
            except Exception as exc:
                self._send(CallResult(call_id, error=_error(exc)))
        finished = len(still) < len(self.registering)
        self.registering = still
        return finished

    # --- the busy loop ---

    def _handle(self, message) -> bool:
        """Applies one message from the input queue; False when the front end has gone."""
        if isinstance(message, _Prepared):
            try:
                self.core.add_request(message.request, message.grammar)
            except Exception as exc:  # this request alone is refused (an adapter unregistered meanwhile, ...)
                self._refuse(message.request.request_id, exc)
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
        elif isinstance(message, CoreCall):
            if message.method == "register_adapter":  # answered once its files are read (_finish_registering)
                self._start_registering(message.call_id, *message.args)
                return True
            try:
                if message.method not in CALLS:
                    raise ValueError(f"unknown engine core call {message.method!r}")
                self._send(CallResult(message.call_id, getattr(self, message.method)(*message.args)))
            except Exception as exc:
                self._send(CallResult(message.call_id, error=_error(exc)))
        elif isinstance(message, _Closed):
            return False
        return True

    def _waiting_on_files(self) -> bool:
        return bool(self.registering) or self.core.adapters.reading

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._receive, name="core-input", daemon=True),
            threading.Thread(target=self._send_loop, name="core-output", daemon=True),
        ]
        for t in threads:
            t.start()
        core = self.core
        try:
            while True:
                message = None
                if not core.has_unfinished_requests():
                    # Idle: sleep until the front end says something (or, while files are being read, briefly).
                    self.busy_since = None
                    try:
                        message = self.inputs.get(timeout=0.002 if self._waiting_on_files() else None)
                    except queue.Empty:
                        pass
                self.busy_since = time.monotonic()
                changed = False
                while True:
                    if message is None:
                        try:
                            message = self.inputs.get_nowait()
                        except queue.Empty:
                            break
                    if not self._handle(message):
                        return
                    message, changed = None, True
                if self.registering:
                    changed |= self._finish_registering()
                if core.has_unfinished_requests():
                    outputs = core.step()
                    self._send(StepOutputs(EngineCoreOutputs(outputs, core.stats())))
                    if not outputs and core.adapters.reading:
                        time.sleep(0.002)  # nothing ran: the waiting requests' adapter is still being read
                elif changed:  # the messages changed the state without a step (aborts, adapters): publish it
                    self._send(StepOutputs(EngineCoreOutputs([], core.stats())))
        finally:
            self.outputs.put(None)
            threads[1].join(timeout=5)


def run_engine_core(config: EngineConfig, adapters: list[tuple[str, str, str | None]], sock: socket.socket) -> None:
    """Entry point of the core process: build the core, register the adapters, serve the channel until it closes.

    adapters: (name, path, digest), as EngineCore.register_adapters takes them (a bad one named at start fails it).
    """
    # Ctrl-C reaches the whole process group; the front end decides when the core stops (it closes the channel).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        core = EngineCore(config)
        dropped = core.register_adapters(adapters)
    except Exception as exc:
        send_message(sock, StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    digests = {info.name: info.digest for info in core.adapters.list()}
    pid = multiprocessing.current_process().pid
    info = CoreInfo(core.max_model_len, core.model.spec.vocab_size, pid, core.kv.pool.num_blocks, digests, dropped)
    try:
        send_message(sock, Ready(info))
        EngineCoreProc(core, sock).run()
    except OSError:  # the front end is gone
        pass


class CoreStartError(RuntimeError):
    """The engine core process could not start (its message says why: a bad model or adapter directory, ...)."""


def start_core_process(
    config: EngineConfig, adapters: list[tuple[str, str, str | None]], timeout: float = 600.0, target=run_engine_core
) -> tuple[multiprocessing.Process, socket.socket, CoreInfo]:
    """Spawns the core process and waits until it has loaded the model and the adapters; returns the process, the
    front end's end of the channel (blocking) and what the core said of itself.

    target: the process's entry point (run_engine_core; tests pass a wrapper that injects faults)."""
    ctx = multiprocessing.get_context("spawn")  # no fork: the front end has threads (uvicorn, tokenizers)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = ctx.Process(target=target, args=(config, adapters, theirs), name="moeserve-core", daemon=True)
    try:
        proc.start()
    finally:
        theirs.close()
    deadline = time.monotonic() + timeout
    while not select.select([ours], [], [], 0.1)[0]:
        if not proc.is_alive():
            ours.close()
            raise CoreStartError(f"the engine core process exited with code {proc.exitcode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            ours.close()
            raise CoreStartError(f"the engine core was not ready after {timeout:.0f} s")
    try:
        message = recv_message(ours)
    except EOFError:
        proc.join(timeout=10)
        ours.close()
        raise CoreStartError(f"the engine core process exited with code {proc.exitcode} before it was ready") from None
    if not isinstance(message, Ready):
        proc.join(timeout=10)
        ours.close()
        raise CoreStartError(message.message if isinstance(message, StartFailed) else f"unexpected {message!r}")
    return proc, ours, message.info

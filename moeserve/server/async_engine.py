"""The front end's side of the engine: requests in, streamed outputs back, with the engine core in its own process.

Tokenizing, checking requests and detokenizing happen here, in the server's process; scheduling, the model and
sampling in the core's (moeserve.engine.core_process). The channel to the core (moeserve.engine.core_channel) is an
asyncio stream on the event loop: writes are buffered and never block the loop, a reader task takes the core's
messages, and every piece of front-end state is touched by the loop's thread alone.

The front end watches the core: when its process dies, or while it has work stops making progress for
`stall_timeout` seconds (no message at all, or one iteration of its busy loop running that long: a wedge of any
cause), every request in flight ends with EngineDeadError, the core is killed and a new one started with the adapters
registered at that moment; requests that arrive meanwhile wait for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from moeserve.adapters.config import AdapterError
from moeserve.adapters.manager import AdapterInfo, UnknownAdapterError
from moeserve.engine.config import EngineConfig
from moeserve.engine.core_channel import (
    AbortRequests,
    AddRequest,
    CallResult,
    CoreCall,
    CoreInfo,
    Heartbeat,
    Message,
    StepOutputs,
    encode,
    read_message,
)
from moeserve.engine.core_messages import EngineCoreOutputs, SchedulerStats, StepFailedError
from moeserve.engine.core_process import run_engine_core, start_core_process
from moeserve.engine.input_processor import InputProcessor
from moeserve.engine.output_processor import OutputProcessor
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.errors import ErrorKind, RequestError

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting: the request is refused, not queued."""

    kind = ErrorKind.QUEUE_FULL


class EngineDeadError(RuntimeError):
    """The core is down, restarting, or the server is shutting down: a 503."""

    kind = ErrorKind.UNAVAILABLE


@dataclass
class _Cut:
    """Put in a request's stream to end it from the front end: the request is aborted in the core."""

    error: Exception


def error_from_core(kind: ErrorKind | None, message: str) -> Exception:
    """A failure the core reported (its kind and message) as the front end raises it: the adapter kinds as the
    adapter errors the routes already answer, the others as RequestError of that kind; no kind is the engine's."""
    kind = kind if isinstance(kind, ErrorKind) else ErrorKind.ENGINE
    if kind is ErrorKind.ADAPTER_INVALID:
        return AdapterError(message)
    if kind is ErrorKind.ADAPTER_NOT_FOUND:
        return UnknownAdapterError(message)
    return RequestError(kind, message)


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig,
        adapters: dict[str, Path] | None = None,
        max_waiting: int | None = None,
        start_timeout: float = 600.0,
        stall_timeout: float = 300.0,
        core_target=run_engine_core,
    ) -> None:
        """stall_timeout: how long the core may go without a message, or one busy-loop iteration (a step) may run,
        while requests or calls are in flight, before it counts as wedged and is restarted. core_target: the core
        process's entry point (tests inject faults through it)."""
        self.config = config
        self.max_waiting = max_waiting
        self.start_timeout = start_timeout
        self.stall_timeout = stall_timeout
        self.core_target = core_target
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        # name -> path of every registered adapter, in registration order: what a restarted core loads.
        self.adapters: dict[str, Path] = {name: Path(path) for name, path in (adapters or {}).items()}
        self._digests: dict[str, str] = {}  # name -> content digest of the files validated at registration
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats = SchedulerStats()
        self.on_step: Callable[[list[RequestOutput], SchedulerStats], None] | None = None  # metrics hook
        self.on_abort: Callable[[str], None] | None = None  # metrics hook: a request ended early by the front end
        self.restarts = 0
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs, as they come
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._last_message = 0.0  # time.monotonic() of the core's last message
        self._busy_since: float | None = None  # the core's busy loop mid-iteration since then (its heartbeats)
        self._wedged: str | None = None  # why the watchdog killed the core
        self._error: str | None = None  # why the core is down (None while it serves)
        self._closing = False
        self._draining = False  # shutting down: new requests are refused
        self._spawn()  # synchronously: a bad model or adapter fails `moeserve serve` at start

    # --- the core process ---

    def _spawn(self) -> None:
        adapters = [(name, str(path), self._digests.get(name)) for name, path in self.adapters.items()]
        self.proc, self.sock, info = start_core_process(self.config, adapters, self.start_timeout, self.core_target)
        self.info: CoreInfo = info
        self._digests.update(info.adapter_digests)
        for name, reason in info.dropped_adapters.items():  # changed on disk since: never served under that name
            logger.error("adapter %s is no longer served: %s", name, reason)
            self.adapters.pop(name, None)
            self._digests.pop(name, None)
        self.inputs = InputProcessor(self.tokenizer, info.vocab_size, info.max_model_len)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def error(self) -> str | None:
        return self._error

    async def start(self) -> None:
        """Attaches the channel to the running event loop (the server's lifespan calls this)."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        await self._attach()
        self._watchdog = self._loop.create_task(self._watch())

    async def _attach(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock, limit=2**20)
        self._last_message, self._busy_since, self._wedged = time.monotonic(), None, None
        self._reader_task = self._loop.create_task(self._read(reader))
        self._error = None
        self._ready.set()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._on_message(await read_message(reader))
        except (EOFError, OSError):
            self._on_core_death()

    def _on_message(self, message: Message) -> None:
        self._last_message = time.monotonic()
        if isinstance(message, StepOutputs):
            self._busy_since = None  # an iteration finished
            self._on_outputs(message.outputs)
        elif isinstance(message, Heartbeat):
            self._busy_since = message.busy_since
        elif isinstance(message, CallResult):
            fut = self._calls.pop(message.call_id, None)
            if fut is not None and not fut.done():
                if message.error is None:
                    fut.set_result(message.value)
                else:
                    fut.set_exception(error_from_core(message.error.kind, message.error.message))

    async def _watch(self) -> None:
        """Kills a core that has work and makes no progress for stall_timeout seconds; its death restarts it."""
        while not self._closing:
            await asyncio.sleep(min(1.0, self.stall_timeout / 4))
            if not self._ready.is_set() or not (self._streams or self._calls):
                continue
            now = time.monotonic()
            silent = now - self._last_message
            busy = now - self._busy_since if self._busy_since is not None else 0.0
            if max(silent, busy) > self.stall_timeout and self.proc.is_alive():
                self._wedged = (
                    f"the engine core made no progress for {max(silent, busy):.0f} s with work to do "
                    f"({'no message' if silent >= busy else 'one step running'}); it was killed"
                )
                logger.error("%s: restarting it", self._wedged)
                self.proc.kill()  # the reader sees the channel close: _on_core_death

    def _on_outputs(self, step: EngineCoreOutputs) -> None:
        for out in step.outputs:
            if out.error is not None:  # the core refused or failed this request alone
                self.outputs.abort(out.request_id)
                stream = self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put_nowait(error_from_core(out.error_kind, out.error))
        results, stopped = self.outputs.process(step.outputs, time.monotonic())
        if stopped:
            self._send(AbortRequests(stopped))
        if step.stats is not None:
            self.stats = step.stats
        if self.on_step is not None:
            self.on_step(results, self.stats)
        for out in results:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put_nowait(out if out.error is None else StepFailedError(out.error))  # detokenizing failed

    def _on_core_death(self) -> None:
        self._writer.close()
        self.proc.join(timeout=2)
        if self.proc.is_alive():  # its channel closed but the process lingers: it cannot serve any more
            self.proc.kill()
            self.proc.join(timeout=5)
        reason = self._wedged or f"the engine core process died (exit code {self.proc.exitcode})"
        self._error = reason
        self._ready.clear()
        for request_id, stream in self._streams.items():
            self.outputs.abort(request_id)
            stream.put_nowait(EngineDeadError(f"{reason}; the request was lost and the core is restarting"))
        self._streams.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        self._calls.clear()
        if not self._closing:
            logger.error("%s: restarting it with %d adapters", reason, len(self.adapters))
            self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self._loop.run_in_executor(None, self._spawn)
        except Exception as exc:
            self._error = f"the engine core could not be restarted: {exc}"
            logger.error(self._error)
            return
        self.restarts += 1
        await self._attach()
        logger.info("engine core restarted (pid %d)", self.info.pid)

    def _send(self, message: Message) -> None:
        """Queues the message on the channel's buffer: never blocks the event loop, whatever the core is doing."""
        if self._error is not None:
            raise EngineDeadError(self._error)
        if self._writer is None or self._writer.is_closing():
            raise EngineDeadError("the engine core is unreachable")
        self._writer.write(encode(message))

    async def _wait_ready(self, timeout: float = 60.0) -> None:
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise EngineDeadError(self._error or "the engine core is not ready") from None

    async def call(self, method: str, *args: Any) -> Any:
        """Runs one of the core's calls (core_process.CALLS) between steps and returns its result."""
        await self._wait_ready()
        call_id = next(self._call_ids)
        fut = self._loop.create_future()
        self._calls[call_id] = fut
        self._send(CoreCall(call_id, method, args))
        return await fut

    # --- adapters, mirrored here so requests are checked without a round trip ---

    def is_registered(self, name: str) -> bool:
        return name in self.adapters

    async def register_adapter(self, name: str, path: Path) -> AdapterInfo:
        info = await self.call("register_adapter", name, str(path))
        self.adapters[name] = Path(path)
        self._digests[name] = info.digest
        return info

    async def unregister_adapter(self, name: str) -> None:
        # Out of the mirror first: a registration of the same name started meanwhile reaches the core after this
        # call, so the core ends with the adapter registered exactly when the mirror says so.
        self.adapters.pop(name, None)
        self._digests.pop(name, None)
        await self.call("unregister_adapter", name)

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self.call("list_adapters")

    # --- requests ---

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._streams) - self.stats.num_running)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
        index: int = 0,
        prompt_text: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as the core produces them; closing the iteration early aborts the request.

        `prompt_text`: the text of a prompt given as token ids (the server tokenizes before it gets here), for echo.
        """
        if self._draining:
            raise EngineDeadError("the server is shutting down")
        await self._wait_ready()
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        if adapter is not None and not self.is_registered(adapter):
            raise UnknownAdapterError(f"no adapter named {adapter!r} is loaded")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.inputs.process(request_id, prompt, params, adapter)
        stream: asyncio.Queue = asyncio.Queue()
        self._send(AddRequest(request))
        self._streams[request_id] = stream
        self.outputs.add(request, prompt if isinstance(prompt, str) else prompt_text, index)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Cut):
                    raise item.error  # the front end ends it (shutdown): finished=False, so the core aborts it
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the client went away, the handler failed, or shutdown: free the request's KV blocks
                self._streams.pop(request_id, None)
                self.outputs.abort(request_id)
                if self.on_abort is not None:
                    self.on_abort(request_id)
                if self._error is None:
                    try:
                        self._send(AbortRequests([request_id]))
                    except EngineDeadError:
                        pass  # the core died meanwhile: nothing of the request is left there

    async def drain(self, timeout: float) -> None:
        """Shutdown: refuses new requests, waits up to `timeout` seconds for running ones to finish, then ends the
        rest with EngineDeadError (streams: an error event and [DONE]; waiting clients: a 503), aborted in the core."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning("shutdown timeout: ending %d requests still running", len(self._streams))
        for stream in list(self._streams.values()):
            stream.put_nowait(_Cut(EngineDeadError("the server is shutting down: the request was aborted")))
        while self._streams and time.monotonic() < deadline + 5:  # their handlers answer and abort them
            await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        """Stops the core: its end of the channel closes, it returns; killed if it has not within 10 s."""
        self._closing = True
        for task in (self._reader_task, self._watchdog):
            if task is not None and not task.done():
                task.cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()

"""The front end's side of the engine: requests in, streamed outputs back, with the engine core in its own process.

Tokenizing, checking requests and detokenizing happen here, in the server's process; scheduling, the model and
sampling in the core's (moeserve.engine.core_process). The pipe to the core is read by the event loop itself
(`add_reader`), so every piece of front-end state is touched by one thread and needs no lock.

The front end watches the core: when its process dies, every request in flight ends with EngineDeadError, a new core
is started with the adapters registered at that moment, and requests that arrive meanwhile wait for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from moeserve.adapters.config import AdapterError
from moeserve.adapters.manager import AdapterInfo, UnknownAdapterError
from moeserve.engine.config import EngineConfig
from moeserve.engine.core_messages import EngineCoreOutputs, SchedulerStats, StepFailedError
from moeserve.engine.core_process import CoreInfo, start_core_process
from moeserve.engine.input_processor import InputProcessor
from moeserve.engine.output_processor import OutputProcessor
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting: the request is refused, not queued."""


class EngineDeadError(RuntimeError):
    """The core is down, restarting, or the server is shutting down: a 503."""


@dataclass
class _Cut:
    """Put in a request's stream to end it from the front end: the request is aborted in the core."""

    error: Exception


# The core's per-request errors (EngineCoreOutput.error_kind) as the front end raises them; others are ValueErrors.
_ERROR_KINDS: dict[str, type[Exception]] = {
    "UnknownAdapterError": UnknownAdapterError,
    "AdapterError": AdapterError,
    "AdapterChangedError": AdapterError,
    "StepFailedError": StepFailedError,
}


class AsyncEngine:
    def __init__(
        self,
        config: EngineConfig,
        adapters: dict[str, Path] | None = None,
        max_waiting: int | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        self.config = config
        self.max_waiting = max_waiting
        self.start_timeout = start_timeout
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
        self._error: str | None = None  # why the core is down (None while it serves)
        self._closing = False
        self._draining = False  # shutting down: new requests are refused
        self._spawn()  # synchronously: a bad model or adapter fails `moeserve serve` at start

    # --- the core process ---

    def _spawn(self) -> None:
        adapters = [(name, str(path), self._digests.get(name)) for name, path in self.adapters.items()]
        self.proc, self.conn, info = start_core_process(self.config, adapters, self.start_timeout)
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
        """Attaches the pipe to the running event loop (the server's lifespan calls this)."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._attach()

    def _attach(self) -> None:
        self._loop.add_reader(self.conn.fileno(), self._on_readable)
        # uvloop (libuv) makes a polled fd non-blocking, and multiprocessing's framed messages need whole writes
        # and reads: a burst that fills the pipe while the core is mid-step would fail (EAGAIN) or tear a
        # message. Kept blocking, as under asyncio's own loop, a full pipe holds the sender until the core reads.
        os.set_blocking(self.conn.fileno(), True)
        self._error = None
        self._ready.set()

    def _on_readable(self) -> None:
        try:
            while self.conn.poll(0):
                self._on_message(self.conn.recv())
        except (EOFError, OSError):
            self._on_core_death()

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            self._on_outputs(message[1])
        elif kind == "result":
            _, call_id, ok, value = message
            fut = self._calls.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)

    def _on_outputs(self, step: EngineCoreOutputs) -> None:
        for out in step.outputs:
            if out.error is not None:  # the core refused this request alone
                self.outputs.abort(out.request_id)
                stream = self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put_nowait(_ERROR_KINDS.get(out.error_kind or "", ValueError)(out.error))
        results, stopped = self.outputs.process(step.outputs, time.monotonic())
        if stopped:
            self._send(("abort", stopped))
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
        self._loop.remove_reader(self.conn.fileno())
        self.proc.join(timeout=5)
        reason = f"the engine core process died (exit code {self.proc.exitcode})"
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
        self._attach()
        logger.info("engine core restarted (pid %d)", self.info.pid)

    def _send(self, message: tuple) -> None:
        if self._error is not None:
            raise EngineDeadError(self._error)
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError) as exc:
            raise EngineDeadError(f"the engine core is unreachable: {exc}") from exc

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
        self._send(("call", call_id, method, args))
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
        self._send(("add", request))
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
                        self._send(("abort", [request_id]))
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
        self._closing = True
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.conn.fileno())
            except (ValueError, OSError):
                pass
        try:
            self.conn.send(("shutdown",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()

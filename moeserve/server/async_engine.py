"""The bridge between asyncio request handlers and the engine loop, which steps in its own thread.

Everything that touches the engine (adding and aborting requests, loading adapters, stepping) runs on the engine
thread, in the order it was asked for, so the engine itself needs no locks. Handlers submit commands and await
their results; outputs flow back to each request's asyncio queue as they are produced.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting: the request is refused, not queued."""


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    adapter: str | None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeserve-engine", daemon=True)
        self._error: BaseException | None = None
        self.on_step: Callable[[list[RequestOutput], float], None] | None = None  # metrics hook, engine thread

    # --- engine thread ---

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
                    continue
                started = time.monotonic()
                outputs = self.engine.step()
                if self.on_step is not None:
                    self.on_step(outputs, started)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the engine is broken: fail every waiting request instead of hanging
            logger.exception("engine loop died")
            self._error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop died: {exc}"))
            self._fail_commands(exc)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _fail_commands(self, exc: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError(str(exc)))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    # --- any thread ---

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the engine thread between steps and returns its result (or raises its exception)."""
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error}")
        fut: Future = Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: str | None = None,
        index: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as the engine produces them; cancelling the iteration aborts the request."""
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), time.monotonic(), adapter)

        def add() -> None:
            if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self.engine.add_request(request_id, prompt, params, adapter=adapter, index=index)
            self._streams[request_id] = stream

        await self.call(add)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the client went away or the handler failed: free the request's KV blocks
                self._streams.pop(request_id, None)
                if self._error is None:
                    self._commands.put((lambda: self.engine.abort_request(request_id), Future()))
                    self._wake.set()

    async def drain(self, timeout: float) -> None:
        """Waits up to `timeout` seconds for running requests to finish, then aborts the rest."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the server is shutting down"))
            await self.call(lambda rid=request_id: self.engine.abort_request(rid))

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

"""One HTTP request through an ASGI app in this process, its response yielded piece by piece.

A Ray Serve replica runs the whole moeserve FastAPI app (every route, its validation, errors and streaming) this way,
so the replicas answer exactly what `moeserve serve` answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class HTTPRequest:
    """What the front of the deployment received, as plain data (it crosses processes)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw, lower-case names
    body: bytes = b""


@dataclass
class ResponseStart:
    """The status line and headers: the first thing call_asgi yields; body chunks (bytes) follow."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def call_asgi(app, request: HTTPRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Runs `app` on `request`; yields its ResponseStart, then each non-empty body chunk as the app sends it.

    Closing the iteration early tells the app the client went away (http.disconnect), as a real server would.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    gone = asyncio.Event()
    body_sent = False
    messages: asyncio.Queue = asyncio.Queue()

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing its response
                task.result()
                raise RuntimeError(f"{request.method} {request.path}: the app ended without a complete response")
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5.0)  # its own cleanup (aborting engine requests) runs to the end
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

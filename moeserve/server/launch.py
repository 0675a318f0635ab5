"""Starts the HTTP server: the engine, the adapters named at start, the app, uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import uvicorn

from moeserve.engine.config import EngineConfig
from moeserve.server.app import ServerConfig, build_app
from moeserve.server.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


def build_server(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    adapters: dict[str, Path] | None = None,
    max_waiting: int | None = None,
    **engine_kw,
):
    """The app, with its engine core already started in its own process (adapters registered there). engine_kw:
    AsyncEngine's other keywords (core_target: tests inject faults into the core through it)."""
    engine = AsyncEngine(
        engine_config, adapters, max_waiting=max_waiting, stall_timeout=server_config.engine_stall_timeout, **engine_kw
    )
    return build_app(engine, server_config)


# What uvicorn still waits for connections after the engine's drain has ended every request (their last bytes).
_GRACE_AFTER_DRAIN = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn, with the engine drained when shutdown begins: running requests get the app's shutdown_timeout to
    finish, then every open stream ends with an error event and [DONE] and every waiting client gets a 503, before
    uvicorn's own graceful timeout (which would cut them mid-body) can run out."""

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        engine = getattr(app.state, "async_engine", None)
        drained = None
        if engine is not None:
            drained = asyncio.create_task(engine.drain(app.state.shutdown_timeout))
        await super().shutdown(sockets)
        if drained is not None:
            await drained


def server_config(app, log_level: str = "info", **kwargs) -> uvicorn.Config:
    timeout = getattr(app.state, "shutdown_timeout", 30.0) + _GRACE_AFTER_DRAIN
    return uvicorn.Config(app, log_level=log_level.lower(), timeout_graceful_shutdown=timeout, **kwargs)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    GracefulServer(server_config(app, log_level, host=host, port=port)).run()


class BackgroundServer:
    """The app on a free loopback port in a background thread (tests, benchmarks, the demo)."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.server = GracefulServer(server_config(app, "warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

"""One engine replica of the Ray Serve deployment: an AsyncEngine and the moeserve app, adapters multiplexed.

Each replica runs the same FastAPI app `moeserve serve` runs (through call_asgi), so its answers are the one-process
server's. Which adapters it has registered is Ray Serve's model multiplexing: `resident_adapter` is the
`@serve.multiplexed` loader, its per-replica LRU holds as many adapters as the engine has device slots
(--max-adapters), and Serve's router sends each request to a replica whose LRU holds its adapter. An adapter Serve
evicts is unregistered from the engine once the requests using it on this replica have finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from moeserve.adapters import AdapterError
from moeserve.deploy.asgi_call import HTTPRequest, ResponseStart, call_asgi
from moeserve.deploy.replica_metrics import REPORT_INTERVAL_S
from moeserve.engine.config import EngineConfig
from moeserve.server.app import ServerConfig, build_app
from moeserve.server.async_engine import AsyncEngine, EngineDeadError
from moeserve.server.errors import error_response

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-moeserve-replica"  # on every response: the Serve replica id that produced it
INGRESS_NAME = "OpenAIIngress"  # the front deployment's name, which the replicas report their metrics to


class ResidentAdapter:
    """An adapter registered in this replica's engine, as long as Serve's LRU holds it or a request uses it."""

    def __init__(self, engine: AsyncEngine, resident: dict[str, ResidentAdapter], name: str, path: Path) -> None:
        self.engine = engine
        self.resident = resident  # the replica's name -> ResidentAdapter
        self.name = name
        self.path = path
        self.in_use = 0  # requests on this replica running with it
        self.revive()

    def revive(self) -> None:
        """Held by Serve's LRU (again): Serve calls `model.__del__` on eviction, awaited when it is a coroutine
        function, and replaces it with a no-op after; an instance attribute, so the garbage collector never calls it."""
        self.evicted = False
        self.__del__ = self._on_evicted

    async def _on_evicted(self) -> None:
        self.evicted = True
        await self._drop_if_idle()

    async def reload(self, path: Path) -> None:
        """The name was unloaded and loaded again from another directory: serve the new one from now on."""
        await self.engine.unregister_adapter(self.name)  # requests running with the old weights finish on them
        await self.engine.register_adapter(self.name, path)
        self.path = path

    def acquire(self) -> None:
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        if self.evicted and self.in_use == 0:
            asyncio.ensure_future(self._drop_if_idle())

    async def _drop_if_idle(self) -> None:
        if self.evicted and self.in_use == 0 and self.resident.get(self.name) is self:
            del self.resident[self.name]
            try:
                await self.engine.unregister_adapter(self.name)
            except EngineDeadError as exc:  # the core is restarting, and comes back with it registered
                logger.warning("adapter %s evicted, but not unregistered: %s", self.name, exc)
                return
            logger.info("adapter %s unregistered (evicted from this replica)", self.name)


def engine_replica_class(max_resident: int) -> type:
    """The replica class, its multiplexed LRU sized `max_resident` (the engine's adapter slots)."""

    class EngineReplica:
        async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, max_waiting: int | None):
            # Adapters come later, one by one, as requests for them arrive (resident_adapter).
            self.engine = AsyncEngine(
                engine_config, None, max_waiting=max_waiting, stall_timeout=server_config.engine_stall_timeout
            )
            self.app = build_app(self.engine, server_config)
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()
            self.resident: dict[str, ResidentAdapter] = {}
            self.paths: dict[str, Path] = {}  # adapter name -> directory, as the front last said
            context = serve.get_replica_context()
            self.replica_id = context.replica_id.to_full_id_str()
            self._reporter = asyncio.ensure_future(self._report_metrics(context.app_name))

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def resident_adapter(self, name: str) -> ResidentAdapter:
            held = self.resident.get(name)
            if held is not None:  # evicted, still finishing requests, and wanted again: keep it
                held.revive()
                return held
            if not self.engine.is_registered(name):
                await self.engine.register_adapter(name, self.paths[name])
            # else: left registered by an eviction that found the core restarting; handle_request reloads it if
            # its directory is not the one asked for now.
            path = self.engine.adapters[name]
            held = self.resident[name] = ResidentAdapter(self.engine, self.resident, name, path)
            return held

        async def load_adapter(self, path: str) -> str | None:
            """Makes the multiplexed adapter resident here; the reason it cannot be, or None."""
            self.paths[serve.get_multiplexed_model_id()] = Path(path)
            try:
                await self.resident_adapter(serve.get_multiplexed_model_id())
            except AdapterError as exc:
                return str(exc)
            return None

        async def handle_request(
            self, request: HTTPRequest, adapter_path: str | None = None
        ) -> AsyncIterator[ResponseStart | bytes]:
            """The response of the moeserve app to `request`, piece by piece, with the request's adapter resident."""
            app, held = self.app, None
            name = serve.get_multiplexed_model_id()
            if name:
                self.paths[name] = Path(adapter_path)
                try:
                    held = await self.resident_adapter(name)
                    if held.path != self.paths[name]:
                        await held.reload(self.paths[name])
                except AdapterError as exc:
                    app = error_response(400, f"adapter {name!r} cannot be loaded: {exc}", "model")
                else:
                    held.acquire()
            try:
                async for item in call_asgi(app, request):
                    if isinstance(item, ResponseStart):
                        item.headers.append((REPLICA_HEADER, self.replica_id.encode()))
                    yield item
            finally:
                if held is not None:
                    held.release()

        async def _report_metrics(self, app_name: str) -> None:
            """Pushes this replica's /metrics (the moeserve app's own) to the ingress, which merges all replicas'."""
            ingress = serve.get_deployment_handle(INGRESS_NAME, app_name)
            request = HTTPRequest("GET", "/metrics")
            while True:
                try:
                    text = b"".join([p async for p in call_asgi(self.app, request) if isinstance(p, bytes)])
                    await ingress.report_metrics.remote(self.replica_id, text.decode())
                except Exception as exc:  # the ingress restarting, the engine core restarting: try again later
                    logger.debug("metrics report failed: %s", exc)
                await asyncio.sleep(REPORT_INTERVAL_S)

        async def check_health(self) -> None:
            if self.engine.error is not None:
                raise RuntimeError(self.engine.error)

        async def __del__(self) -> None:
            self._reporter.cancel()
            self.resident.clear()  # Serve unloads its multiplexed adapters after this: nothing left to unregister
            await self._lifespan.__aexit__(None, None, None)

    return EngineReplica

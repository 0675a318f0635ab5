"""Many engine replicas behind Ray Serve's HTTP proxy, with the OpenAI routes of `moeserve serve`.

    moeserve serve --replicas 4 --model DIR --adapter a=DIR ...

Layout: Serve's proxy -> OpenAIIngress (one replica; it reads each request's `model`) -> EngineReplica x N (each an
AsyncEngine with its own engine core and the moeserve app), requests routed by adapter through Serve's model
multiplexing. Every node of the Ray cluster must see the model and adapter directories at the same paths.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from moeserve.adapters import AdapterConfig
from moeserve.deploy.ray_config import RayServeConfig
from moeserve.engine.config import EngineConfig
from moeserve.server.app import ServerConfig

logger = logging.getLogger(__name__)


def build_ray_app(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    adapters: dict[str, Path] | None,
    config: RayServeConfig,
    max_waiting: int | None = None,
):
    """The Serve application (not yet running): the ingress bound to N engine replicas."""
    from ray import serve

    from moeserve.deploy.ray_ingress import OpenAIIngress
    from moeserve.deploy.ray_replica import INGRESS_NAME, engine_replica_class

    for name, path in (adapters or {}).items():
        AdapterConfig.load(path)  # a missing or malformed adapter fails at start, as with one process
        if name == server_config.served_model_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
    gpus = config.replica_gpus or (1.0 if engine_config.device.startswith("cuda") else 0.0)
    engine = serve.deployment(
        engine_replica_class(engine_config.adapters.max_slots),
        name="EngineReplica",
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": gpus},
    ).bind(engine_config, server_config, max_waiting)
    ingress = serve.deployment(
        OpenAIIngress,
        name=INGRESS_NAME,
        num_replicas=1,  # it holds the adapter registry
        max_ongoing_requests=100_000,  # admission is the replicas' business (--max-waiting)
        ray_actor_options={"num_cpus": config.ingress_cpus},
        logging_config={"enable_access_log": False},  # the replicas report metrics every second; the proxy logs HTTP
    ).bind(engine, server_config, {name: str(path) for name, path in (adapters or {}).items()}, config)
    return ingress


def run_ray_app(app, config: RayServeConfig, host: str, port: int) -> str:
    """Starts Ray (or joins config.ray_address), Serve's proxy on host:port and the app; returns the base URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=config.ray_address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=config.app_name, route_prefix="/")
    return f"http://{host}:{port}"


def serve_replicas(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    adapters: dict[str, Path] | None,
    config: RayServeConfig,
    host: str,
    port: int,
    max_waiting: int | None = None,
) -> None:
    """`moeserve serve --replicas N`: runs until interrupted, then takes the application down."""
    import ray
    from ray import serve

    app = build_ray_app(engine_config, server_config, adapters, config, max_waiting)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `docker stop`, a pod's termination
    try:
        url = run_ray_app(app, config, host, port)
        logger.info("serving %d engine replicas at %s (Ctrl-C stops)", config.num_replicas, url)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("stopping the replicas")
        serve.shutdown()
        ray.shutdown()

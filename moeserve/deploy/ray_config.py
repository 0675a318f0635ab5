"""How the Ray Serve deployment is laid out: replicas, their resources, retries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RayServeConfig:
    num_replicas: int = 2  # engine replicas, each with its own engine core (one model copy each)
    replica_cpus: float = 1.0  # Ray CPUs reserved per engine replica
    replica_gpus: float = 0.0  # Ray GPUs per engine replica (1 with --device cuda)
    ingress_cpus: float = 0.0  # Ray CPUs reserved for the front deployment (it only forwards bytes)
    max_ongoing_requests: int = 256  # per engine replica before Serve queues requests at the router
    max_attempts: int = 3  # tries per request when a replica dies before the response has started
    retry_backoff_s: float = 0.2  # wait before the first retry, doubled after each
    app_name: str = "moeserve"
    ray_address: str | None = None  # an existing cluster ("auto", "ray://..."); None: start one in this process

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or self.ingress_cpus < 0:
            raise ValueError("replica and ingress resources cannot be negative")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

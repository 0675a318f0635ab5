"""Prometheus metrics, under vLLM's names where vLLM has one, so dashboards and adapter-aware gateways work as is."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeserve.engine.core_messages import SchedulerStats
from moeserve.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()  # one per server, so several servers can live in one process (tests)
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r)
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", labels, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason.", [*labels, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time from arrival to first scheduling.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting adapters (labels); value: last update time.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        self.adapters_resident = Gauge(
            "moeserve:adapter_slots_resident", "Adapters resident in device slots.", labels, registry=r
        )
        self.adapter_slots = Gauge("moeserve:adapter_slots_total", "Device adapter slots.", labels, registry=r)
        self.adapter_loads = Counter("moeserve:adapter_loads", "Adapter loads into device slots.", labels, registry=r)
        self.adapter_evictions = Counter(
            "moeserve:adapter_evictions", "Adapters evicted from device slots.", labels, registry=r
        )
        self.cache_config_info = Gauge(
            "vllm:cache_config_info",
            "Information of the KV-cache configuration (labels); value: 1.",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels, registry=r
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels, registry=r
        )
        self.num_preemptions = Counter(
            "vllm:num_preemptions", "Sequences preempted (KV blocks freed, to be recomputed).", labels, registry=r
        )
        self._seen = {"queries": 0, "hits": 0, "preemptions": 0}
        self.adapter_requests = Counter(
            "moeserve:adapter_requests",
            "Finished requests, by the adapter they ran with (the base model's name for none).",
            [*labels, "adapter"],
            registry=r,
        )
        self.adapter_generation_tokens = Counter(
            "moeserve:adapter_generation_tokens", "Tokens generated, by adapter.", [*labels, "adapter"], registry=r
        )
        self._last_token_time: dict[str, float] = {}
        self._lora_labels: tuple[str, str, str] | None = None
        self._seen_loads = self._seen_evictions = 0
        self._lock = threading.Lock()  # several servers' threads may share the process (tests)

    def set_cache_config(self, block_size: int, num_blocks: int, enable_prefix_caching: bool) -> None:
        self.cache_config_info.labels(str(block_size), str(num_blocks), str(enable_prefix_caching)).set(1)

    def observe_step(self, outputs: list[RequestOutput], stats: SchedulerStats) -> None:
        """Called after each engine step with its outputs and the core's stats (by /metrics with no outputs)."""
        with self._lock:
            self._observe(outputs, stats)

    def observe_abort(self, request_id: str) -> None:
        """A request the front end ended early (its client went away, the server shut down): counted under
        finished_reason="abort", as vLLM counts them."""
        with self._lock:
            self._last_token_time.pop(request_id, None)
            self.request_success.labels(self.model_name, "abort").inc()

    def _observe(self, outputs: list[RequestOutput], stats: SchedulerStats) -> None:
        now, m = time.monotonic(), self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_cache_usage)
        # Token counts summed per step (one increment per adapter, not per request: .labels() takes a lock).
        tokens: dict[str, int] = {}
        itl = self.itl.labels(m)
        for out in outputs:
            if out.error is not None:
                continue
            rid, adapter = out.request_id, out.adapter or m
            tokens[adapter] = tokens.get(adapter, 0) + len(out.new_token_ids)
            last = self._last_token_time.get(rid)
            arrival = out.metrics.arrival_time if out.metrics else now
            if last is None:
                self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                self.ttft.labels(m).observe(now - arrival)
                if out.metrics and out.metrics.first_scheduled_time is not None:
                    self.queue_time.labels(m).observe(out.metrics.first_scheduled_time - arrival)
            else:
                itl.observe(now - last)
            self._last_token_time[rid] = now
            if out.finished:
                self._last_token_time.pop(rid, None)
                self.request_success.labels(m, out.outputs[0].finish_reason or "unknown").inc()
                self.adapter_requests.labels(m, adapter).inc()
                self.e2e.labels(m).observe(now - arrival)
        if tokens:
            self.generation_tokens.labels(m).inc(sum(tokens.values()))
        for adapter, count in tokens.items():
            self.adapter_generation_tokens.labels(m, adapter).inc(count)
        self._observe_adapters(stats)
        self._observe_counts(stats)

    def _observe_counts(self, stats: SchedulerStats) -> None:
        """The core's cumulative counts as counter increments (a restarted core counts from 0 again)."""
        m = self.model_name
        for key, counter, value in (
            ("queries", self.prefix_cache_queries, stats.prefix_cache_queries),
            ("hits", self.prefix_cache_hits, stats.prefix_cache_hits),
            ("preemptions", self.num_preemptions, stats.num_preemptions),
        ):
            counter.labels(m).inc(value - self._seen[key] if value >= self._seen[key] else value)
            self._seen[key] = value

    def _observe_adapters(self, stats: SchedulerStats) -> None:
        m = self.model_name
        labels = (str(stats.max_adapter_slots), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())
        self.adapter_slots.labels(m).set(stats.max_adapter_slots)
        self.adapters_resident.labels(m).set(stats.resident_adapters)
        # Cumulative in the core; a restarted core counts from 0 again.
        self.adapter_loads.labels(m).inc(max(0, stats.adapter_loads - self._seen_loads))
        self.adapter_evictions.labels(m).inc(max(0, stats.adapter_evictions - self._seen_evictions))
        self._seen_loads, self._seen_evictions = stats.adapter_loads, stats.adapter_evictions

"""Every engine replica's /metrics in one exposition, each sample labelled with the replica it came from.

The replicas push their own /metrics text to the ingress every REPORT_INTERVAL_S seconds (Serve routes a request to
one replica of its choosing, so the ingress could not ask each one); the ingress serves the merge at GET /metrics,
so one Prometheus scrape target covers the deployment and the dashboards and sizing rules read per-replica values.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 10 * REPORT_INTERVAL_S  # a replica silent this long is gone (killed, replaced, scaled down)


class ReplicaMetrics:
    """The latest /metrics text of each live replica."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, str]] = {}  # replica id -> (monotonic time received, text)

    def report(self, replica: str, text: str) -> None:
        self._reports[replica] = (time.monotonic(), text)

    def live(self) -> dict[str, str]:
        now = time.monotonic()
        for replica in [r for r, (t, _) in self._reports.items() if now - t > STALE_AFTER_S]:
            del self._reports[replica]
        return {replica: text for replica, (_, text) in self._reports.items()}

    def exposition(self, extra: CollectorRegistry | None = None) -> bytes:
        """The merged text (Prometheus format), followed by `extra`'s metrics (the ingress's own)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self.live()))
        return generate_latest(registry) + (generate_latest(extra) if extra is not None else b"")


class _Merged:
    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                if family.name.endswith("_created"):  # creation timestamps, which the parser splits out
                    continue
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
        return list(families.values())

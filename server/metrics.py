"""Prometheus metrics for the server (prometheus-client, private registry).

Request-side numbers (queried and hit tokens, TTFT, restore time, requests
by status) are counted by the server; tier totals (entries, bytes,
promotions, demotions, evictions, writer queue, dropped writes) are read
from ``TieredPromptCache.stats()`` at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TIER_COUNTERS = {
    "hits": "Prefix-cache hits served by the tier",
    "promotions": "Entries promoted into the tier",
    "demotions": "Entries demoted out of the tier",
    "evictions": "Entries evicted from the tier",
    "dropped_writes": "Disk writes dropped because the writer queue was full",
    "corrupt_records": "Damaged disk records found (and skipped) on restore",
    "writer_errors": "Disk writes that failed with an error",
    "written": "Snapshots written to disk",
}
_TIER_GAUGES = {
    "entries": "Entries held by the tier",
    "bytes": "Bytes held by the tier",
    "writer_queue_bytes": "Bytes waiting in the disk writer queue",
}


class _CacheCollector:
    """Reads the cache's ``stats()`` on every scrape."""

    def __init__(self, get_stats: Callable[[], dict | None]):
        self._get_stats = get_stats

    def collect(self):
        try:
            stats = self._get_stats() or {}
        except Exception as exc:  # a scrape must never fail
            logger.debug("cache stats unavailable: %s", exc)
            stats = {}
        counters = {
            k: CounterMetricFamily(f"tiercache_cache_{k}", doc, labels=["tier"])
            for k, doc in _TIER_COUNTERS.items()
        }
        gauges = {
            k: GaugeMetricFamily(f"tiercache_cache_{k}", doc, labels=["tier"])
            for k, doc in _TIER_GAUGES.items()
        }
        writer = stats.get("writer") if isinstance(stats.get("writer"), dict) else {}
        for tier in ("memory", "disk"):
            tier_stats = stats.get(tier)
            if tier == "disk" and isinstance(tier_stats, dict) and writer:
                tier_stats = dict(tier_stats)
                tier_stats.setdefault("writer_queue_bytes", writer.get("queue_bytes"))
                tier_stats.setdefault("dropped_writes", writer.get("dropped_writes"))
                tier_stats.setdefault("writer_errors", writer.get("errors"))
                tier_stats.setdefault("written", writer.get("written"))
            if not isinstance(tier_stats, dict):
                continue
            for key, fam in counters.items():
                if isinstance(tier_stats.get(key), (int, float)):
                    fam.add_metric([tier], float(tier_stats[key]))
            for key, fam in gauges.items():
                if isinstance(tier_stats.get(key), (int, float)):
                    fam.add_metric([tier], float(tier_stats[key]))
        yield from counters.values()
        yield from gauges.values()


class Metrics:
    """All server metrics in one private registry.

    Args:
        get_stats: Returns the cache's ``stats()`` dict (or ``None`` while
            the model loads).
    """

    def __init__(self, get_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.query_tokens = Counter(
            "tiercache_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.hit_tokens = Counter(
            "tiercache_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache, by tier",
            ["tier"],
            registry=r,
        )
        for tier in ("memory", "disk"):
            self.hit_tokens.labels(tier=tier)
        self.requests = Counter(
            "tiercache_requests",
            "HTTP responses by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "tiercache_ttft_seconds",
            "Time from request arrival to the first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.restore = Histogram(
            "tiercache_restore_seconds",
            "Time spent fetching the nearest cached prefix (memory or disk)",
            ["tier"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.prefill = Histogram(
            "tiercache_prefill_seconds",
            "Prefill time of uncached prompt tokens",
            registry=r,
        )
        self.generated_tokens = Counter(
            "tiercache_generated_tokens", "Completion tokens generated", registry=r
        )
        self.queue_depth = Gauge(
            "tiercache_queue_depth", "Requests waiting for the generation worker", registry=r
        )
        self.running = Gauge(
            "tiercache_running_requests",
            "Requests in the running batch (being prefilled or decoded)",
            registry=r,
        )
        self.batch_size = Histogram(
            "tiercache_batch_size",
            "Requests decoded together, per decode step",
            buckets=(1, 2, 3, 4, 8, 16, 32, 64),
            registry=r,
        )
        r.register(_CacheCollector(get_stats))

    def observe_fetch(self, queried: int, memory: int, disk: int, seconds: float) -> None:
        """Record one prefix lookup.

        Args:
            queried: Prompt tokens looked up.
            memory: Tokens served from memory.
            disk: Tokens served from disk.
            seconds: Time the lookup (and restore) took.
        """
        self.query_tokens.inc(queried)
        if memory:
            self.hit_tokens.labels(tier="memory").inc(memory)
        if disk:
            self.hit_tokens.labels(tier="disk").inc(disk)
        tier = "disk" if disk else ("memory" if memory else "miss")
        self.restore.labels(tier=tier).observe(seconds)

    def render(self) -> bytes:
        """Return the registry in Prometheus text format."""
        return generate_latest(self.registry)

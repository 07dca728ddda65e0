"""Prometheus metrics for the server (prometheus-client, private registry).

Request-side numbers (queried and hit tokens, TTFT, restore time, requests
by status) are counted by the server; tier totals (entries, bytes,
promotions, demotions, evictions, writer queue, dropped writes) are read
from ``TieredPromptCache.stats()`` at scrape time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
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
RECENT_REQUESTS = 200

_TIER_COUNTERS = {
    "hits": "Prefix-cache hits served by the tier",
    "promotions": "Entries promoted into the tier",
    "demotions": "Entries demoted out of the tier",
    "evictions": "Entries evicted from the tier",
    "dropped_writes": "Disk writes dropped because the writer queue was full",
    "corrupt_records": "Damaged disk records found (and skipped) on restore",
    "writer_errors": "Disk writes that failed with an error",
    "written": "Snapshots written to disk",
    "hit_tokens": "Prompt tokens served by the tier",
    "bytes_written": "Bytes of block and checkpoint files written to the disk tier",
}
_REMOTE_COUNTERS = {
    "lookups": "Remote-tier lookups",
    "hits": "Remote-tier lookups that restored a prefix",
    "hit_tokens": "Prompt tokens restored from the remote tier",
    "misses": "Remote-tier lookups without a usable prefix",
    "rejected": "Remote records that failed verification (tokens, id, checksum): never served",
    "errors": "Remote calls that failed (connection, timeout)",
    "timeouts": "Remote calls that timed out",
    "bytes_in": "Bytes read from the remote tier",
    "bytes_out": "Bytes written to the remote tier",
    "pushed_records": "Records pushed to the remote tier",
    "dropped_pushes": "Records not pushed (queue full or remote unavailable)",
    "lookup_seconds": "Seconds spent in remote lookups (divide by lookups for the mean)",
    "breaker_opened": "Times the remote circuit breaker opened",
}
_BREAKER_STATES = ("closed", "open", "half_open")

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
        for tier in ("memory", "pending", "disk"):
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
        remote = stats.get("remote")
        if isinstance(remote, dict):
            yield from _remote_families(remote)


def _remote_families(remote: dict):
    """The remote tier's counters, push queue and breaker state."""
    for key, doc in _REMOTE_COUNTERS.items():
        if isinstance(remote.get(key), (int, float)):
            fam = CounterMetricFamily(f"tiercache_remote_{key}", doc)
            fam.add_metric([], float(remote[key]))
            yield fam
    queue = GaugeMetricFamily("tiercache_remote_push_queue_bytes",
                              "Bytes waiting to be pushed to the remote tier")
    queue.add_metric([], float(remote.get("push_queue_bytes") or 0))
    yield queue
    state = GaugeMetricFamily("tiercache_remote_breaker_state",
                              "Remote circuit breaker: 1 for the current state", labels=["state"])
    for name in _BREAKER_STATES:
        state.add_metric([name], 1.0 if remote.get("breaker") == name else 0.0)
    yield state


class RecentRequests:
    """A thread-safe bounded ring of per-request summaries.

    Args:
        size: How many requests to keep.
    """

    def __init__(self, size: int = RECENT_REQUESTS):
        self._ring: collections.deque[dict] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = 0

    def add(self, record: dict) -> None:
        """Append one request summary (the oldest falls out when full)."""
        with self._lock:
            self._seq += 1
            self._ring.append({"seq": self._seq, "time": time.time(), **record})

    def latest(self, limit: int) -> list[dict]:
        """Return up to ``limit`` summaries, newest first."""
        with self._lock:
            items = list(self._ring)
        return items[::-1][:limit]


def request_summary(api: str, usage: dict, ttft: float | None, prefill_s: float,
                    decode_tps: float, finish: str) -> dict:
    """Return the ring entry for one finished request.

    Args:
        api: Which client API served it, e.g. ``openai.chat``.
        usage: The request's OpenAI-style usage (``prompt_tokens_details``
            holds the tokens by tier).
        ttft: Seconds from arrival to the first token, if any was made.
        prefill_s: Seconds spent on lookup and prefill.
        decode_tps: Decode tokens per second.
        finish: Finish reason.
    """
    details = usage.get("prompt_tokens_details") or {}
    by_tier = {k[: -len("_tokens")]: int(v) for k, v in details.items()
               if k.endswith("_tokens") and k != "cached_tokens" and isinstance(v, int)}
    return {
        "api": api,
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "cached_tokens": int(details.get("cached_tokens", 0)),
        "cached_by_tier": by_tier,
        "completion_tokens": int(usage.get("completion_tokens", 0)),
        "ttft_s": None if ttft is None else round(ttft, 4),
        "prefill_s": round(prefill_s, 4),
        "decode_tps": round(decode_tps, 2),
        "finish": finish,
    }


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
        for tier in ("memory", "pending", "disk", "remote"):
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
        self.recent = RecentRequests()

    def observe_fetch(self, queried: int, memory: int, disk: int, seconds: float,
                      remote: int = 0, pending: int = 0) -> None:
        """Record one prefix lookup.

        Args:
            queried: Prompt tokens looked up.
            memory: Tokens served from memory.
            disk: Tokens served from disk.
            seconds: Time the lookup (and restore) took.
            remote: Tokens restored from the remote tier.
            pending: Tokens copied from a snapshot the disk writer had not
                committed yet (the pending tier).
        """
        self.query_tokens.inc(queried)
        if memory:
            self.hit_tokens.labels(tier="memory").inc(memory)
        if pending:
            self.hit_tokens.labels(tier="pending").inc(pending)
        if disk:
            self.hit_tokens.labels(tier="disk").inc(disk)
        if remote:
            self.hit_tokens.labels(tier="remote").inc(remote)
        tier = ("remote" if remote else "disk" if disk else "pending" if pending
                else "memory" if memory else "miss")
        self.restore.labels(tier=tier).observe(seconds)

    def render(self) -> bytes:
        """Return the registry in Prometheus text format."""
        return generate_latest(self.registry)

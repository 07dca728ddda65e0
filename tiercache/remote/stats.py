"""What a remote tier holds, per namespace (``tiercache stats --remote-url``)."""

from __future__ import annotations

import redis

from ..store.index import KIND_NAMES
from .client import RemoteClient, redacted
from .codec import MAGIC, RECORD_VERSION, namespace_pattern, parse_key


class RemoteStatsError(Exception):
    """The remote server can't be read (down, wrong password, not Redis)."""


def remote_stats(url: str, namespace: bytes | None = None, timeout_ms: float = 5000.0) -> dict:
    """Counts and bytes of the records a Redis/Valkey server holds, by namespace.

    Walks the keys with ``SCAN`` (never ``KEYS``: the server keeps serving) and
    reads each value's length and first header bytes in pipelined batches.

    Args:
        url: the remote URL.
        namespace: only this namespace.
        timeout_ms: socket timeout.

    Returns:
        ``{"url", "namespaces": [{namespace, records, blocks, tails, checkpoints,
        foreign, bytes}], "total": {...}}``; ``foreign`` counts values under our
        key prefix that are not records of this version.

    Raises:
        RemoteStatsError: the server can't be reached or read.
    """
    client = RemoteClient(url, timeout_ms=timeout_ms, write_timeout_ms=timeout_ms)
    by_ns: dict[str, dict] = {}
    try:
        for key, length, head in client.scan(namespace_pattern(namespace)):
            parsed = parse_key(key)
            if parsed is None:
                continue
            e = by_ns.setdefault(parsed[0], {
                "namespace": parsed[0], "records": 0, "blocks": 0, "tails": 0,
                "checkpoints": 0, "foreign": 0, "bytes": 0,
            })
            e["records"] += 1
            e["bytes"] += length
            if len(head) == 6 and head[:4] == MAGIC and head[4] == RECORD_VERSION and head[5] in KIND_NAMES:
                e[KIND_NAMES[head[5]] + "s"] += 1
            else:
                e["foreign"] += 1
    except (redis.RedisError, OSError) as e:
        raise RemoteStatsError(f"cannot read {redacted(url)}: {e}") from None
    finally:
        client.close()
    rows = sorted(by_ns.values(), key=lambda e: -e["bytes"])
    total = {k: sum(e[k] for e in rows) for k in ("records", "blocks", "tails", "checkpoints", "foreign", "bytes")}
    return {"url": redacted(url), "namespaces": rows, "total": dict(total, namespace="TOTAL")}

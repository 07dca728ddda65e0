"""The pending tier: snapshots the background writer holds but has not committed.

With a memory budget smaller than one snapshot (a 100K-token prompt on a big
model is 15 GB), a snapshot is not kept in memory: it only exists as the writer's
host buffers until its blocks are on disk. Without this tier the client's next
request, arriving while the writer still writes, would miss and prefill it all
again. Keeping the snapshot in memory over budget until it is committed would not
fit (15 GB in an 8 GB budget); the writer's buffers are already there, so a lookup
searches them like memory and copies the prefix it needs into new MLX buffers.

A pending snapshot is a hit with the disk tier's exact-prefix rules: a model whose
layers all split along the sequence axis reuses any common prefix, token by
token; a model with non-splittable layers (recurrent state, sliding windows)
reuses a pending snapshot only whole, when all its tokens are a prefix of the
query, as the disk tier only restores at checkpoint positions.

No race with the writer: a job stays pending until its save has committed (see
:meth:`tiercache.tiers.writer.BackgroundWriter.pending_jobs`), and the caller takes
the pending jobs *before* asking the disk, so a snapshot is always in one of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from ..store import layers as L
from .writer import BackgroundWriter, WriteJob


@dataclass
class PendingHit:
    """A usable prefix of a pending snapshot.

    Attributes:
        job: the writer's job holding the snapshot.
        n_tokens: leading query tokens it covers.
    """

    job: WriteJob
    n_tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes of KV a restore copies (the snapshot's bytes, pro rata)."""
        return self.job.nbytes * self.n_tokens // max(1, len(self.job.tokens))


def common_prefix(a: tuple, b: tuple) -> int:
    """Return the length of the common prefix of two token tuples."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def usable_tokens(job: WriteJob, tokens: tuple, limit: int) -> int:
    """Return how many leading ``tokens`` (at most ``limit``) a pending snapshot restores."""
    if L.all_splittable([h.desc for h in job.snapshot]):
        return min(common_prefix(job.tokens, tokens), limit)
    n = len(job.tokens)
    return n if n <= limit and tokens[:n] == job.tokens else 0


class PendingTier:
    """Lookups over a :class:`BackgroundWriter`'s uncommitted snapshots.

    Args:
        writer: the disk tier's writer.
    """

    def __init__(self, writer: BackgroundWriter):
        self.writer = writer
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "hit_tokens": 0}

    def find(
        self, namespaces: Sequence[bytes], salt: bytes, tokens: tuple, limit: int
    ) -> PendingHit | None:
        """Return the pending snapshot covering the most leading ``tokens``, or None.

        Args:
            namespaces: the namespaces the query may use.
            salt: the query's tenant salt (bytes; empty for none).
            tokens: the query.
            limit: cover at most this many tokens.
        """
        best: PendingHit | None = None
        for job in self.writer.pending_jobs():  # newest first: ties go to the newest
            if job.namespace not in namespaces or (job.salt or b"") != salt:
                continue
            n = usable_tokens(job, tokens, limit)
            if n > 0 and (best is None or n > best.n_tokens):
                best = PendingHit(job, n)
        return best

    def restore(self, hit: PendingHit) -> list:
        """Return new mlx-lm cache objects holding the hit's tokens (MLX thread only)."""
        cache = L.from_host(hit.job.snapshot, hit.n_tokens)
        with self._lock:
            self.counters["hits"] += 1
            self.counters["hit_tokens"] += hit.n_tokens
        return cache

    def stats(self) -> dict:
        """Return entries, bytes, hits and hit tokens of the pending tier."""
        jobs = self.writer.pending_jobs()
        with self._lock:
            counters = dict(self.counters)
        return {"entries": len(jobs), "bytes": sum(j.nbytes for j in jobs), **counters}

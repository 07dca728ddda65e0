"""The shared remote tier: chain lookups and background pushes over Redis/Valkey.

Lookup (on the caller's thread, bounded by the lookup timeout): the chain hashes
of the prompt are computed locally, every block key is read in one ``MGET``, and
the longest prefix whose records all verify (see :mod:`tiercache.remote.codec`) is
the hit; a missing or rejected block ends it. Blocks the local disk already has
are not fetched again: the restore reads those from disk and the rest from the
fetched bytes. A trimmable chain may end in a tail, a non-trimmable one must end
in a checkpoint: both are found by one more round trip that asks for the longest
candidate id that exists.

Push (on the pusher thread): after the disk writer commits new records, their
files are read back, checksummed, and written with one pipelined ``SET ... EX``
per batch. The queue is bounded; the oldest jobs are dropped (and counted) beyond
it, and while the breaker is open pushes are dropped rather than queued.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import xxhash

from ..store import layers as L
from ..store.blockfile import HashingReader
from ..store.hashing import chain_root, pack_tokens, packed_block_hashes, packed_checkpoint_id
from ..store.index import KIND_BLOCK, KIND_CHECKPOINT, KIND_TAIL, Record
from ..store.lookup import RestorePlan
from ..store.restore import read_plan
from .client import CircuitBreaker, RemoteClient, redacted
from .codec import RemoteRecord, RemoteRecordError, decode_verified, encode, record_key

log = logging.getLogger("tiercache.remote")

DEFAULT_TTL = 7 * 24 * 3600
DEFAULT_TIMEOUT_MS = 50.0


@dataclass
class RemoteHit:
    """A verified remote prefix, ready to restore.

    Attributes:
        plan: records in chain order (local ones first, then fetched ones).
        fetched: record id -> verified remote record (what came over the network).
    """

    plan: RestorePlan
    fetched: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.plan.n_tokens

    def remote_items(self) -> list[tuple[Record, bytes]]:
        """``(record, file bytes)`` of the fetched records, in chain order."""
        return [(r, self.fetched[r.id].payload) for r in self.plan.records if r.id in self.fetched]


@dataclass(eq=False)
class _PushJob:
    namespace: bytes
    records: list
    nbytes: int


class RemoteTier:
    """One Redis/Valkey server shared by many tiercache processes.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        block_size: the local store's block size (part of every namespace).
        ttl: seconds each key lives (0 or None: no expiry; Redis' own eviction,
            ``maxmemory-policy allkeys-lru``, then decides).
        timeout_ms: lookup socket/connect timeout.
        push_queue_bytes: bound on records waiting to be pushed.
        checkpoint_probe_blocks: how many block boundaries back a non-trimmable
            lookup looks for a checkpoint.
        breaker: the circuit breaker (default: opens after 3 failures, 1 s
            cooldown doubling to 30 s).
    """

    def __init__(
        self,
        url: str,
        *,
        block_size: int,
        ttl: int | None = DEFAULT_TTL,
        timeout_ms: float = DEFAULT_TIMEOUT_MS,
        push_queue_bytes: int = 256 << 20,
        checkpoint_probe_blocks: int = 8,
        breaker: CircuitBreaker | None = None,
    ):
        if timeout_ms <= 0:
            raise ValueError("remote timeout must be > 0 ms")
        if ttl is not None and ttl < 0:
            raise ValueError("remote TTL must be >= 0 seconds")
        self.client = RemoteClient(url, timeout_ms=timeout_ms, breaker=breaker)
        self.block_size = block_size
        self.ttl = ttl or None
        self.timeout_ms = timeout_ms
        self.checkpoint_probe_blocks = checkpoint_probe_blocks
        self.push_queue_bytes = push_queue_bytes
        self.counters = {
            "lookups": 0, "hits": 0, "hit_tokens": 0, "misses": 0, "rejected": 0,
            "lookup_seconds": 0.0, "restore_seconds": 0.0, "restored_bytes": 0,
            "pushed_records": 0, "pushed_bytes": 0, "dropped_pushes": 0, "push_errors": 0,
        }
        self._lock = threading.Lock()
        self._queue: collections.deque[_PushJob] = collections.deque()
        self._queue_bytes = 0
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._read_file: Callable[[Record], Path] | None = None
        self._thread = threading.Thread(target=self._run, name="tiercache-remote-push", daemon=True)
        self._thread.start()

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] += v

    # --- lookup -------------------------------------------------------------------

    def lookup(
        self,
        ns: bytes,
        desc: list,
        tokens: Sequence[int],
        salt: bytes,
        limit: int,
        local_chain: Sequence[Record] = (),
    ) -> RemoteHit | None:
        """The longest verified prefix of ``tokens`` the remote (with the local chain) holds.

        Args:
            ns: namespace.
            desc: its cache layout.
            tokens: the prompt.
            salt: tenant salt (bytes).
            limit: restore at most this many tokens.
            local_chain: full blocks of this prompt the local disk verified
                (chain order); they are not fetched again.

        Returns:
            A hit with more tokens than ``local_chain`` covers, or None.
        """
        if not self.client.available():
            self._count(lookups=1, misses=1)
            return None
        t0 = time.perf_counter()
        try:
            hit = self._walk(ns, desc, tuple(tokens), salt, limit, list(local_chain))
        finally:
            self._count(lookups=1, lookup_seconds=time.perf_counter() - t0)
        if hit is None:
            self._count(misses=1)
        return hit

    def _walk(self, ns, desc, tokens, salt, limit, local) -> RemoteHit | None:
        B = self.block_size
        trimmable = L.all_splittable(desc)
        # A trimmable hit may use its last record partly, so look up to the end.
        packed = pack_tokens(tokens if trimmable else tokens[:limit])
        root = chain_root(ns, salt)
        hashes = packed_block_hashes(root, packed, B)
        k = len(local)
        if [r.id for r in local] != hashes[:k]:
            local, k = [], 0  # not this prompt's chain: fetch everything
        raws = self.client.mget([record_key(ns, h) for h in hashes[k:]])
        if raws is None:
            return None
        chain: list[Record] = list(local)
        fetched: dict[bytes, RemoteRecord] = {}
        parent = hashes[k - 1] if k else root
        for i, raw in enumerate(raws, start=k):
            if raw is None:
                break
            rr = self._verify(raw, ns, hashes[i], parent, packed[i * 4 * B:(i + 1) * 4 * B],
                              (i + 1) * B, (KIND_BLOCK,))
            if rr is None:
                break
            chain.append(rr.record)
            fetched[rr.record.id] = rr
            parent = hashes[i]
        plan = RestorePlan(ns, layer_desc=desc)
        if trimmable:
            self._end_trimmable(plan, chain, fetched, ns, root, packed, limit)
        else:
            self._end_checkpoint(plan, chain, fetched, ns, root, packed, limit)
        if plan.n_tokens <= k * B or not any(r.id in fetched for r in plan.records):
            return None
        return RemoteHit(plan, {r.id: fetched[r.id] for r in plan.records if r.id in fetched})

    def _verify(self, raw, ns, rid, parent, tokens, position, kinds) -> RemoteRecord | None:
        try:
            return decode_verified(raw, record_id=rid, namespace=ns, parent=parent,
                                   tokens=tokens, position=position, kinds=kinds)
        except RemoteRecordError as e:
            self._count(rejected=1)
            log.warning("rejected remote record %s: %s", rid.hex(), e)
            return None

    def _end_trimmable(self, plan, chain, fetched, ns, root, packed, limit) -> None:
        """Full blocks, then the longest stored tail that is a prefix of the rest."""
        B = self.block_size
        n_prompt = len(packed) // 4
        base = len(chain) * B
        last = None
        if base < min(limit, n_prompt):
            parent = chain[-1].id if chain else root
            lengths = range(min(B - 1, n_prompt - base), 0, -1)
            ids = [packed_checkpoint_id(parent, packed[base * 4:(base + n) * 4]) for n in lengths]
            got = self.client.first_existing([record_key(ns, i) for i in ids])
            if got is not None:
                j, raw = got
                n = lengths[j]
                rr = self._verify(raw, ns, ids[j], parent, packed[base * 4:(base + n) * 4],
                                  base + n, (KIND_TAIL,))
                if rr is not None:
                    last = rr.record
                    fetched[last.id] = rr
        end = last.position if last is not None else base
        n_tokens = min(end, limit)
        # Records past the limit aren't read at all.
        used = [r for r in chain if r.start < n_tokens]
        if last is not None and last.start < n_tokens:
            used.append(last)
        plan.chain, plan.last, plan.n_tokens = used, None, n_tokens

    def _end_checkpoint(self, plan, chain, fetched, ns, root, packed, limit) -> None:
        """Non-trimmable layers restore only at an exact checkpoint: the longest one
        within the last ``checkpoint_probe_blocks`` block boundaries of the chain."""
        B = self.block_size
        ids, where = [], []
        low = max(0, len(chain) - self.checkpoint_probe_blocks)
        for j in range(len(chain), low - 1, -1):
            parent = chain[j - 1].id if j else root
            base = j * B
            for end in range(min(base + B - 1, limit), max(base, 1) - 1, -1):
                ids.append(packed_checkpoint_id(parent, packed[base * 4:end * 4]))
                where.append((j, parent, base, end))
        got = self.client.first_existing([record_key(ns, i) for i in ids])
        if got is None:
            return
        idx, raw = got
        j, parent, base, end = where[idx]
        rr = self._verify(raw, ns, ids[idx], parent, packed[base * 4:end * 4], end,
                          (KIND_CHECKPOINT,))
        if rr is None:
            return
        fetched[rr.record.id] = rr
        plan.chain, plan.last, plan.n_tokens = chain[:j], rr.record, end

    def note_rejected(self, reason: str) -> None:
        """Counts a hit the caller could not use (its bytes did not build a cache)."""
        self._count(rejected=1)
        log.warning("remote hit not restored: %s", reason)

    def restore(self, hit: RemoteHit, file_path: Callable[[Record], Path],
                geometry: list | None = None) -> list | None:
        """Builds the cache from the fetched bytes (and local files for local records).

        Args:
            hit: What the chain walk found.
            file_path: Where a local record's file lives.
            geometry: The namespace's per-layer tensor geometry, when known: a
                fetched tensor that doesn't fit it fails the restore (a miss).

        Raises:
            RestoreError: a record fails its checksum or layout checks.
        """
        t0 = time.perf_counter()

        def open_record(rec: Record) -> HashingReader:
            rr = hit.fetched.get(rec.id)
            if rr is not None:
                return HashingReader.from_bytes(rr.payload, rec.nbytes)
            return HashingReader(file_path(rec), rec.nbytes)

        cache = read_plan(hit.plan, file_path, geometry, open_record=open_record)
        self._count(restore_seconds=time.perf_counter() - t0, hits=1, hit_tokens=hit.n_tokens,
                    restored_bytes=sum(rr.nbytes for rr in hit.fetched.values()))
        return cache

    # --- push ---------------------------------------------------------------------

    def push(self, ns: bytes, records: Sequence[Record], file_path: Callable[[Record], Path]) -> None:
        """Queues records the local disk just committed (never blocks)."""
        if not records:
            return
        self._read_file = file_path
        job = _PushJob(ns, list(records), sum(r.nbytes for r in records))
        with self._cond:
            if self._stop:
                return
            if not self.client.available() or job.nbytes > self.push_queue_bytes:
                self._count(dropped_pushes=len(job.records))
                return
            while self._queue and self._queue_bytes + job.nbytes > self.push_queue_bytes:
                old = self._queue.popleft()
                self._queue_bytes -= old.nbytes
                self._count(dropped_pushes=len(old.records))
            self._queue.append(job)
            self._queue_bytes += job.nbytes
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._queue_bytes -= job.nbytes
                self._busy = True
            try:
                self._push(job)
            except Exception as e:  # never let the pusher die
                self._count(push_errors=1)
                log.warning("remote push failed: %s", e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _push(self, job: _PushJob) -> None:
        items = []
        for rec in job.records:
            try:
                data = self._read_file(rec).read_bytes()
            except OSError:
                continue  # evicted meanwhile: nothing to share
            if len(data) != rec.nbytes or xxhash.xxh3_64_intdigest(data) != rec.checksum:
                # A damaged local file must not spread to every server.
                self._count(push_errors=1)
                continue
            items.append((record_key(job.namespace, rec.id), encode(rec, data)))
        if not items:
            return
        if self.client.put_many(items, self.ttl):
            self._count(pushed_records=len(items), pushed_bytes=sum(len(v) for _, v in items))
        else:
            self._count(dropped_pushes=len(items))

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until queued pushes are done. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    # --- the rest -----------------------------------------------------------------

    def stats(self) -> dict:
        """Counters, queue, latency and breaker state (``stats()["remote"]``)."""
        with self._lock:
            c = dict(self.counters)
            cc = dict(self.client.counters)
        with self._cond:
            queue_bytes = self._queue_bytes
            pending = len(self._queue) + (1 if self._busy else 0)
        return {
            "url": redacted(self.client.url),
            "ttl": self.ttl,
            "timeout_ms": self.timeout_ms,
            "breaker": self.client.breaker.state,
            "breaker_opened": self.client.breaker.opened,
            **c,
            "errors": cc["errors"],
            "timeouts": cc["timeouts"],
            "skipped_calls": cc["skipped"],
            "bytes_in": cc["bytes_in"],
            "bytes_out": cc["bytes_out"],
            "round_trips": cc["calls"],
            "round_trip_seconds": cc["seconds"],
            "push_queue_bytes": queue_bytes,
            "push_pending": pending,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Drains the push queue (bounded), then stops the pusher and disconnects."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            while self._queue:
                job = self._queue.popleft()
                self._count(dropped_pushes=len(job.records))
            self._queue_bytes = 0
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        self.client.close()

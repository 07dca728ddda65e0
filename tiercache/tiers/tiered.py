"""`TieredPromptCache`: mlx-lm's ``LRUPromptCache`` interface over memory + disk.

* Memory tier: :class:`tiercache.tiers.memory.MemoryPromptCache` under ``max_bytes``.
* Disk tier: :class:`tiercache.store.disk.DiskStore` under ``disk_bytes``, written by a
  :class:`tiercache.tiers.writer.BackgroundWriter` so the generation thread never waits.
* Pending tier: :class:`tiercache.tiers.pending.PendingTier`, the snapshots the
  writer holds but has not committed yet (their host buffers), searched like memory.
* A lookup takes the memory result, asks the pending tier and the disk for a longer
  prefix, and restores the longer one when reading it is expected to take less time
  than computing the tokens memory lacks
  (:class:`tiercache.tiers.costmodel.PromotionCostModel`; any hit counts when memory
  has nothing); the restored snapshot is promoted into memory.
* ``write_policy="through"`` persists every insert (dedup makes that cheap, and an
  eviction then costs nothing); ``"back"`` persists only what memory evicts.

How a model key maps to a disk namespace: the key is whatever the caller uses
(mlx_lm.server passes ``(model_path, adapter_path, draft_path)``). The namespace
comes from the model folder's files and the cache layout, never from the key's
spelling: call :meth:`TieredPromptCache.register_model` with the loaded model, or let
the cache find the folder from the key (a path, or a tuple starting with one) — the
layout is then read from the first inserted cache, and after a restart from the
namespaces the store already holds for those files. Keys that name no local folder
stay memory-only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import mlx.core as mx

from ..settings import WRITE_POLICIES
from ..store import layers as L
from ..store.disk import DiskStore
from ..store.restore import RestoreError
from ..store.hashing import Namespace, salt_bytes
from .costmodel import PromotionCostModel
from .memory import MemoryPromptCache
from ..remote.tier import DEFAULT_TIMEOUT_MS, DEFAULT_TTL, RemoteTier
from .pending import PendingTier
from ..store.namespaces import cache_arrays, key_fingerprint, model_namespace
from .writer import BackgroundWriter, WriteJob

log = logging.getLogger("tiercache")

UNLIMITED_BYTES = 1 << 63
"""A memory budget this large (mlx-lm's default) is no budget."""

TIER_MEMORY = "memory"
TIER_DISK = "disk"
TIER_REMOTE = "remote"
TIER_PENDING = "pending"


@dataclass(frozen=True)
class FetchResult:
    """What one lookup found, and where its tokens came from.

    New tiers (a writer-pending tier, a remote tier) report their own counts
    under their own name in ``tokens_by_tier``; callers that read the
    convenience properties keep working.

    Attributes:
        prompt_cache: The cached prefix's KV snapshot (the caller's to extend),
            or ``None`` on a miss.
        rest: The tokens still to compute. Never empty for a non-empty query:
            an exact hit gives back the last token (mlx-lm #1215).
        query_tokens: Length of the query.
        tokens_by_tier: Tokens served, keyed by tier name (``"memory"``,
            ``"disk"``, ...); empty on a miss.
        restore_seconds: Time spent restoring from a lower tier.
    """

    prompt_cache: list | None
    rest: list[int]
    query_tokens: int = 0
    tokens_by_tier: dict[str, int] = field(default_factory=dict)
    restore_seconds: float = 0.0

    @property
    def cached_tokens(self) -> int:
        """Return the number of tokens served from any tier."""
        return sum(self.tokens_by_tier.values())

    @property
    def memory_tokens(self) -> int:
        """Return the number of tokens served from the memory tier."""
        return self.tokens_by_tier.get(TIER_MEMORY, 0)

    @property
    def disk_tokens(self) -> int:
        """Return the number of tokens restored from the disk tier."""
        return self.tokens_by_tier.get(TIER_DISK, 0)

    @property
    def remote_tokens(self) -> int:
        """Return the number of tokens restored from the remote tier (some of its
        blocks may have been read from local disk; the hit counts as remote)."""
        return self.tokens_by_tier.get(TIER_REMOTE, 0)

    @property
    def source(self) -> str:
        """Return the tier that served the most tokens, or ``"none"`` on a miss."""
        served = [(n, tier) for tier, n in self.tokens_by_tier.items() if n]
        return max(served)[1] if served else "none"

    @property
    def pending_tokens(self) -> int:
        """Return the number of tokens copied from a snapshot the disk writer had
        not committed yet (the pending tier)."""
        return self.tokens_by_tier.get(TIER_PENDING, 0)


def _offset_mismatch(prompt_cache: list, n: int):
    """``(layer, offset)`` of the first layer whose integer ``offset`` isn't ``n``, or None."""
    for i, layer in enumerate(prompt_cache):
        off = getattr(layer, "offset", None)
        if type(off) is int and off != n:
            return i, off
    return None


@dataclass(eq=False)
class RemoteRecords:
    """Verified records of a remote hit, queued for the local disk (writer job)."""

    items: list


class TieredPromptCache:
    """A prefix cache that keeps hot snapshots in memory and everything on disk.

    Args:
        max_size: most snapshots held in memory.
        max_bytes: memory budget in bytes (arrays' real ``nbytes``).
        disk_dir: store folder; ``None`` makes a memory-only cache.
        disk_bytes: disk budget; ``None`` is unlimited.
        block_size: tokens per disk block. ``None`` uses the store's own size (256
            for a new store); any other value must match an existing store.
        write_policy: ``"through"`` (persist every insert, asynchronously) or
            ``"back"`` (persist what memory evicts).
        prewarm_bytes: after :meth:`register_model`, restore up to this many bytes of
            the model's most recently used snapshots into memory on a background
            thread, so the first requests after a restart are memory hits.
        cost_model: decides between a memory prefix and a longer disk one from
            measured restore and prefill rates (default: a fresh
            :class:`~tiercache.tiers.costmodel.PromotionCostModel`). Feed it real
            prefill timings with :meth:`observe_prefill`.
        writer_queue_bytes: bound on snapshots waiting for the writer; beyond it the
            oldest pending writes are dropped and counted.
        handover: give trimmable memory entries to the caller instead of cloning
            them (the caller re-inserts the extended snapshot; see memory.py).
        keep_promoted: also keep a disk hit in memory, so the same lookup again is
            a memory hit. The memory copy shares the caller's buffers, so the
            caller's first write copies them (MLX copy-on-write); a caller that
            re-inserts what it computed anyway (the server) passes False and
            writes in place.
        remote_url: a Redis/Valkey URL (``redis://``, ``rediss://``, ``unix://``)
            shared by several caches: a third tier after memory and disk (needs
            ``disk_dir``). See :mod:`tiercache.remote`.
        remote_ttl: seconds each remote key lives (0: no expiry).
        remote_timeout_ms: socket timeout of remote lookups.
    """

    def __init__(
        self,
        max_size: int = 10,
        max_bytes: int = UNLIMITED_BYTES,
        *,
        disk_dir=None,
        disk_bytes: int | None = None,
        block_size: int | None = None,
        write_policy: str = "through",
        prewarm_bytes: int = 0,
        cost_model: PromotionCostModel | None = None,
        writer_queue_bytes: int = 2 << 30,
        handover: bool = True,
        keep_promoted: bool = True,
        remote_url: str | None = None,
        remote_ttl: int | None = DEFAULT_TTL,
        remote_timeout_ms: float = DEFAULT_TIMEOUT_MS,
    ):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, not {write_policy!r}")
        if max_size < 0 or max_bytes < 0:
            raise ValueError("max_size and max_bytes must be >= 0")
        self.write_policy = write_policy
        self.handover = handover
        self.keep_promoted = keep_promoted
        self.memory = MemoryPromptCache(max_size, max_bytes, on_evict=self._on_evict)
        self.disk: DiskStore | None = None
        self.writer: BackgroundWriter | None = None
        self.pending: PendingTier | None = None
        if disk_dir is not None:
            self.disk = DiskStore(disk_dir, block_size=block_size, disk_bytes=disk_bytes)
            self.disk.record_budget()
            self.writer = BackgroundWriter(
                self._write, max_queue_bytes=writer_queue_bytes, idle=self.disk.flush_touches
            )
            self.pending = PendingTier(self.writer)
        self.cost_model = cost_model if cost_model is not None else PromotionCostModel()
        self.remote: RemoteTier | None = None
        if remote_url is not None:
            if self.disk is None:
                raise ValueError("remote_url needs disk_dir (namespaces and restored blocks live there)")
            self.remote = RemoteTier(remote_url, block_size=self.disk.block_size, ttl=remote_ttl,
                                     timeout_ms=remote_timeout_ms)
        self._ns_lock = threading.Lock()
        self._ns_by_key: dict[Hashable, Namespace] = {}
        self._files_fp: dict[Hashable, tuple | None] = {}
        self.counters = {
            "queries": 0,
            "query_tokens": 0,
            "disk_hits": 0,
            "disk_hit_tokens": 0,
            "promotions": 0,
            "demotions": 0,
            "restore_seconds": 0.0,
            "rejected_inserts": 0,
            "prewarmed_bytes": 0,
        }
        self._closed = False
        self._prewarm_bytes = prewarm_bytes if self.disk is not None else 0
        self._prewarm_thread: threading.Thread | None = None

    # --- namespaces ---------------------------------------------------------------------

    def register_model(
        self,
        key: Hashable,
        model_path,
        model: Any = None,
        *,
        adapter_path=None,
        draft_model_path=None,
        draft_model: Any = None,
    ) -> Namespace | None:
        """Binds a cache key to the namespace of a loaded model (probes its cache
        layout). An adapter and a draft model are part of the namespace."""
        if self.disk is None:
            return None
        ns = model_namespace(
            self.disk,
            model_path,
            model,
            adapter_path=adapter_path,
            draft_model_path=draft_model_path,
            draft_model=draft_model,
        )
        with self._ns_lock:
            self._ns_by_key[key] = ns
            start = self._prewarm_bytes > 0 and self._prewarm_thread is None
            if start:
                self._prewarm_thread = threading.Thread(
                    target=self._prewarm, args=(key, ns, self._prewarm_bytes),
                    name="tiercache-prewarm", daemon=True,
                )
        if start:
            self._prewarm_thread.start()
        return ns

    def namespace_of(self, key: Hashable) -> Namespace | None:
        """Return the disk namespace ``key`` is bound to, or ``None`` if not bound yet.

        A key is bound by :meth:`register_model`, or by its first insert when the
        key names a local model folder.
        """
        with self._ns_lock:
            return self._ns_by_key.get(key)

    def wait_prewarmed(self, timeout: float | None = None) -> bool:
        """Wait until prewarming (started by :meth:`register_model`) has finished.

        Args:
            timeout: Most seconds to wait; ``None`` waits as long as it takes.

        Returns:
            True if no prewarm is running (finished, or none was started);
            False if it is still running after ``timeout``.
        """
        with self._ns_lock:
            thread = self._prewarm_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _files(self, key: Hashable):
        if key not in self._files_fp:
            self._files_fp[key] = key_fingerprint(key, self.disk.file_digest)
            if self._files_fp[key] is None:
                log.info("cache key %r names no local model folder: memory tier only", key)
        return self._files_fp[key]

    def _namespaces(self, key: Hashable) -> list[Namespace]:
        """Candidate namespaces for a lookup under ``key``."""
        if self.disk is None:
            return []
        with self._ns_lock:
            if key in self._ns_by_key:
                return [self._ns_by_key[key]]
        files = self._files(key)
        if files is None:
            return []
        found = self.disk.namespaces_for_files(files[0])
        # Several layouts stored for these files (say a quantized KV cache from an
        # earlier run): without the model we can't tell which one it builds now,
        # and restoring the wrong layout would be a wrong hit. Wait for an insert
        # or register_model to say which.
        return found if len(found) == 1 else []

    def _namespace_for_insert(self, key: Hashable, prompt_cache: list) -> Namespace | None:
        if self.disk is None:
            return None
        with self._ns_lock:
            ns = self._ns_by_key.get(key)
        if ns is not None:
            return ns
        files = self._files(key)
        if files is None:
            return None
        try:  # the cache comes from the model: its shapes are the model's geometry
            geometry = {"layers": L.cache_geometry(prompt_cache)}
        except (L.UnsupportedCacheError, AttributeError, TypeError):
            geometry = None  # restores are then checked by class and dtype only
        ns = self.disk.register_namespace(
            files[0], L.describe_cache(prompt_cache), files[1], geometry=geometry
        )
        with self._ns_lock:
            self._ns_by_key[key] = ns
        return ns

    # --- the LRUPromptCache interface ---------------------------------------------------

    def fetch_nearest_cache(
        self, model: Hashable, tokens: Sequence[int], *, salt: str | bytes | None = None
    ) -> tuple[list | None, list[int]]:
        """Return the best cached prefix of ``tokens``, as mlx-lm's ``LRUPromptCache`` does.

        A thin adapter over :meth:`fetch` for code written against mlx-lm.

        Returns:
            ``(cache or None, remaining tokens)``; see :class:`FetchResult`.
        """
        result = self.fetch(model, tokens, salt=salt)
        return result.prompt_cache, result.rest

    def fetch(
        self, model: Hashable, tokens: Sequence[int], salt: str | bytes | None = None
    ) -> FetchResult:
        """Look up the longest cached prefix of ``tokens`` across the tiers.

        Args:
            model: The cache key the snapshots were inserted under.
            tokens: The query.
            salt: Isolation salt; only snapshots inserted with the same salt match.

        Returns:
            A :class:`FetchResult`; its cache belongs to the caller.
        """
        tokens = tokens if type(tokens) is tuple else tuple(tokens)  # converted once
        self.counters["queries"] += 1
        self.counters["query_tokens"] += len(tokens)
        if not tokens:
            return FetchResult(None, [])
        limit = len(tokens) - 1
        sb = salt_bytes(salt)
        hit = self.memory.fetch((model, sb), tokens, limit=limit, handover=self.handover)
        mem_n = hit.n_tokens if hit else 0
        pend, plans = None, []
        cache, n, dt, source = None, 0, 0.0, None
        # Pending and disk tiers are best effort: an LMDB error, a closed store
        # (server shutdown while a request is served) or an unexpected file must
        # never raise into the generation thread, nor lose the memory entry that
        # may already have been handed over above. Any failure is a miss.
        try:
            if self.disk is not None and not self._closed and limit > mem_n:
                namespaces = self._namespaces(model)
                # Pending jobs first: one committed after this call is on disk below.
                pend = self.pending.find(namespaces, sb, tokens, limit) if namespaces else None
                for ns in namespaces:
                    plan = self.disk.longest_prefix(ns, tokens, salt=sb, limit=limit)
                    if plan.n_tokens:
                        plans.append(plan)
            pend_n = pend.n_tokens if pend is not None else 0
            best = max(plans, key=lambda p: p.n_tokens, default=None)
            local_best = max(mem_n, pend_n, best.n_tokens if best is not None else 0)
            remote = self._remote_lookup(model, tokens, sb, limit, local_best, plans)
            if remote is not None:
                return self._serve_remote(model, sb, tokens, hit, remote)
            best_bytes = sum(r.nbytes for r in best.records) if best is not None else 0
            if (
                best is not None
                and best.n_tokens > pend_n
                and self.cost_model.prefer_disk(mem_n, best.n_tokens, best_bytes)
            ):
                t0 = time.perf_counter()
                cache, n = self._restore(plans, tokens, sb, limit)
                dt = time.perf_counter() - t0
                source = TIER_DISK
                if n == best.n_tokens:  # a fallback after a bad file read other files
                    self.cost_model.observe_restore(best_bytes, dt)
            # A pending snapshot is copied from host memory: judged as a disk read of
            # its bytes (conservative), it is used when it beats memory and the disk.
            if pend_n > n and self.cost_model.prefer_disk(mem_n, pend_n, pend.nbytes):
                cache, n, source = self.pending.restore(pend), pend_n, TIER_PENDING
        except Exception as e:
            log.warning("disk lookup failed (serving from memory): %s", e)
            cache, n = None, 0
        if cache is not None and n > mem_n:
            if hit is not None and hit.prompt_cache is not None:
                self._give_back(model, sb, tokens, hit)
            if self.keep_promoted:
                self.memory.insert((model, sb), tokens[:n], cache, cache_type="user")
            self.counters["promotions"] += 1
            if source == TIER_PENDING:
                return FetchResult(cache, list(tokens[n:]), len(tokens), {TIER_PENDING: n})
            self.counters["disk_hits"] += 1
            self.counters["disk_hit_tokens"] += n
            self.counters["restore_seconds"] += dt
            return FetchResult(cache, list(tokens[n:]), len(tokens), {TIER_DISK: n}, dt)
        if hit is None:
            return FetchResult(None, list(tokens), len(tokens))
        return FetchResult(hit.prompt_cache, list(tokens[mem_n:]), len(tokens), {TIER_MEMORY: mem_n})

    # --- remote tier hooks ----------------------------------------------------------------

    def _remote_lookup(self, model, tokens, salt, limit, local_best, plans):
        """A remote hit beating the local tiers by a block (less isn't worth the
        network), restored, as ``(namespace, cache, hit, seconds)``; None otherwise
        (never raises)."""
        if self.remote is None or self._closed:
            return None
        floor = local_best + (self.remote.block_size if local_best else 1)
        if limit < floor:
            return None
        for ns in self._namespaces(model):
            desc = self.disk.layer_desc(ns)
            local = next((p.chain for p in plans if p.namespace == ns), [])
            t0 = time.perf_counter()
            found = self.remote.lookup(ns, desc, tokens, salt, limit, local)
            if found is None or found.n_tokens < floor:
                continue
            try:
                geo = self.disk.geometry(ns)
                cache = self.remote.restore(found, self.disk.file_path,
                                            geo.get("layers") if geo else None)
            except (RestoreError, ValueError) as e:
                # Checked bytes that still don't build a cache (or a local file
                # went bad meanwhile): a miss, never a wrong hit.
                self.remote.note_rejected(str(e))
                continue
            return ns, cache, found, time.perf_counter() - t0
        return None

    def _serve_remote(self, model, salt, tokens, hit, remote) -> FetchResult:
        """Hands a remote hit to the caller; its records go to local disk via the writer."""
        ns, cache, found, dt = remote
        n = found.n_tokens
        if hit is not None and hit.prompt_cache is not None:
            self._give_back(model, salt, tokens, hit)
        if self.keep_promoted:
            self.memory.insert((model, salt), tokens[:n], cache, cache_type="user")
        items = found.remote_items()
        self.writer.submit(WriteJob(ns, (), RemoteRecords(items), salt, sum(len(b) for _, b in items)))
        self.counters["promotions"] += 1
        self.counters["restore_seconds"] += dt
        return FetchResult(cache, list(tokens[n:]), len(tokens), {TIER_REMOTE: n}, dt)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Report a prefill of ``tokens`` tokens that took ``seconds``.

        Keeps the cost model's prefill rate (which weighs a longer disk prefix
        against computing the tokens memory lacks) true to the model and machine.
        """
        self.cost_model.observe_prefill(tokens, seconds)

    def _restore(self, plans, tokens, salt, limit):
        """Restores the longest plan; a bad file makes the store fall back itself."""
        for plan in sorted(plans, key=lambda p: -p.n_tokens):
            cache, n = self.disk.fetch(plan.namespace, tokens, salt=salt, limit=limit, plan=plan)
            if cache is not None:
                return cache, n
        return None, 0

    def _give_back(self, model, salt, tokens, hit) -> None:
        """Re-inserts a handed-over memory entry the caller won't use."""
        # A cloned hit's entry is still stored: re-inserting the (trimmed) clone
        # would only add a redundant entry and evict a useful one for it.
        if hit.n_tokens and hit.handed_over:
            self.memory.insert((model, salt), tokens[: hit.n_tokens], hit.prompt_cache, cache_type=hit.cache_type)

    def insert_cache(
        self,
        model: Hashable,
        tokens: Sequence[int],
        prompt_cache: list,
        *,
        cache_type: str = "assistant",
        salt: str | bytes | None = None,
    ) -> None:
        """Stores a snapshot in memory and (write-through) queues it for disk.

        The arrays are evaluated here, on the caller's thread; the writer only
        reads evaluated buffers. Costs the caller no disk I/O.
        """
        tokens = tokens if type(tokens) is tuple else tuple(tokens)
        if not tokens or not prompt_cache:
            return
        bad = _offset_mismatch(prompt_cache, len(tokens))
        if bad is not None:
            # A snapshot that holds other than len(tokens) tokens would be served as
            # covering `tokens`: a wrong hit. Refuse it (a miss is always safe).
            log.warning("not caching a snapshot of %d tokens whose layer %d holds %d", len(tokens), *bad)
            self.counters["rejected_inserts"] += 1
            return
        sb = salt_bytes(salt)
        mx.eval(list(cache_arrays(prompt_cache)))
        if self.disk is not None and self.write_policy == "through":
            self._submit(model, sb, tokens, prompt_cache)
        self.memory.insert((model, sb), tokens, prompt_cache, cache_type=cache_type)

    def _submit(self, model, salt, tokens, prompt_cache) -> None:
        if self._closed:
            return  # the store is closed (shutdown): memory only from now on
        try:
            ns = self._namespace_for_insert(model, prompt_cache)
            if ns is None:
                return
            host = L.to_host(prompt_cache)
        except Exception as e:
            # Registering a namespace touches LMDB (lmdb.Error, IndexError_ when the
            # map can't grow or the disk is full): persisting is best effort and must
            # never raise into the generation thread.
            log.warning("snapshot not persisted: %s", e)
            return
        nbytes = sum(c.nbytes for c in prompt_cache)
        self.writer.submit(WriteJob(ns, tokens, host, salt, nbytes))

    def _write(self, ns, tokens, host, salt) -> None:
        if isinstance(host, RemoteRecords):  # a remote hit: keep a local copy
            self.disk.adopt_records(ns, host.items)
            return
        result = self.disk.save(ns, tokens, host, salt=salt or None)
        if self.remote is not None:  # share what this commit added
            self.remote.push(ns, result.written, self.disk.file_path)

    def _on_evict(self, key, tokens, prompt_cache, cache_type) -> None:
        if self.disk is None:
            return
        self.counters["demotions"] += 1
        if self.write_policy == "back":
            model, salt = key
            self._submit(model, salt, tokens, prompt_cache)

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None) -> None:
        """Shrinks the memory tier (evicted snapshots stay on, or go to, disk)."""
        self.memory.trim_to(n_sequences=n_sequences, n_bytes=n_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self.memory.nbytes

    @property
    def max_bytes(self) -> int:
        return self.memory.max_bytes

    @property
    def max_size(self) -> int:
        return self.memory.max_size

    def __len__(self) -> int:
        return len(self.memory)

    def stats_by_type(self) -> dict:
        return self.memory.stats_by_type()

    # --- the rest -----------------------------------------------------------------------

    def stats(self) -> dict:
        """Per-tier counters: entries, bytes, hits and hit tokens, promotions,
        demotions, evictions, writer queue bytes and dropped writes; with a remote
        tier, its hits, misses, rejections, errors, bytes, latency and breaker."""
        m = self.memory.counters
        out = {
            "memory": {
                "entries": len(self.memory),
                "bytes": self.memory.nbytes,
                # 1 << 63 (mlx-lm's default) means no budget: say so, not a 19-digit number.
                "budget_bytes": self.memory.max_bytes if self.memory.max_bytes < UNLIMITED_BYTES else None,
                "hits": m["hits"],
                "hit_tokens": m["hit_tokens"],
                "evictions": m["evictions"],
                "handovers": m["handovers"],
                "prewarmed_bytes": self.counters["prewarmed_bytes"],
            },
            "queries": self.counters["queries"],
            "query_tokens": self.counters["query_tokens"],
            "rejected_inserts": self.counters["rejected_inserts"],
        }
        if self.disk is not None:
            d = self.disk.stats()
            w = self.writer.counters
            out["disk"] = {
                "entries": d["entries"],
                "bytes": d["bytes"],
                "budget_bytes": d["budget_bytes"],
                "block_size": d["block_size"],
                "hits": self.counters["disk_hits"],
                "hit_tokens": self.counters["disk_hit_tokens"],
                "promotions": self.counters["promotions"],
                "demotions": self.counters["demotions"],
                "evictions": d["evicted_records"],
                "corrupt_records": d["corrupt_records"],
                "restore_seconds": self.counters["restore_seconds"],
                "bytes_written": d["bytes_written"],
                "records_written": d["records_written"],
                "cost_model": self.cost_model.snapshot(),
            }
            out["pending"] = self.pending.stats()
            out["writer"] = {
                "queue_bytes": self.writer.queue_bytes,
                "pending": self.writer.pending(),
                "written": w["written"],
                "dropped_writes": w["dropped_writes"],
                "errors": w["errors"],
            }
        if self.remote is not None:
            out["remote"] = self.remote.stats()
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Waits for pending disk writes (tests, benchmarks, shutdown)."""
        if self.writer is None:
            return True
        ok = self.writer.flush(timeout)
        self.disk.flush_touches()
        if self.remote is not None:  # pushes follow the disk commits just flushed
            ok = self.remote.flush(timeout) and ok
        return ok

    def clear(self, tier: str | None = None) -> None:
        """Empties the memory tier, the disk tier, or both (``tier=None``)."""
        if tier not in (None, "memory", "disk"):
            raise ValueError("tier must be 'memory', 'disk' or None")
        if tier in (None, "memory"):
            self.memory.clear()
        if tier in (None, "disk") and self.disk is not None:
            self.writer.flush(30)
            self.disk.clear()

    def close(self, flush_timeout: float = 10.0) -> bool:
        """Drains the writer (bounded) and closes the store. Returns False if writes
        were dropped because the timeout passed."""
        if self._closed:
            return True
        self._closed = True
        ok = True
        if self.writer is not None:
            ok = self.writer.close(flush_timeout)
        if self.remote is not None:
            self.remote.close(min(flush_timeout, 5.0))
        if self.disk is not None:
            if self.writer is not None and self.writer.is_alive():
                # The writer is stuck inside a save (a hung disk): closing LMDB
                # under it would fail that save midway. Leave it to process exit;
                # whatever it hasn't committed is at worst an orphan file.
                log.warning("disk writer still busy after %.1fs; not closing the index", flush_timeout)
                return False
            self.disk.close()
        return ok

    def __enter__(self) -> "TieredPromptCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prewarm(self, key: Hashable, ns: Namespace, budget: int) -> None:
        """Restores the most recently used snapshots of ``ns`` into memory.

        Runs MLX on this thread, which MLX supports since 0.31.2 as long as arrays
        are evaluated before another thread uses them: every restored array is
        evaluated here before the snapshot enters the memory tier. Salted chains
        are skipped (their salt isn't known here); the memory tier's own budget is
        never exceeded by prewarming (nothing hot is evicted for it).
        """
        done = 0
        try:
            for snap in self.disk.recent_snapshots(ns, budget):
                if self._closed or done >= budget:
                    break
                try:
                    t0 = time.perf_counter()
                    cache = self.disk.restore(snap.plan)
                except RestoreError:
                    continue
                mx.eval(list(cache_arrays(cache)))
                self.cost_model.observe_restore(snap.nbytes, time.perf_counter() - t0)
                nbytes = sum(c.nbytes for c in cache)
                if done + nbytes > budget or self.memory.nbytes + nbytes > self.memory.max_bytes:
                    continue
                self.memory.insert((key, b""), snap.tokens, cache, cache_type="user")
                done += nbytes
                self.counters["prewarmed_bytes"] += nbytes
            log.info("prewarmed %d bytes into memory", done)
        except Exception as e:  # prewarm is best effort
            log.warning("prewarm failed: %s", e)

"""The disk tier: content-addressed block files indexed in LMDB by token-hash chains.

Write path (crash-safe): every file is written to a temp name, fsynced and renamed;
only then is the LMDB transaction that references it committed. Deletion goes the
other way: commit the removal, then unlink. A crash leaves at worst an orphan file,
which :func:`tiercache.store.check.check_store` finds and removes.

Read path: :meth:`DiskStore.longest_prefix` walks the chain in LMDB (tokens compared,
so a hash collision or a poisoned record is a miss), :meth:`DiskStore.restore` reads
the files straight into MLX buffers and verifies every checksum, and
:meth:`DiskStore.fetch` falls back to the longest valid prefix when a file is bad.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import TiercacheError
from . import layers as L
from .blockfile import (
    DIR_MODE,
    TensorSource,
    write_bytes_file,
    write_tensor_file,
)
from .hashing import (
    FORMAT_VERSION,
    HASH_ALGORITHM,
    Namespace,
    chain_root,
    checkpoint_id,
    file_digest,
    namespace_id,
    pack_tokens,
    packed_block_hashes,
)
from .index import INDEX_LAYOUT, KIND_BLOCK, KIND_CHECKPOINT, KIND_TAIL, Index, IndexError_, Record
from .lookup import RestorePlan, find_longest_prefix
from .recent import StoredSnapshot, recent_snapshots
from .restore import RestoreError, read_plan
from .check import check_store
from .layout import BLOCKS_DIR, CHECKPOINTS_DIR, DEFAULT_BLOCK_SIZE, INDEX_DIR

log = logging.getLogger("tiercache.store.disk")


class StoreError(TiercacheError):
    """The folder is not a usable tiercache store (wrong format, settings mismatch...)."""


def _version(pkg: str) -> str:
    try:
        return importlib_metadata.version(pkg)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class SaveResult:
    """What one :meth:`DiskStore.save` wrote (dedup makes most saves write little)."""

    records_written: int = 0
    bytes_written: int = 0
    records_skipped: int = 0
    evicted: int = 0
    written: list = field(default_factory=list)
    """The records this save added to the index (a remote tier pushes them)."""


class DiskStore:
    """Persistent KV snapshots for many models in one folder.

    Args:
        path: the store folder (created 0700 if missing).
        block_size: tokens per block. ``None`` adopts the stored value (256 for a
            new store); a value different from the stored one is an error.
        disk_bytes: budget for block and checkpoint files; ``None`` is unlimited.
        readonly: open the index read-only (inspection tools).
        create: create the store if the folder has none.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        block_size: int | None = None,
        disk_bytes: int | None = None,
        readonly: bool = False,
        create: bool = True,
    ):
        self.path = Path(path)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError("block_size must be a positive integer")
        if disk_bytes is not None and disk_bytes < 0:
            raise ValueError("disk_bytes must be >= 0")
        index_path = self.path / INDEX_DIR
        if not index_path.is_dir():
            if readonly or not create:
                if not self.path.exists():
                    raise StoreError(f"{self.path} does not exist")
                raise StoreError(f"{self.path} is not a tiercache store (no {INDEX_DIR})")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} is not a folder")
            if self.path.is_dir() and any(
                p.name not in (BLOCKS_DIR, CHECKPOINTS_DIR) for p in self.path.iterdir()
            ):
                raise StoreError(f"{self.path} is not empty and is not a tiercache store")
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # A new store is private even if someone created the folder for us.
            os.chmod(self.path, DIR_MODE)
            index_path.mkdir(mode=DIR_MODE, exist_ok=True)
        for name in (INDEX_DIR, BLOCKS_DIR, CHECKPOINTS_DIR):
            if (self.path / name).is_symlink():
                # Following it would let writes and repairs land outside the store.
                raise StoreError(f"{self.path / name} is a symlink; refusing to use the store")
        try:
            self.index = Index(index_path, readonly=readonly)
        except IndexError_ as e:
            raise StoreError(str(e)) from None
        try:
            self.block_size = self._check_format(block_size)
            if not readonly and self.index.migrate():
                log.info("migrated the index of %s to layout %d", self.path, INDEX_LAYOUT)
        except BaseException:
            self.index.close()
            raise
        self.disk_bytes = disk_bytes
        self.readonly = readonly
        self._desc_cache: dict[bytes, list] = {}
        self._geo_cache: dict[bytes, dict] = {}
        self._touch_lock = threading.Lock()
        self._touches: dict[bytes, list] = {}
        self._save_lock = threading.Lock()
        self.counters = {
            "corrupt_records": 0,
            "evicted_records": 0,
            "evicted_bytes": 0,
            "bytes_written": 0,
            "records_written": 0,
        }
        self._closed = False

    # --- settings ---------------------------------------------------------------------

    def _check_format(self, block_size: int | None) -> int:
        with self.index.read() as txn:
            fmt = self.index.get_format(txn)
        if fmt is None:
            if self.index.readonly:
                raise StoreError(f"{self.path} is not a tiercache store (no format record)")
            fmt = {
                "format_version": FORMAT_VERSION,
                "block_size": block_size or DEFAULT_BLOCK_SIZE,
                "hash_algorithm": HASH_ALGORITHM,
                "created": time.time(),
                "tiercache_version": _version("tiercache"),
                "mlx_lm_version": _version("mlx-lm"),
            }
            self.index.write(lambda txn: self.index.put_format(txn, fmt))
            return fmt["block_size"]
        version = fmt.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path} uses store format {version}, newer than this tiercache "
                f"(format {FORMAT_VERSION}): upgrade tiercache"
            )
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path} uses old store format {version}; clear it")
        if fmt.get("hash_algorithm") != HASH_ALGORITHM:
            raise StoreError(f"{self.path} uses hash {fmt.get('hash_algorithm')!r}")
        stored = fmt.get("block_size")
        if block_size is not None and block_size != stored:
            raise StoreError(
                f"{self.path} was created with block size {stored}, not {block_size}"
            )
        return int(stored)

    def settings(self) -> dict:
        """The store's own settings record (format version, block size, versions)."""
        with self.index.read() as txn:
            return self.index.get_format(txn) or {}

    # --- namespaces ---------------------------------------------------------------------

    def register_namespace(
        self,
        files_fingerprint: bytes,
        layer_desc: list,
        description: dict | None = None,
        geometry: dict | None = None,
    ) -> Namespace:
        """Records a model + cache layout and returns its namespace id.

        Args:
            geometry: shapes and vocabulary size of the model's cache (see
                :func:`tiercache.store.namespaces.probe_layout`); recorded with the
                namespace, also for one registered before without it. Restores and
                ``check`` refuse stored tensors that don't fit it.
        """
        ns = namespace_id(files_fingerprint, layer_desc, self.block_size)
        with self.index.read() as txn:
            known = self.index.get_namespace(txn, ns)
        if known is None and not self.readonly:
            desc = {
                "files_fingerprint": files_fingerprint.hex(),
                "layers": layer_desc,
                "block_size": self.block_size,
                "format_version": FORMAT_VERSION,
                "created": time.time(),
                "mlx_lm_version": _version("mlx-lm"),
                "model": description or {},
            }
            if geometry is not None:
                desc["geometry"] = geometry
            self.index.write(lambda txn: self.index.put_namespace(txn, ns, desc, files_fingerprint))
        elif known is not None and geometry is not None and not self.readonly:
            had = known.get("geometry") or {}
            if {**geometry, **had} != had:  # add what is missing, never change what is there
                known["geometry"] = {**geometry, **had}
                self.index.write(lambda txn: self.index.put_namespace(txn, ns, known, files_fingerprint))
                self._geo_cache.pop(ns, None)
        self._desc_cache[ns] = list(layer_desc)
        return ns

    def geometry(self, ns: bytes) -> dict | None:
        """The namespace's recorded cache geometry, or None (registered without a model)."""
        if ns not in self._geo_cache:
            with self.index.read() as txn:
                d = self.index.get_namespace(txn, ns)
            geo = (d or {}).get("geometry")
            if not isinstance(geo, dict):
                return None  # not cached: a later registration may record it
            self._geo_cache[ns] = geo
        return self._geo_cache[ns]

    def namespaces_for_files(self, files_fingerprint: bytes) -> list[Namespace]:
        """Namespaces stored for a model's files (one per cache layout / dtype)."""
        with self.index.read() as txn:
            return [Namespace(n) for n in self.index.namespaces_for_files(txn, files_fingerprint)]

    def namespaces(self) -> dict[bytes, dict]:
        with self.index.read() as txn:
            return self.index.all_namespaces(txn)

    def layer_desc(self, ns: bytes) -> list | None:
        if ns not in self._desc_cache:
            with self.index.read() as txn:
                d = self.index.get_namespace(txn, ns)
            if d is None:
                return None
            self._desc_cache[ns] = d["layers"]
        return self._desc_cache[ns]

    def file_digest(self, path: Path) -> bytes:
        """Full-content digest of a weight file, remembered in the index by
        (real path, size, mtime, inode) so unchanged models aren't re-read."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()
        try:
            with self.index.read() as txn:
                known = self.index.get_file_digest(txn, key)
        except Exception:  # a store created before this sub-database: just hash
            known = None
        if known is not None and len(known) == 16:
            return bytes(known)
        digest = file_digest(Path(real))
        if not self.readonly:
            try:
                self.index.write(lambda txn: self.index.put_file_digest(txn, key, digest))
            except Exception as e:  # remembering is an optimisation only
                log.debug("could not remember a file digest: %s", e)
        return digest

    # --- paths --------------------------------------------------------------------------

    def file_path(self, rec: Record) -> Path:
        """Where a record's file lives: blocks are named by their chain hash."""
        folder = BLOCKS_DIR if rec.kind == KIND_BLOCK else CHECKPOINTS_DIR
        h = rec.id.hex()
        return self.path / folder / h[:2] / f"{h}.safetensors"

    # --- save ---------------------------------------------------------------------------

    def save(
        self, ns: Namespace, tokens: Sequence[int], cache: list, salt: str | bytes | None = None
    ) -> SaveResult:
        """Stores the blocks and the tail/checkpoint of a snapshot that are not stored yet.

        Args:
            ns: a registered namespace.
            tokens: the tokens the cache holds, in order.
            cache: mlx-lm cache objects (evaluated), one per layer, or their
                :func:`tiercache.store.layers.to_host` form (what the background writer
                passes: it runs no MLX operation off the MLX thread).
            salt: optional tenant salt mixed into the chain root.

        Returns:
            What was written.

        Raises:
            ValueError: if the cache doesn't match the namespace's layout or the tokens.
        """
        desc = self.layer_desc(ns)
        if desc is None:
            raise ValueError("unknown namespace: register it first")
        if L.describe_cache(cache) != desc:
            raise ValueError("cache layout does not match the namespace")
        tokens = tokens.tolist() if isinstance(tokens, (np.ndarray, mx.array)) else list(tokens)
        n = len(tokens)
        split = [i for i, d in enumerate(desc) if L.is_splittable(d)]
        ckpt = [i for i, d in enumerate(desc) if not L.is_splittable(d)]
        for i in split:
            off = L.layer_offset(cache[i])
            if off != n:
                raise ValueError(f"layer {i} holds {off} tokens, but {n} tokens were given")
        if n == 0:
            return SaveResult()
        B = self.block_size
        root = chain_root(ns, salt)
        packed = pack_tokens(tokens)
        hashes = packed_block_hashes(root, packed, B)
        result = SaveResult()
        with self._save_lock:
            with self.index.read() as txn:
                existing = [self.index.get(txn, h) for h in hashes]
            new: list[Record] = []
            try:
                now = time.time()
                parent = root
                for i, h in enumerate(hashes):
                    chunk = packed[i * 4 * B : (i + 1) * 4 * B]
                    rec = existing[i]
                    if rec is not None:
                        if rec.tokens != chunk or rec.parent != parent:
                            # Same hash, other tokens: never overwrite, never extend it.
                            log.warning("hash collision or poisoned record %s: not storing", h.hex())
                            self._commit(new, result)
                            return result
                        result.records_skipped += 1
                        parent = h
                        continue
                    tensors = [
                        TensorSource(f"{li}.{suffix}", dt, view)
                        for li in split
                        for suffix, dt, view in L.kv_rows(cache[li], i * B, (i + 1) * B)
                    ]
                    rec = Record(h, KIND_BLOCK, ns, parent, 0, 0, now, now, 0, (i + 1) * B, chunk)
                    rec.nbytes, rec.checksum = write_tensor_file(
                        self.file_path(rec), tensors, {"tiercache": "block", "format": str(FORMAT_VERSION)}
                    )
                    new.append(rec)
                    parent = h
                start = len(hashes) * B
                if n > start or ckpt:
                    tail = tokens[start:]
                    cid = checkpoint_id(parent, tail)
                    with self.index.read() as txn:
                        have = self.index.get(txn, cid) is not None
                    if have:
                        result.records_skipped += 1
                    else:
                        kind = KIND_CHECKPOINT if ckpt else KIND_TAIL
                        new.append(self._write_tail(ns, kind, cid, parent, cache, split, ckpt, start, n, packed, now))
                self._commit(new, result)
            except BaseException:
                # Nothing of this save reached the index: take its files back so a
                # failed write (ENOSPC, EIO...) leaves the folder as it was.
                self._discard_uncommitted(new)
                raise
        if self.disk_bytes is not None:
            result.evicted = len(self.evict_to(self.disk_bytes))
        return result

    def _write_tail(self, ns, kind, cid, parent, cache, split, ckpt, start, n, packed, now) -> Record:
        tensors = []
        for li in split:
            for suffix, dt, view in L.kv_rows(cache[li], start, n):
                tensors.append(TensorSource(f"{li}.{suffix}", dt, view))
        states = {}
        for li in ckpt:
            arrays, meta = L.host_state(cache[li])
            states[str(li)] = meta
            for name, dt, view in arrays:
                tensors.append(TensorSource(f"{li}.s.{name}", dt, view))
        rec = Record(cid, kind, ns, parent, 0, 0, now, now, 0, n, packed[start * 4 :])
        meta = {"tiercache": "checkpoint", "format": str(FORMAT_VERSION), "states": json.dumps(states)}
        rec.nbytes, rec.checksum = write_tensor_file(self.file_path(rec), tensors, meta)
        return rec

    def _discard_uncommitted(self, new: list[Record]) -> None:
        """Unlinks files written by a failed save, unless a record points at them
        (another process may have stored the same content-addressed block)."""
        if not new:
            return
        try:
            with self.index.read() as txn:
                keep = {r.id for r in new if self.index.get(txn, r.id) is not None}
        except Exception:
            return
        for rec in new:
            if rec.id not in keep:
                try:
                    self.file_path(rec).unlink()
                except OSError:
                    pass

    def _commit(self, new: list[Record], result: SaveResult) -> None:
        """Commits a save's records (in chain order) and takes back the files of
        those that could not be attached.

        Which blocks exist was read before the files were written; a ``clear`` or
        an eviction may have removed some since. Parents are therefore checked
        again inside the commit: a record whose parent block is gone would be
        unreachable, so it and everything after it are dropped, with their files.
        """
        if not new:
            return

        def fn(txn):
            added, dropped = [], []
            for r in new:
                parent = self.index.get(txn, r.parent) if r.start else None
                if r.start and (parent is None or parent.kind != KIND_BLOCK):
                    dropped.append(r)  # its children find their parent missing too
                elif self.index.insert(txn, r):
                    added.append(r)
            # A dropped id another writer stored meanwhile owns its (identical) file.
            return added, [r for r in dropped if not self.index.has(txn, r.id)]

        added, dropped = self.index.write(fn)
        if dropped:
            log.info("save: %d records lost their parent to a concurrent removal; not stored", len(dropped))
        for r in dropped:
            try:
                self.file_path(r).unlink()
            except FileNotFoundError:
                pass
        result.records_written += len(added)
        result.bytes_written += sum(r.nbytes for r in added)
        self.counters["records_written"] += len(added)
        self.counters["bytes_written"] += sum(r.nbytes for r in added)
        result.written.extend(added)

    def adopt_records(self, ns: Namespace, items: Sequence[tuple[Record, bytes]]) -> SaveResult:
        """Stores records verified elsewhere (a remote tier's hit) with their file bytes.

        The caller has checked every record (tokens, chain id, checksum); records
        already stored are skipped. Files are durable before the index commit, as
        in :meth:`save`.

        Args:
            ns: a registered namespace; every record must belong to it.
            items: ``(record, file bytes)`` in chain order (parents first).

        Returns:
            What was written.

        Raises:
            ValueError: if the namespace is unknown or a record belongs to another.
        """
        if self.layer_desc(ns) is None:
            raise ValueError("unknown namespace: register it first")
        result = SaveResult()
        with self._save_lock:
            with self.index.read() as txn:
                todo = [(r, b) for r, b in items if self.index.get(txn, r.id) is None]
            result.records_skipped = len(items) - len(todo)
            new: list[Record] = []
            try:
                now = time.time()
                for rec, data in todo:
                    if rec.namespace != ns or len(data) != rec.nbytes:
                        raise ValueError("record does not match its namespace or bytes")
                    rec = Record(rec.id, rec.kind, ns, rec.parent, rec.nbytes, rec.checksum,
                                 now, now, 0, rec.position, rec.tokens)
                    write_bytes_file(self.file_path(rec), data)
                    new.append(rec)
                self._commit(new, result)
            except BaseException:
                self._discard_uncommitted(new)
                raise
        if self.disk_bytes is not None:
            result.evicted = len(self.evict_to(self.disk_bytes))
        return result

    # --- lookup and restore -------------------------------------------------------------

    def longest_prefix(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        salt: str | bytes | None = None,
        limit: int | None = None,
    ) -> RestorePlan:
        """Finds the longest stored prefix of ``tokens`` that can be restored exactly.

        Args:
            ns: namespace.
            tokens: the prompt.
            salt: tenant salt (must equal the one used to save).
            limit: restore at most this many tokens (callers pass ``len - 1`` so a
                hit always leaves a token to prefill).

        Returns:
            A plan; ``plan.n_tokens == 0`` is a miss. See :mod:`tiercache.store.lookup`.
        """
        return find_longest_prefix(
            self.index, ns, self.layer_desc(ns), tokens, self.block_size, salt=salt, limit=limit
        )

    def restore(self, plan: RestorePlan) -> list | None:
        """Builds mlx-lm cache objects for a plan, verifying every file.

        Raises:
            RestoreError: a file is missing, truncated or fails its checksum, or
                holds tensors that don't fit the namespace's geometry.
        """
        geo = self.geometry(plan.namespace)
        return read_plan(plan, self.file_path, geo.get("layers") if geo else None)

    def fetch(
        self,
        ns: Namespace,
        tokens: Sequence[int],
        salt: str | bytes | None = None,
        limit: int | None = None,
        plan: RestorePlan | None = None,
    ) -> tuple[list | None, int]:
        """Longest valid prefix, restored. Bad files are dropped and the search retried.

        Never raises for a bad file: the worst outcome is a miss.

        Args:
            plan: the caller's :meth:`longest_prefix` result for these arguments,
                so the first attempt doesn't walk the index again.

        Returns:
            ``(cache or None, tokens covered)``.
        """
        for _ in range(8):
            if plan is None:
                plan = self.longest_prefix(ns, tokens, salt=salt, limit=limit)
            if plan.damaged:
                self.counters["corrupt_records"] += len(plan.damaged)
                for rid in plan.damaged:
                    log.warning("dropping undecodable disk record %s", rid.hex())
                self._drop(plan.damaged)
            if plan.n_tokens == 0:
                return None, 0
            try:
                cache = self.restore(plan)
            except RestoreError as e:
                self.counters["corrupt_records"] += 1
                log.warning("dropping bad disk record %s: %s", e.record.id.hex(), e.reason)
                if not self._drop([e.record.id]):
                    # Can't remove it (read-only): look again, stopping before it.
                    limit = e.record.start
                plan = None
                continue
            self.touch(plan.records)
            return cache, plan.n_tokens
        return None, 0

    # --- access times -------------------------------------------------------------------

    def touch(self, records: Sequence[Record]) -> None:
        """Queues access-time updates; :meth:`flush_touches` writes them in one txn."""
        now = time.time()
        with self._touch_lock:
            for rec in records:
                t = self._touches.setdefault(rec.id, [now, 0])
                t[0] = now
                t[1] += 1

    def flush_touches(self) -> None:
        with self._touch_lock:
            pending, self._touches = self._touches, {}
        if not pending or self.readonly:
            return

        def fn(txn):
            for rid, (when, hits) in pending.items():
                self.index.touch(txn, rid, when, hits)

        self.index.write(fn)

    # --- removal and budget -------------------------------------------------------------

    def _drop(self, ids: Sequence[bytes]) -> bool:
        """Best-effort removal of bad records from a lookup path; never raises."""
        if self.readonly:
            return False
        try:
            self.remove_records(ids)
            return True
        except Exception as e:  # the caller's answer is a miss either way
            log.warning("could not remove bad disk records: %s", e)
            return False

    def remove_records(self, ids: Sequence[bytes]) -> list[Record]:
        """Deletes records (index first, commit, then files)."""

        def fn(txn):
            return [r for r in (self.index.delete(txn, rid) for rid in ids) if r is not None]

        removed = self.index.write(fn)
        for rec in removed:
            try:
                self.file_path(rec).unlink()
            except FileNotFoundError:
                pass
        return removed

    def eviction_order(self) -> list[Record]:
        """Every record in the order eviction would take them: LRU among leaves.

        Runs the real eviction in a transaction that is then aborted.
        """
        self.flush_touches()
        return self.index.dry_run(lambda txn: self.index.evict_lru(txn, -1))

    def evict_to(self, target_bytes: int) -> list[Record]:
        """Evicts least recently used leaves until stored bytes <= target.

        Victims are chosen and removed in one transaction, reading only the first
        keys of the index's eviction order: the cost grows with what is evicted,
        not with the size of the store.
        """
        with self.index.read() as txn:
            if self.index.total_bytes(txn) <= target_bytes:
                return []
        self.flush_touches()  # exact LRU: queued access times count
        removed = self.index.write(lambda txn: self.index.evict_lru(txn, target_bytes))
        for rec in removed:
            try:
                self.file_path(rec).unlink()
            except FileNotFoundError:
                pass
        self.counters["evicted_records"] += len(removed)
        self.counters["evicted_bytes"] += sum(r.nbytes for r in removed)
        return removed

    def clear(self, namespace: bytes | None = None) -> int:
        """Removes every record (of one namespace). Returns how many."""
        with self.index.read() as txn:
            ids = [
                rid
                for rid, rec in self.index.scan(txn)
                if namespace is None or rec is None or rec.namespace == namespace
            ]
        return len(self.remove_records(ids))

    # --- prewarm -----------------------------------------------------------------------

    def recent_snapshots(
        self, namespace: bytes, budget: int, salt: str | bytes | None = None
    ) -> list[StoredSnapshot]:
        """The most recently used snapshots of a namespace, newest first, within
        ``budget`` bytes of files; see :func:`tiercache.store.recent.recent_snapshots`."""
        with self.index.read() as txn:
            return recent_snapshots(
                self.index, txn, namespace, self.layer_desc(namespace), self.block_size, budget, salt
            )

    # --- budget record ------------------------------------------------------------------

    def record_budget(self) -> None:
        """Remembers this store's budget in the index, for ``tiercache stats``."""
        if not self.readonly:
            self.index.write(lambda txn: self.index.put_budget(txn, self.disk_bytes))

    def recorded_budget(self) -> int | None:
        """The budget the last process that serves from this store set (None: unlimited)."""
        with self.index.read() as txn:
            return self.index.get_budget(txn)

    # --- stats and maintenance ----------------------------------------------------------

    def total_bytes(self) -> int:
        with self.index.read() as txn:
            return self.index.total_bytes(txn)

    def n_records(self) -> int:
        with self.index.read() as txn:
            return self.index.n_records(txn)

    def stats(self) -> dict:
        """Cheap summary: records, bytes, budget (no scan)."""
        return {
            "entries": self.n_records(),
            "bytes": self.total_bytes(),
            "budget_bytes": self.disk_bytes,
            "block_size": self.block_size,
            **self.counters,
        }

    def check(self, fix: bool = False, temp_grace: float = 60.0) -> list:
        """Finds (and with ``fix`` repairs) every inconsistency; see tiercache.store.check."""
        return check_store(self, fix=fix, temp_grace=temp_grace)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush_touches()
        finally:
            self._closed = True
            self.index.close()

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

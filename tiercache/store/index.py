"""The LMDB index: the single source of truth for what the disk tier holds.

Sub-databases:

* ``records``: record id (16 bytes) -> fixed binary header + packed tokens. Blocks are
  keyed by their chain hash; tails and checkpoints by :func:`hashing.checkpoint_id`.
* ``children`` (dupsort): parent id -> child id, to extend a match into a partial
  block by comparing tokens and to know which blocks are leaves.
* ``firsttok`` (dupsort): parent id ‖ first token (4 bytes) -> child id, for every
  record with tokens. A partial-block match only needs the children that start with
  the prompt's next token, so a parent with thousands of children (the chain root)
  costs one cursor seek, not thousands of record reads. Derived from ``records``;
  :func:`tiercache.store.check.check_store` verifies and rebuilds it.
* ``namespaces``: namespace -> JSON description of the model and cache layout.
* ``modelfiles`` (dupsort): model-files fingerprint -> namespace, so a restarted
  process finds a model's namespaces before it has seen a cache.
* ``evictable``: the records that have no children (leaves), keyed by
  :func:`evict_key` = (last access, deeper first, id), so the least recently used
  leaf is the first key: choosing a victim is one cursor seek, not a scan.
  Maintained in the same transaction as every insert, delete and touch; derived
  from ``records`` and ``children``, verified and rebuilt by ``check``.
* ``meta``: ``format`` (JSON settings, checked on open), ``total_bytes``,
  ``index_layout`` (:data:`INDEX_LAYOUT`; older stores are migrated on open) and
  ``budget_bytes`` (the disk budget of the last process that set one).
* ``filehash``: memoized weight-file digests (see ``DiskStore.file_digest``).

This module is the only one that names the sub-databases: everything else goes
through :class:`Index` methods.

Records are fixed binary structs, not JSON: lookups decode one per block, and a
32K-token prompt walks 128 blocks in well under a millisecond.
"""

from __future__ import annotations

import json
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from ..errors import TiercacheError
from .hashing import unpack_tokens

KIND_BLOCK = 0
KIND_TAIL = 1  # partial block of a trimmable snapshot
KIND_CHECKPOINT = 2  # state of non-splittable layers (+ the partial block) at one position
KIND_NAMES = {KIND_BLOCK: "block", KIND_TAIL: "tail", KIND_CHECKPOINT: "checkpoint"}

_HEAD = struct.Struct("<B16s16sQQddQQI")
_TOTAL = b"total_bytes"
_FORMAT = b"format"
_LAYOUT = b"index_layout"
_BUDGET = b"budget_bytes"
#: Version of the sub-database layout. 2 added ``evictable``; a store written by
#: layout 1 is migrated (``evictable`` built from the records) when opened for writing.
INDEX_LAYOUT = 2
# Big-endian, so byte order is numeric order: last access (a positive double sorts
# as its IEEE bytes), then the complement of the position (deeper first), then id.
_EVICT = struct.Struct(">dQ16s")
_U64 = (1 << 64) - 1

T = TypeVar("T")


class IndexError_(TiercacheError):
    """The index can't be opened or used (not a store, corrupt LMDB...)."""


@dataclass
class Record:
    """One stored block, tail or checkpoint.

    Attributes:
        id: chain hash (blocks) or checkpoint id.
        kind: KIND_BLOCK, KIND_TAIL or KIND_CHECKPOINT.
        namespace: the model namespace it belongs to.
        parent: chain hash of the previous block (or the chain root).
        nbytes: file size.
        checksum: xxh3_64 of the file bytes.
        created, last_access: unix times.
        hits: restores served.
        position: tokens covered from the start of the chain up to this record's end.
        tokens: packed little-endian uint32 tokens of this record (block or tail).
    """

    id: bytes
    kind: int
    namespace: bytes
    parent: bytes
    nbytes: int
    checksum: int
    created: float
    last_access: float
    hits: int
    position: int
    tokens: bytes

    def encode(self) -> bytes:
        return (
            _HEAD.pack(
                self.kind,
                self.namespace,
                self.parent,
                self.nbytes,
                self.checksum,
                self.created,
                self.last_access,
                self.hits,
                self.position,
                len(self.tokens) // 4,
            )
            + self.tokens
        )

    @classmethod
    def decode(cls, rid: bytes, raw: bytes) -> "Record":
        if len(raw) < _HEAD.size:
            raise ValueError("record too short")
        kind, ns, parent, nbytes, checksum, created, last, hits, pos, ntok = _HEAD.unpack_from(raw)
        tokens = bytes(raw[_HEAD.size :])
        if len(tokens) != 4 * ntok or kind not in KIND_NAMES:
            raise ValueError("malformed record")
        return cls(rid, kind, ns, parent, nbytes, checksum, created, last, hits, pos, tokens)

    @property
    def token_list(self) -> list[int]:
        return unpack_tokens(self.tokens)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) // 4

    @property
    def start(self) -> int:
        """Chain position where this record's tokens begin."""
        return self.position - self.n_tokens


class Index:
    """Thin, typed access to the LMDB environment. Safe to share between threads
    and across processes (LMDB's own locking: readers never block the writer)."""

    def __init__(self, path: Path, *, readonly: bool = False, map_size: int = 1 << 30):
        self.path = path
        self.readonly = readonly
        self._grow_lock = threading.Lock()
        try:
            self.env = lmdb.open(
                str(path),
                subdir=True,
                map_size=map_size,
                max_dbs=16,
                readonly=readonly,
                create=not readonly,
                lock=True,
                readahead=False,
                max_readers=256,
                mode=0o600,
            )
        except lmdb.Error as e:
            raise IndexError_(f"cannot open LMDB index at {path}: {e}") from None
        try:
            self.records = self.env.open_db(b"records", create=not readonly)
            self.children = self.env.open_db(b"children", dupsort=True, create=not readonly)
            self.firsttok = self.env.open_db(b"firsttok", dupsort=True, create=not readonly)
            self.namespaces = self.env.open_db(b"namespaces", create=not readonly)
            self.modelfiles = self.env.open_db(b"modelfiles", dupsort=True, create=not readonly)
            self.meta = self.env.open_db(b"meta", create=not readonly)
            # Weight-file digests by (path, size, mtime, inode): hashing a model's
            # weights in full is paid once, not at every start.
            self.filehash = self.env.open_db(b"filehash", create=not readonly)
        except lmdb.Error as e:
            self.env.close()
            raise IndexError_(f"{path} is not a tiercache index: {e}") from None
        try:
            self.evictable = self.env.open_db(b"evictable", create=not readonly)
        except lmdb.Error:
            self.evictable = None  # read-only view of a layout-1 store: not migrated yet

    # --- transactions -------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read-only snapshot; adopts a map grown by another process."""
        try:
            txn = self.env.begin(write=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            txn = self.env.begin(write=False)
        try:
            yield txn
        finally:
            txn.abort()

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Runs ``fn`` in a write transaction; grows the map and retries when full."""
        if self.readonly:
            raise IndexError_("store opened read-only")
        for _ in range(40):
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.MapFullError:
                with self._grow_lock:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
        raise IndexError_("LMDB map could not be grown")

    def dry_run(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in a write transaction that is aborted: what it would do, undone."""
        if self.readonly:
            raise IndexError_("store opened read-only")
        txn = self.env.begin(write=True)
        try:
            return fn(txn)
        finally:
            txn.abort()

    def migrate(self) -> bool:
        """Bring a store written by an older layout up to :data:`INDEX_LAYOUT`.

        Returns:
            True if the store was migrated (layout 1: ``evictable`` built).
        """
        with self.read() as txn:
            raw = txn.get(_LAYOUT, db=self.meta)
        if raw is not None and struct.unpack("<q", raw)[0] >= INDEX_LAYOUT:
            return False

        def fn(txn):
            self.rebuild_evictable(txn)
            txn.put(_LAYOUT, struct.pack("<q", INDEX_LAYOUT), db=self.meta)

        self.write(fn)
        return True

    def close(self) -> None:
        self.env.close()

    # --- records ------------------------------------------------------------------

    def get(self, txn: lmdb.Transaction, rid: bytes, starts_with: bytes | None = None) -> Record | None:
        """The record ``rid``, or None (missing or damaged).

        ``starts_with``: packed tokens the record's tokens must begin with; others
        are skipped without being decoded (fast scans of a parent's children).
        """
        raw = txn.get(rid, db=self.records)
        if raw is None:
            return None
        if starts_with is not None and not raw.startswith(starts_with, _HEAD.size):
            return None
        try:
            return Record.decode(rid, raw)
        except (ValueError, struct.error):
            return None  # a damaged record is a miss; check() reports and removes it

    def child_ids(self, txn: lmdb.Transaction, parent: bytes) -> list[bytes]:
        cur = txn.cursor(db=self.children)
        if not cur.set_key(parent):
            return []
        return list(cur.iternext_dup())

    def child_ids_starting(self, txn: lmdb.Transaction, parent: bytes, first: bytes) -> list[bytes]:
        """Children of ``parent`` whose tokens start with the packed token ``first``."""
        cur = txn.cursor(db=self.firsttok)
        if not cur.set_key(parent + first[:4]):
            return []
        return list(cur.iternext_dup())

    @staticmethod
    def firsttok_key(rec: Record) -> bytes | None:
        """Key of a record in ``firsttok`` (None for a record without tokens)."""
        return rec.parent + rec.tokens[:4] if rec.tokens else None

    def iter_records(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Raw ``(id, value)`` of every record (decode with Record.decode)."""
        cur = txn.cursor(db=self.records)
        for k, v in cur:
            yield bytes(k), bytes(v)

    def total_bytes(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_TOTAL, db=self.meta)
        return struct.unpack("<q", raw)[0] if raw else 0

    def add_total(self, txn: lmdb.Transaction, delta: int) -> None:
        txn.put(_TOTAL, struct.pack("<q", self.total_bytes(txn) + delta), db=self.meta)

    def set_total(self, txn: lmdb.Transaction, value: int) -> None:
        txn.put(_TOTAL, struct.pack("<q", value), db=self.meta)

    def has(self, txn: lmdb.Transaction, rid: bytes) -> bool:
        """True if a record is stored under ``rid`` (decodable or not)."""
        return txn.get(rid, db=self.records) is not None

    def n_records(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.records)["entries"]

    def is_leaf(self, txn: lmdb.Transaction, rid: bytes) -> bool:
        """True if no record is linked as a child of ``rid``."""
        return not txn.cursor(db=self.children).set_key(rid)

    def insert(self, txn: lmdb.Transaction, rec: Record) -> bool:
        """Adds a record and its parent link unless its id exists; counts its bytes.

        The record becomes an eviction candidate; its parent stops being one.
        """
        if not txn.put(rec.id, rec.encode(), db=self.records, overwrite=False):
            return False
        txn.put(rec.parent, rec.id, db=self.children, dupdata=True)
        key = self.firsttok_key(rec)
        if key is not None:
            txn.put(key, rec.id, db=self.firsttok, dupdata=True)
        if self.is_leaf(txn, rec.id):
            txn.put(evict_key(rec), b"", db=self.evictable)
        parent = self.get(txn, rec.parent)
        if parent is not None:
            txn.delete(evict_key(parent), db=self.evictable)
        self.add_total(txn, rec.nbytes)
        return True

    def delete(self, txn: lmdb.Transaction, rid: bytes) -> Record | None:
        """Removes a record, its parent link and its bytes from the total.

        A parent left without children becomes an eviction candidate.
        """
        raw = txn.get(rid, db=self.records)
        if raw is None:
            return None
        txn.delete(rid, db=self.records)
        try:
            rec = Record.decode(rid, raw)
        except (ValueError, struct.error):
            return None
        txn.delete(rec.parent, rid, db=self.children)
        key = self.firsttok_key(rec)
        if key is not None:
            txn.delete(key, rid, db=self.firsttok)
        txn.delete(evict_key(rec), db=self.evictable)
        parent = self.get(txn, rec.parent)
        if parent is not None and self.is_leaf(txn, parent.id):
            txn.put(evict_key(parent), b"", db=self.evictable)
        self.add_total(txn, -rec.nbytes)
        return rec

    def delete_raw(self, txn: lmdb.Transaction, rid: bytes) -> None:
        """Removes an undecodable record's bytes (``check`` repairs links after)."""
        txn.delete(rid, db=self.records)

    def touch(self, txn: lmdb.Transaction, rid: bytes, when: float, hits: int) -> None:
        """Moves a record's last access forward (re-keying it if it is a leaf)."""
        raw = txn.get(rid, db=self.records)
        if raw is None:
            return
        try:
            rec = Record.decode(rid, raw)
        except (ValueError, struct.error):
            return
        old = evict_key(rec)
        rec.last_access = max(rec.last_access, when)
        rec.hits += hits
        txn.put(rid, rec.encode(), db=self.records)
        if txn.delete(old, db=self.evictable):
            txn.put(evict_key(rec), b"", db=self.evictable)

    # --- eviction -------------------------------------------------------------------

    def evict_lru(self, txn: lmdb.Transaction, target_bytes: int) -> list[Record]:
        """Deletes least recently used leaves until the stored bytes are <= target.

        Costs O(victims x log N): each victim is the first key of ``evictable``. A
        parent whose last child goes becomes a candidate at once, so a snapshot's
        chain goes leaf to root, and a block never goes while a descendant stays.

        Returns:
            The deleted records, in eviction order (unlink their files after commit).
        """
        total = self.total_bytes(txn)
        out: list[Record] = []
        cur = txn.cursor(db=self.evictable)
        while total > target_bytes and cur.first():
            key = bytes(cur.key())
            rid = key[-16:]
            rec = self.get(txn, rid)
            if rec is None or evict_key(rec) != key or not self.is_leaf(txn, rid):
                txn.delete(key, db=self.evictable)  # stale key: heal, never evict a parent
                if rec is not None and self.is_leaf(txn, rid):
                    txn.put(evict_key(rec), b"", db=self.evictable)
                continue
            self.delete(txn, rid)
            total -= rec.nbytes
            out.append(rec)
        return out

    def iter_leaves(self, txn: lmdb.Transaction, newest_first: bool = False) -> Iterator[Record]:
        """Leaf records by last access (oldest first, or newest first)."""
        if self.evictable is None:
            return
        cur = txn.cursor(db=self.evictable)
        it = cur.iterprev(values=False) if newest_first else cur.iternext(values=False)
        for key in it:
            rec = self.get(txn, bytes(key)[-16:])
            if rec is not None:
                yield rec

    def rebuild_evictable(self, txn: lmdb.Transaction) -> None:
        """Rebuilds ``evictable`` from the records and child links in ``txn``."""
        txn.drop(self.evictable, delete=False)
        for rid, rec in self.scan(txn):
            if rec is not None and self.is_leaf(txn, rid):
                txn.put(evict_key(rec), b"", db=self.evictable)

    def rebuild_derived(self, txn: lmdb.Transaction) -> None:
        """Rebuilds the derived sub-databases (``firsttok``, ``evictable``) in ``txn``."""
        txn.drop(self.firsttok, delete=False)
        for rid, rec in self.scan(txn):
            if rec is not None and rec.tokens:
                txn.put(self.firsttok_key(rec), rid, db=self.firsttok, dupdata=True)
        self.rebuild_evictable(txn)

    def rebuild_from(self, txn: lmdb.Transaction, records: dict[bytes, Record]) -> None:
        """Rebuilds child links, the derived sub-databases and the byte counter from ``records``.

        Used by repair, inside the transaction that decided which records stay.
        """
        txn.drop(self.children, delete=False)
        for rid, rec in records.items():
            txn.put(rec.parent, rid, db=self.children, dupdata=True)
        self.rebuild_derived(txn)
        self.set_total(txn, sum(r.nbytes for r in records.values()))

    # --- read views (check, inspect, the CLI) ------------------------------------------

    def scan(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, Record | None]]:
        """``(id, record or None if undecodable)`` for every record, in id order."""
        for rid, raw in self.iter_records(txn):
            try:
                yield rid, Record.decode(rid, raw)
            except (ValueError, struct.error):
                yield rid, None

    def child_links(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(parent, child)`` link."""
        cur = txn.cursor(db=self.children)
        for parent, child in cur.iternext(keys=True, values=True):
            yield bytes(parent), bytes(child)

    def first_token_links(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(parent ‖ first token, child)`` entry of ``firsttok``."""
        cur = txn.cursor(db=self.firsttok)
        for key, child in cur.iternext(keys=True, values=True):
            yield bytes(key), bytes(child)

    def evictable_keys(self, txn: lmdb.Transaction) -> set[bytes]:
        """Every key of ``evictable`` (empty for an unmigrated read-only store)."""
        if self.evictable is None:
            return set()
        return {bytes(k) for k in txn.cursor(db=self.evictable).iternext(values=False)}

    def unlink_child(self, txn: lmdb.Transaction, parent: bytes, child: bytes) -> None:
        txn.delete(parent, child, db=self.children)

    def link_child(self, txn: lmdb.Transaction, parent: bytes, child: bytes) -> None:
        txn.put(parent, child, db=self.children, dupdata=True)

    # --- meta and namespaces ------------------------------------------------------------

    def get_format(self, txn: lmdb.Transaction) -> dict | None:
        raw = txn.get(_FORMAT, db=self.meta)
        return json.loads(raw) if raw else None

    def put_format(self, txn: lmdb.Transaction, fmt: dict) -> None:
        txn.put(_FORMAT, json.dumps(fmt, sort_keys=True).encode(), db=self.meta)

    def get_namespace(self, txn: lmdb.Transaction, ns: bytes) -> dict | None:
        raw = txn.get(ns, db=self.namespaces)
        return json.loads(raw) if raw else None

    def put_namespace(self, txn: lmdb.Transaction, ns: bytes, desc: dict, files_fp: bytes) -> None:
        txn.put(ns, json.dumps(desc, sort_keys=True).encode(), db=self.namespaces)
        txn.put(files_fp, ns, db=self.modelfiles, dupdata=True)

    def namespaces_for_files(self, txn: lmdb.Transaction, files_fp: bytes) -> list[bytes]:
        cur = txn.cursor(db=self.modelfiles)
        if not cur.set_key(files_fp):
            return []
        return [bytes(v) for v in cur.iternext_dup()]

    def get_budget(self, txn: lmdb.Transaction) -> int | None:
        raw = txn.get(_BUDGET, db=self.meta)
        return struct.unpack("<q", raw)[0] if raw else None

    def put_budget(self, txn: lmdb.Transaction, budget: int | None) -> None:
        if budget is None:
            txn.delete(_BUDGET, db=self.meta)
        else:
            txn.put(_BUDGET, struct.pack("<q", budget), db=self.meta)

    def get_file_digest(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        raw = txn.get(key, db=self.filehash)
        return bytes(raw) if raw is not None else None

    def put_file_digest(self, txn: lmdb.Transaction, key: bytes, digest: bytes) -> None:
        txn.put(key, digest, db=self.filehash)

    def all_namespaces(self, txn: lmdb.Transaction) -> dict[bytes, dict]:
        out = {}
        for k, v in txn.cursor(db=self.namespaces):
            try:
                out[bytes(k)] = json.loads(v)
            except ValueError:
                out[bytes(k)] = {"error": "unreadable description"}
        return out


def evict_key(rec: Record) -> bytes:
    """A record's key in ``evictable``: LRU first, deeper first on equal times."""
    return _EVICT.pack(max(0.0, rec.last_access), _U64 - rec.position, rec.id)

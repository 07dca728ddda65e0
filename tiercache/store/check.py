"""Finds and repairs every inconsistency between the LMDB index and the files.

Problems found: leftover temp files, orphan files (no record), symlinks where files
should be, records whose file is missing, has the wrong size or fails its checksum,
undecodable records, tensors that don't fit their namespace's cache geometry
(head count, head size, dtype), records whose parent block is gone, child links pointing to
nothing, records missing their child link, a stale eviction order, and drift of the byte
counter.
``fix=True`` repairs all of them, so a second ``check()`` returns nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import layers as L
from .blockfile import TEMP_MARK, BlockFileError, HashingReader, list_files
from .hashing import checkpoint_id, next_hash, unpack_tokens
from .layout import BLOCKS_DIR, CHECKPOINTS_DIR
from .index import KIND_BLOCK, KIND_NAMES, Index, Record, evict_key


@dataclass
class Problem:
    """One inconsistency.

    Attributes:
        kind: ``temp_file``, ``orphan_file``, ``symlink``, ``missing_file``,
            ``size_mismatch``, ``checksum_mismatch``, ``bad_record``,
            ``hash_mismatch`` (tokens do not hash to the record's id),
            ``geometry_mismatch`` (tensors of another shape than the namespace's
            recorded cache geometry), ``dangling_parent``,
            ``dangling_child``, ``missing_link``, ``prefix_link``
            (first-token index entry stale or missing), ``evict_order``
            (eviction-order entries stale or missing) or ``byte_drift``.
        target: the file path or record id (hex) concerned.
        detail: a human-readable explanation.
    """

    kind: str
    target: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _verify_file(path: Path, rec: Record, geometry: list | None = None) -> tuple[str, str] | None:
    if path.is_symlink():
        return "symlink", "a symlink stands where the file should be"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing_file", "file is missing"
    if size != rec.nbytes:
        return "size_mismatch", f"file has {size} bytes, record says {rec.nbytes}"
    try:
        r = HashingReader(path, rec.nbytes)
        try:
            misfit = geometry is not None and _geometry_misfit(r, geometry)
            r.finish(rec.checksum)
        finally:
            r.close()
    except BlockFileError as e:
        kind = "checksum_mismatch" if "checksum" in str(e) else "size_mismatch"
        return kind, str(e)
    if misfit:
        return "geometry_mismatch", misfit
    return None


def _geometry_misfit(r: HashingReader, geometry: list) -> str | None:
    """Why a file's tensors don't fit its namespace's geometry (None if they do)."""
    for name in r.tensors_in_order():
        dt, shape, _, _ = r.tensor_info(name)
        misfit = L.geometry_misfit(geometry, name, dt, shape)
        if misfit:
            return misfit
    return None


def _record_id(rec: Record) -> bytes:
    """The id a record must have: its chain hash (blocks) or checkpoint id."""
    if rec.kind == KIND_BLOCK:
        return next_hash(rec.parent, rec.tokens)
    return checkpoint_id(rec.parent, unpack_tokens(rec.tokens))


def check_store(store, fix: bool = False, temp_grace: float = 60.0) -> list[Problem]:
    """Check a :class:`tiercache.store.disk.DiskStore`; safe beside running writers.

    The index is read in one snapshot and the files scanned after it, so a writer
    committing in between would make its new files look like orphans. Findings are
    therefore settled against a fresh read of the index, and the repair judges
    everything again inside its own write transaction (see :func:`_repair`).

    Args:
        store: the store.
        fix: repair what is found (delete bad records first, then files).
        temp_grace: temp files, and files without a record, younger than this many
            seconds belong to a writer that may still be running (a save renames
            its files into place before it commits their records) and are left alone.

    Returns:
        The problems found (before repair).
    """
    store.flush_touches()
    problems: list[Problem] = []
    recs, bad_keys, links, first_links, evict_keys, total = _snapshot(store.index, problems)
    on_disk, junk = _scan_files(store, temp_grace, problems)
    remove = _judge_records(store, recs, on_disk, problems)
    orphans = _settle(store, recs, problems, list(on_disk.values()), temp_grace)
    for p in orphans:
        problems.append(Problem("orphan_file", str(p), "file has no record"))
    _judge_links(recs, links, first_links, evict_keys, store.index.evictable is not None, total,
                 problems)
    if fix and problems:
        _repair(store, {rid: recs[rid] for rid in remove}, bad_keys, orphans, junk, temp_grace)
    return problems


def _snapshot(ix, problems: list[Problem]):
    """Records, undecodable keys, child links, first-token links and the byte
    counter, all from one read transaction."""
    recs: dict[bytes, Record] = {}
    bad_keys: list[bytes] = []
    with ix.read() as txn:
        for rid, rec in ix.scan(txn):
            if rec is not None:
                recs[rid] = rec
            else:
                problems.append(Problem("bad_record", rid.hex(), "record cannot be decoded"))
                bad_keys.append(rid)
        links = list(ix.child_links(txn))
        first_links = set(ix.first_token_links(txn))
        evict_keys = ix.evictable_keys(txn)
        total = ix.total_bytes(txn)
    return recs, bad_keys, links, first_links, evict_keys, total


def _scan_files(store, temp_grace: float, problems: list[Problem]) -> tuple[dict[str, Path], list[Path]]:
    """Block and checkpoint files (by path), and junk: symlinks and old temp files."""
    now = time.time()
    on_disk: dict[str, Path] = {}
    junk: list[Path] = []
    for folder in (BLOCKS_DIR, CHECKPOINTS_DIR):
        for p in list_files(store.path / folder):
            if p.is_symlink():
                problems.append(Problem("symlink", str(p), "symlink inside the store"))
                junk.append(p)
            elif TEMP_MARK in p.name:
                try:
                    age = now - p.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age >= temp_grace:
                    problems.append(Problem("temp_file", str(p), "leftover temp file"))
                    junk.append(p)
            elif p.is_file():
                on_disk[str(p)] = p
    return on_disk, junk


def _judge_records(store, recs, on_disk, problems) -> dict[bytes, str]:
    """Records against their files, their namespace's geometry and their parents;
    takes each record's file out of ``on_disk``. Returns the records to remove."""
    geometry = {ns: (d.get("geometry") or {}).get("layers") for ns, d in store.namespaces().items()}
    remove: dict[bytes, str] = {}
    for rid, rec in recs.items():
        path = store.file_path(rec)
        on_disk.pop(str(path), None)
        if _record_id(rec) != rid:
            problems.append(Problem("hash_mismatch", rid.hex(), "id is not the hash of the record's tokens"))
            remove[rid] = "hash_mismatch"
            continue
        issue = _verify_file(path, rec, geometry.get(rec.namespace))
        if issue:
            problems.append(Problem(issue[0], rid.hex(), f"{KIND_NAMES[rec.kind]}: {issue[1]}"))
            remove[rid] = issue[0]
    # A record whose parent block is gone (or is going) can never be reached:
    # walk by position so removals propagate down the chain in one pass.
    for rid, rec in sorted(recs.items(), key=lambda kv: kv[1].position):
        if rid in remove or rec.start == 0:
            continue
        parent = recs.get(rec.parent)
        if parent is None or parent.kind != KIND_BLOCK or rec.parent in remove:
            if parent is None:
                problems.append(Problem("dangling_parent", rid.hex(), "parent block is missing"))
            remove[rid] = "dangling_parent"
    return remove


def _judge_links(recs, links, first_links, evict_keys, evictable, total, problems) -> None:
    """Child links, first-token links and the byte counter against the records."""
    link_set = set(links)
    for parent, child in links:
        rec = recs.get(child)
        if rec is None or rec.parent != parent:
            problems.append(Problem("dangling_child", child.hex(), f"link from {parent.hex()} to nothing"))
    for rid, rec in recs.items():
        if (rec.parent, rid) not in link_set:
            problems.append(Problem("missing_link", rid.hex(), "record is not linked from its parent"))
    want_first = {(Index.firsttok_key(rec), rid) for rid, rec in recs.items() if rec.tokens}
    for key, child in sorted(first_links - want_first):
        problems.append(Problem("prefix_link", child.hex(), "first-token link to nothing"))
    for key, child in sorted(want_first - first_links):
        problems.append(Problem("prefix_link", child.hex(), "record missing its first-token link"))

    parents = {parent for parent, child in links if child in recs}
    want_evict = {evict_key(rec) for rid, rec in recs.items() if rid not in parents}
    if evictable and want_evict != evict_keys:
        problems.append(Problem("evict_order", "evictable",
                                f"{len(evict_keys ^ want_evict)} eviction-order entries stale or missing"))

    expected = sum(r.nbytes for r in recs.values())
    if expected != total:
        problems.append(Problem("byte_drift", "total_bytes", f"counter {total} != records {expected}"))


_RECORD_KINDS = {
    "missing_file", "size_mismatch", "checksum_mismatch", "hash_mismatch", "geometry_mismatch",
    "dangling_parent",
}


def _same(a: Record | None, b: Record) -> bool:
    """Whether ``a`` is still the record ``b`` (not removed, nor removed and saved again)."""
    return a is not None and (a.created, a.checksum, a.nbytes, a.parent, a.tokens) == (
        b.created, b.checksum, b.nbytes, b.parent, b.tokens
    )


def _settle(store, recs, problems, candidates, temp_grace) -> list[Path]:
    """Drop findings a concurrent writer explains, from a fresh read of the index.

    A record evicted or replaced since the snapshot is not a problem any more, and
    nor is its parent's absence. Returns the orphan files: candidates that no
    record names now and that are older than ``temp_grace``.
    """
    ix = store.index
    now = time.time()
    orphans = []
    with ix.read() as txn:
        kept = []
        for p in problems:
            if p.kind in _RECORD_KINDS:
                rid = bytes.fromhex(p.target)
                if not _same(ix.get(txn, rid), recs[rid]):
                    continue
            kept.append(p)
        problems[:] = kept
        for path in candidates:
            if _indexed(ix, txn, path) or _young(path, now, temp_grace):
                continue
            orphans.append(path)
    return orphans


def _indexed(ix, txn, path: Path) -> bool:
    """Whether a record names this file now (files are named by their record id)."""
    try:
        rid = bytes.fromhex(path.name.split(".")[0])
    except ValueError:
        return False
    return bool(rid) and ix.has(txn, rid)


def _young(path: Path, now: float, grace: float) -> bool:
    try:
        return now - path.lstat().st_mtime < grace
    except FileNotFoundError:
        return True  # gone already: nothing to judge


def _reap(path: Path, grace: float) -> None:
    """Unlink an orphan file unless a writer has just renamed a file of that name
    into place. The caller holds the index's write transaction, so no save can
    commit a record for it meanwhile; moving the file aside first means the age
    judged is the age of the very file unlinked."""
    aside = path.with_name(path.name + TEMP_MARK + "reap")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _young(aside, time.time(), grace):
        os.rename(aside, path)  # a save's file: put it back for its commit
        return
    try:
        os.unlink(aside)
    except FileNotFoundError:
        pass


def _repair(store, remove: dict[bytes, Record], bad_keys, orphans, junk, temp_grace) -> None:
    """Repair in ONE write transaction, judging against what the index holds then.

    Records found bad are removed only if they are still the records that were
    checked; records left without a parent (by those removals or by anyone else)
    go too; the child links, the first-token links and the byte counter are
    rebuilt from the records the transaction holds; orphan files are judged against
    that same transaction. Files of removed records go after the commit.
    """
    ix = store.index

    def fn(txn):
        removed = []
        for rid in bad_keys:
            if ix.has(txn, rid) and ix.get(txn, rid) is None:
                ix.delete_raw(txn, rid)
        for rid, rec in remove.items():
            if _same(ix.get(txn, rid), rec):
                ix.delete_raw(txn, rid)
                removed.append(rec)
        current = {rid: rec for rid, rec in ix.scan(txn) if rec is not None}
        for rid, rec in sorted(current.items(), key=lambda kv: kv[1].position):
            parent = current.get(rec.parent)
            if rec.start and (parent is None or parent.kind != KIND_BLOCK):
                ix.delete_raw(txn, rid)
                removed.append(current.pop(rid))
        # Child links, first-token links, the eviction order and the byte counter
        # are derived: rebuild them from the records this transaction sees.
        ix.rebuild_from(txn, current)
        for p in orphans:
            if not _indexed(ix, txn, p):
                _reap(p, temp_grace)
        return removed

    removed = ix.write(fn)
    # Files go only after the index no longer points at them.
    for rec in removed:
        path = store.file_path(rec)
        try:
            if path.is_symlink() or path.exists():
                os.unlink(path)
        except FileNotFoundError:
            pass
    for p in junk:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


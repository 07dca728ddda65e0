"""Finds and repairs every inconsistency between the LMDB index and the files.

Problems found: leftover temp files, orphan files (no record), symlinks where files
should be, records whose file is missing, has the wrong size or fails its checksum,
undecodable records, records whose parent block is gone, child links pointing to
nothing, records missing their child link, a stale eviction order, and drift of the byte
counter.
``fix=True`` repairs all of them, so a second ``check()`` returns nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
            ``hash_mismatch`` (tokens do not hash to the record's id), ``dangling_parent``,
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


def _verify_file(path: Path, rec: Record) -> tuple[str, str] | None:
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
        r.finish(rec.checksum)
    except BlockFileError as e:
        kind = "checksum_mismatch" if "checksum" in str(e) else "size_mismatch"
        return kind, str(e)
    return None


def _record_id(rec: Record) -> bytes:
    """The id a record must have: its chain hash (blocks) or checkpoint id."""
    if rec.kind == KIND_BLOCK:
        return next_hash(rec.parent, rec.tokens)
    return checkpoint_id(rec.parent, unpack_tokens(rec.tokens))


def check_store(store, fix: bool = False, temp_grace: float = 60.0) -> list[Problem]:
    """Checks a :class:`tiercache.store.disk.DiskStore`.

    Args:
        store: the store.
        fix: repair what is found (delete bad records first, then files).
        temp_grace: temp files younger than this many seconds belong to a writer
            that may still be running and are left alone.

    Returns:
        The problems found (before repair).
    """
    store.flush_touches()
    ix = store.index
    problems: list[Problem] = []
    bad_keys: list[bytes] = []
    recs: dict[bytes, Record] = {}
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

    # Files on disk.
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

    # Records against their files and parents.
    remove: dict[bytes, str] = {}
    for rid, rec in recs.items():
        path = store.file_path(rec)
        on_disk.pop(str(path), None)
        if _record_id(rec) != rid:
            problems.append(Problem("hash_mismatch", rid.hex(), "id is not the hash of the record's tokens"))
            remove[rid] = "hash_mismatch"
            continue
        issue = _verify_file(path, rec)
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
    for p in on_disk.values():
        problems.append(Problem("orphan_file", str(p), "file has no record"))
        junk.append(p)

    link_set = set(links)
    bad_links = []
    for parent, child in links:
        rec = recs.get(child)
        if rec is None or rec.parent != parent:
            problems.append(Problem("dangling_child", child.hex(), f"link from {parent.hex()} to nothing"))
            bad_links.append((parent, child))
    missing_links = [
        (rec.parent, rid) for rid, rec in recs.items() if (rec.parent, rid) not in link_set
    ]
    for parent, rid in missing_links:
        problems.append(Problem("missing_link", rid.hex(), "record is not linked from its parent"))

    want_first = {
        (Index.firsttok_key(rec), rid) for rid, rec in recs.items() if rec.tokens
    }
    for key, child in sorted(first_links - want_first):
        problems.append(Problem("prefix_link", child.hex(), "first-token link to nothing"))
    for key, child in sorted(want_first - first_links):
        problems.append(Problem("prefix_link", child.hex(), "record missing its first-token link"))

    parents = {parent for parent, child in links if child in recs}
    want_evict = {evict_key(rec) for rid, rec in recs.items() if rid not in parents}
    if ix.evictable is not None and want_evict != evict_keys:
        problems.append(Problem("evict_order", "evictable",
                                f"{len(evict_keys ^ want_evict)} eviction-order entries stale or missing"))

    expected = sum(r.nbytes for r in recs.values())
    if expected != total:
        problems.append(Problem("byte_drift", "total_bytes", f"counter {total} != records {expected}"))

    if fix and problems:
        _repair(store, recs, remove, bad_keys, bad_links, missing_links, junk)
    return problems


def _repair(store, recs, remove, bad_keys, bad_links, missing_links, junk) -> None:
    ix = store.index

    def fn(txn):
        for rid in bad_keys:
            ix.delete_raw(txn, rid)
        for parent, child in bad_links:
            ix.unlink_child(txn, parent, child)
        for rid in remove:
            rec = recs[rid]
            ix.delete_raw(txn, rid)
            ix.unlink_child(txn, rec.parent, rid)
        for parent, rid in missing_links:
            if rid not in remove:
                ix.link_child(txn, parent, rid)
        kept = sum(r.nbytes for rid, r in recs.items() if rid not in remove)
        # The first-token index and the eviction order are derived: rebuild them
        # from the records and links kept.
        ix.rebuild_derived(txn)
        ix.set_total(txn, kept)

    ix.write(fn)
    # Files go only after the index no longer points at them.
    for rid in remove:
        path = store.file_path(recs[rid])
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

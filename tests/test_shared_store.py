"""Tools and servers sharing one store: `verify --fix` beside a live writer, and
`clear`/`evict` racing a save (issue 16, defects 1 and 3).

Races are made deterministic by injecting the other party's operation at the exact
point of the window (monkeypatching the function that runs there), plus one short
live run with real threads.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

import tiercache.store.check as check_mod
import tiercache.store.disk as disk_mod
from tiercache.store import layers as L
from tiercache.store.disk import DiskStore

B = 16


def _kv(tokens) -> np.ndarray:
    """K/V content that is a pure function of the tokens (restores are checkable)."""
    t = np.asarray(tokens, dtype=np.float32)[None, None, :, None]
    h = np.arange(2, dtype=np.float32)[None, :, None, None]
    d = np.arange(8, dtype=np.float32)[None, None, None, :]
    return (t * 0.5 + h * 3.0 + d * 0.01).astype(np.float32)


def _cache(tokens) -> list:
    out = []
    for _ in range(2):
        c = KVCache()
        a = mx.array(_kv(tokens))
        c.update_and_fetch(a, a + 1)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def _tokens(i: int, n: int = 5 * B + 3) -> list[int]:
    return [(i * 131 + j * 7) % 997 + 3 for j in range(n)]


def _store(path) -> tuple[DiskStore, bytes]:
    store = DiskStore(path, block_size=B)
    ns = store.register_namespace(b"s" * 16, L.describe_cache(_cache([5, 6])), {"t": 1})
    return store, ns


def _assert_restores(store, ns, toks) -> None:
    cache, n = store.fetch(ns, toks)
    assert n == len(toks)
    for layer in cache:
        np.testing.assert_array_equal(np.array(layer.keys[..., :n, :]), _kv(toks))
        np.testing.assert_array_equal(np.array(layer.values[..., :n, :]), _kv(toks) + 1)


def _files(store) -> int:
    return sum(1 for p in (store.path / "blocks").rglob("*") if p.is_file()) + sum(
        1 for p in (store.path / "checkpoints").rglob("*") if p.is_file()
    )


# --------------------------------------------------------------- defect 1: live repair


def test_fix_keeps_a_save_committed_between_snapshot_and_file_scan(tmp_path, monkeypatch):
    """A save lands after check's index snapshot, before its file scan. Before the
    fix the repair unlinked the new files as orphans and rebuilt the first-token
    links and the byte counter from the stale snapshot."""
    store, ns = _store(tmp_path / "s")
    first, late = _tokens(1), _tokens(2)
    store.save(ns, first, _cache(first))
    # A real problem, so that the repair runs.
    store.index.write(lambda txn: store.index.add_total(txn, 123))
    real_list_files = check_mod.list_files
    injected = []

    def save_then_list(folder):
        if not injected:
            injected.append(store.save(ns, late, _cache(late)))
        return real_list_files(folder)

    monkeypatch.setattr(check_mod, "list_files", save_then_list)
    found = store.check(fix=True, temp_grace=0)
    monkeypatch.setattr(check_mod, "list_files", real_list_files)
    assert injected and injected[0].records_written > 0
    # The late save is not a problem: only the injected drift is.
    assert [p.kind for p in found] == ["byte_drift"], [p.to_dict() for p in found]
    assert store.check(temp_grace=0) == []
    _assert_restores(store, ns, first)
    _assert_restores(store, ns, late)
    assert _files(store) == store.n_records()
    store.close()


def test_fix_keeps_files_renamed_in_before_their_commit(tmp_path, monkeypatch):
    """A save has renamed its files into place but not committed yet when the
    repair runs: they are young, so they are left for the save to commit."""
    store, ns = _store(tmp_path / "s")
    first, late = _tokens(1), _tokens(3)
    store.save(ns, first, _cache(first))
    store.index.write(lambda txn: store.index.add_total(txn, 7))
    real_commit = DiskStore._commit
    found = []

    def repair_then_commit(self, new, result):
        if not found:
            found.extend(self.check(fix=True))  # default grace: young files stay
        return real_commit(self, new, result)

    monkeypatch.setattr(DiskStore, "_commit", repair_then_commit)
    store.save(ns, late, _cache(late))
    monkeypatch.setattr(DiskStore, "_commit", real_commit)
    assert [p.kind for p in found] == ["byte_drift"], [p.to_dict() for p in found]
    assert store.check(temp_grace=0) == []
    _assert_restores(store, ns, late)
    store.close()


def test_live_writer_and_repair_loop_end_clean(tmp_path):
    """A writer thread saves while check(fix=True) loops; nothing is lost."""
    store, ns = _store(tmp_path / "s")
    n_saves, saved, errors = 20, [], []

    def writer():
        try:
            for i in range(n_saves):
                toks = _tokens(100 + i, n=(i % 6 + 2) * B + i % 5)
                store.save(ns, toks, _cache(toks))
                saved.append(toks)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    runs, repaired = 0, []
    while runs < 3 or (t.is_alive() and runs < 40):
        repaired += store.check(fix=True)
        runs += 1
    t.join(120)
    print(f"live repair loop: {runs} runs beside {n_saves} saves")
    assert not errors, errors
    assert len(saved) == n_saves
    assert repaired == [], [p.to_dict() for p in repaired]
    assert store.check(temp_grace=0) == []
    for toks in saved:
        _assert_restores(store, ns, toks)
    store.close()


# ------------------------------------------------------ defect 3: clear racing a save


def test_clear_between_existence_read_and_commit_leaves_no_dangling_parent(
    tmp_path, monkeypatch
):
    """`save` read that the first blocks exist, then `clear` removed them before its
    commit. Before the fix the new blocks were committed under missing parents."""
    store, ns = _store(tmp_path / "s")
    short = _tokens(4, n=3 * B)
    store.save(ns, short, _cache(short))
    longer = short + _tokens(5, n=3 * B + 2)
    real_write = disk_mod.write_tensor_file
    cleared = []

    def clear_then_write(*a, **kw):
        if not cleared:
            cleared.append(store.clear())
        return real_write(*a, **kw)

    monkeypatch.setattr(disk_mod, "write_tensor_file", clear_then_write)
    res = store.save(ns, longer, _cache(longer))
    monkeypatch.setattr(disk_mod, "write_tensor_file", real_write)
    assert cleared == [3]
    # Nothing could be attached: its parents are gone, and so are its files.
    assert res.records_written == 0
    assert store.check(temp_grace=0) == []
    assert store.n_records() == 0 and store.total_bytes() == 0
    assert _files(store) == 0
    # The store is usable: the same save now stores the whole chain.
    store.save(ns, longer, _cache(longer))
    _assert_restores(store, ns, longer)
    store.close()


def test_evict_between_existence_read_and_commit_keeps_the_reachable_part(
    tmp_path, monkeypatch
):
    """Eviction removed only the leaf the save meant to extend: the blocks still
    rooted in the index are committed, the orphaned suffix is dropped."""
    store, ns = _store(tmp_path / "s")
    short = _tokens(6, n=3 * B)
    store.save(ns, short, _cache(short))
    leaf = store.eviction_order()[0]
    assert leaf.position == 3 * B
    longer = short + _tokens(7, n=2 * B + 1)
    real_write = disk_mod.write_tensor_file
    evicted = []

    def evict_then_write(*a, **kw):
        if not evicted:
            evicted.extend(store.remove_records([leaf.id]))
        return real_write(*a, **kw)

    monkeypatch.setattr(disk_mod, "write_tensor_file", evict_then_write)
    store.save(ns, longer, _cache(longer))
    monkeypatch.setattr(disk_mod, "write_tensor_file", real_write)
    assert [r.id for r in evicted] == [leaf.id]
    assert store.check(temp_grace=0) == []
    assert _files(store) == store.n_records() == 2
    assert store.longest_prefix(ns, longer).n_tokens == 2 * B
    store.close()

"""Disk budget: LRU eviction among leaves only, in an exact, asserted order."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from tiercache.store.disk import DiskStore
from tiercache.store.hashing import block_hashes, chain_root
from tiercache.store.layers import describe_cache

B = 4


def _cache(tokens):
    t = np.asarray(tokens, dtype=np.float32)
    k = mx.array(np.broadcast_to(t[None, None, :, None], (1, 1, len(t), 8)).copy())
    c = KVCache()
    c.update_and_fetch(k, -k)
    mx.eval(c.keys, c.values)
    return c


def _disk_bytes(store):
    return sum(p.stat().st_size for p in store.path.rglob("*.safetensors"))


def test_lru_leaf_first(tmp_path):
    probe = DiskStore(tmp_path / "probe", block_size=B)
    ns0 = probe.register_namespace(b"\x01" * 16, describe_cache([_cache([1])]), {})
    probe.save(ns0, [1, 2, 3, 4], [_cache([1, 2, 3, 4])])
    S = probe.total_bytes()  # every full block file has this size
    probe.close()

    budget = 5 * S
    store = DiskStore(tmp_path / "s", block_size=B, disk_bytes=budget)
    ns = store.register_namespace(b"\x01" * 16, describe_cache([_cache([1])]), {})
    root = chain_root(ns)
    snaps = {
        "A": [10, 11, 12, 13, 14, 15, 16, 17],
        "B": [20, 21, 22, 23, 24, 25, 26, 27],
        "C": [10, 11, 12, 13, 30, 31, 32, 33],  # shares A's first block
        "D": [40, 41, 42, 43, 44, 45, 46, 47],
        "E": [50, 51, 52, 53, 54, 55, 56, 57],
    }
    name = {}
    for s, toks in snaps.items():
        for i, h in enumerate(block_hashes(root, toks, B)):
            name.setdefault(h, f"{s.lower()}{i + 1}")  # c1 is a1

    def save(s):
        res = store.save(ns, snaps[s], [_cache(snaps[s])])
        assert store.total_bytes() <= budget and _disk_bytes(store) <= budget
        time.sleep(0.02)
        return res

    def fetch(s):
        cache, n = store.fetch(ns, snaps[s] + [1], limit=8)
        assert n == 8 and mx.array_equal(cache[0].keys[0, 0, : cache[0].offset, 0], mx.array(snaps[s], dtype=mx.float32)).item()
        time.sleep(0.02)

    def present():
        with store.index.read() as txn:
            return sorted(name[k] for k, _ in store.index.iter_records(txn))

    save("A")
    save("B")
    fetch("A")
    res = save("C")
    assert res.evicted == 0 and present() == ["a1", "a2", "b1", "b2", "c2"]
    # a1 is older than c2 but has a child: it can only go after c2.
    assert [name[r.id] for r in store.eviction_order()] == ["b2", "b1", "a2", "c2", "a1"]
    res = save("D")
    assert res.evicted == 2 and present() == ["a1", "a2", "c2", "d1", "d2"]
    assert store.counters["evicted_records"] == 2 and store.counters["evicted_bytes"] == 2 * S
    fetch("C")  # refreshes a1 and c2
    assert [name[r.id] for r in store.eviction_order()] == ["a2", "d2", "d1", "c2", "a1"]
    res = save("E")
    assert res.evicted == 2 and present() == ["a1", "c2", "d1", "e1", "e2"]
    # Evicted snapshots miss cleanly; a partly evicted one restores its prefix.
    assert store.longest_prefix(ns, snaps["B"] + [1]).n_tokens == 0
    assert store.longest_prefix(ns, snaps["A"] + [1]).n_tokens == 4
    assert store.longest_prefix(ns, snaps["D"] + [1]).n_tokens == 4
    assert store.check() == []
    store.close()


def test_snapshot_bigger_than_budget(tmp_path):
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = store.register_namespace(b"\x02" * 16, describe_cache([_cache([1])]), {})
    toks = list(range(3, 17))  # 3 blocks + a 2-token tail
    store.save(ns, toks[:4], [_cache(toks[:4])])
    S = store.total_bytes()
    store.clear()
    store.disk_bytes = 2 * S
    store.save(ns, toks, [_cache(toks)])
    # Leaves go first: the tail, then the last block; the first two blocks stay.
    assert store.total_bytes() <= 2 * S and _disk_bytes(store) <= 2 * S
    assert store.n_records() == 2
    assert store.longest_prefix(ns, toks).n_tokens == 8
    store.disk_bytes = 0
    store.evict_to(0)
    assert store.n_records() == 0 and _disk_bytes(store) == 0
    assert store.check() == []
    store.close()


def _filled_store(path, budget=None):
    store = DiskStore(path, block_size=B, disk_bytes=budget)
    ns = store.register_namespace(b"\x03" * 16, describe_cache([_cache([1])]), {})
    for k in range(4):
        toks = [5, 6, 7, 8] + [20 * k + i for i in range(3 + 3 * k)]  # shared first block
        store.save(ns, toks, [_cache(toks)])
        time.sleep(0.01)
    return store, ns


def test_layout_1_store_is_migrated_on_open(tmp_path):
    store, ns = _filled_store(tmp_path / "s")
    order = [r.id for r in store.eviction_order()]
    n = store.n_records()
    ix = store.index

    def downgrade(txn):  # what a store written before the eviction index looks like
        txn.drop(ix.evictable, delete=True)
        txn.delete(b"index_layout", db=ix.meta)

    ix.write(downgrade)
    store.close()
    ro = DiskStore(tmp_path / "s", readonly=True)  # read-only tools still open it
    assert ro.index.evictable is None and ro.n_records() == n
    ro.close()
    store = DiskStore(tmp_path / "s")
    assert store.index.migrate() is False  # done once, on open
    assert [r.id for r in store.eviction_order()] == order
    assert store.check() == []
    store.evict_to(0)
    assert store.n_records() == 0 and _disk_bytes(store) == 0
    store.close()


def test_check_verifies_and_rebuilds_the_eviction_order(tmp_path):
    store, ns = _filled_store(tmp_path / "s")
    order = [r.id for r in store.eviction_order()]
    ix = store.index
    with ix.read() as txn:
        first = next(iter(sorted(ix.evictable_keys(txn))))
    ix.write(lambda txn: txn.delete(first, db=ix.evictable))
    assert [p.kind for p in store.check()] == ["evict_order"]
    store.check(fix=True)
    assert store.check() == []
    assert [r.id for r in store.eviction_order()] == order
    store.close()


def test_small_overshoot_evicts_one_leaf(tmp_path):
    """One byte over budget: exactly one leaf goes, the index stays consistent."""
    store, ns = _filled_store(tmp_path / "s")
    before = store.n_records()
    target = store.total_bytes() - 1
    removed = store.evict_to(target)
    assert len(removed) == 1 and store.n_records() == before - 1
    assert store.check() == []
    store.close()

"""DiskStore.recent_snapshots: newest first, within budget, only verified chains."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from tiercache.store.disk import DiskStore
from tiercache.store.layers import describe_cache

B = 4


def _cache(tokens):
    t = np.asarray(tokens, dtype=np.float32)
    k = mx.array(np.broadcast_to(t[None, None, :, None], (1, 1, len(t), 8)).copy())
    c = KVCache()
    c.update_and_fetch(k, -k)
    mx.eval(c.keys, c.values)
    return c


def test_recent_snapshots(tmp_path):
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = store.register_namespace(b"\x04" * 16, describe_cache([_cache([1])]), {})
    snaps = {"a": [10, 11, 12, 13, 14, 15], "b": [20, 21, 22, 23, 24, 25, 26, 27], "c": [30, 31, 32]}
    for name in "abc":
        store.save(ns, snaps[name], [_cache(snaps[name])])
        time.sleep(0.01)
    store.save(ns, [40, 41, 42, 43, 44], [_cache([40, 41, 42, 43, 44])], salt="tenant")
    got = store.recent_snapshots(ns, 1 << 30)
    assert [s.tokens for s in got] == [snaps["c"], snaps["b"], snaps["a"]]  # salted one skipped
    for s in got:
        cache = store.restore(s.plan)
        assert s.plan.n_tokens == len(s.tokens) == cache[0].offset
        assert np.array_equal(np.array(cache[0].keys[0, 0, : len(s.tokens), 0]), np.array(s.tokens, np.float32))
    salted = store.recent_snapshots(ns, 1 << 30, salt="tenant")
    assert [s.tokens for s in salted] == [[40, 41, 42, 43, 44]]
    # Budget: the newest that fit, in order.
    c_bytes = got[0].nbytes
    assert [s.tokens for s in store.recent_snapshots(ns, c_bytes)] == [snaps["c"]]
    # Touching "a" makes it the newest.
    store.fetch(ns, snaps["a"] + [1], limit=6)
    store.flush_touches()
    assert store.recent_snapshots(ns, 1 << 30)[0].tokens == snaps["a"]
    # A record whose tokens don't hash to its id (fault injection: poisoning) is never returned.
    tail = got[1].plan.last or got[1].plan.chain[-1]
    ix = store.index
    rec = tail
    rec.tokens = np.asarray([99] * (len(rec.tokens) // 4), "<u4").tobytes()
    ix.write(lambda txn: txn.put(rec.id, rec.encode(), db=ix.records))
    assert snaps["b"] not in [s.tokens for s in store.recent_snapshots(ns, 1 << 30)]
    store.close()


def test_stats_reports_the_budget_the_cache_recorded(tmp_path):
    from tiercache import TieredPromptCache
    from tiercache.admin import inspect as I

    TieredPromptCache(disk_dir=tmp_path / "s", disk_bytes=123_456).close()
    with DiskStore(tmp_path / "s", readonly=True) as store:
        assert store.recorded_budget() == 123_456
        assert I.store_stats(store, I.load_view(store))["total"]["budget_bytes"] == 123_456
        assert I.store_stats(store, I.load_view(store), budget=99)["total"]["budget_bytes"] == 99
    TieredPromptCache(disk_dir=tmp_path / "s").close()  # unlimited now
    with DiskStore(tmp_path / "s", readonly=True) as store:
        assert store.recorded_budget() is None

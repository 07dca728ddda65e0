"""Reliability: kill -9 (server and library), corruption under a live cache, full
disk (ENOSPC), LMDB map-full. Slow tools live in tools/crash_test.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import mlx.core as mx
import numpy as np
import pytest
from conftest import random_tokens
from mlx_helpers import assert_warm_equals_cold, first_logits, prefilled_cache
from mlx_lm.models.cache import KVCache, make_prompt_cache

import tiercache.store.disk as disk_mod
from tiercache import TieredPromptCache
from tiercache.store.disk import DiskStore
from tiercache.store.index import KIND_BLOCK, Index, Record
from tiercache.tools.server_process import ROOT, subprocess_env

CRASH_OK = {"orphan_file", "temp_file"}
B = 16


# --------------------------------------------------------------------------- helpers


def _synthetic_kv(tokens, heads: int = 2, dim: int = 8) -> np.ndarray:
    """K/V content that is a pure function of the tokens (so restores are checkable)."""
    t = np.asarray(tokens, dtype=np.float32)[None, None, :, None]
    h = np.arange(heads, dtype=np.float32)[None, :, None, None]
    d = np.arange(dim, dtype=np.float32)[None, None, None, :]
    p = np.arange(len(tokens), dtype=np.float32)[None, None, :, None]
    return (t * 0.5 + h * 3.0 + d * 0.01 + p * 1e-3).astype(np.float32)


_SAVER = textwrap.dedent(
    """
    import random, sys
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import KVCache
    from tiercache.store import layers as L
    from tiercache.store.disk import DiskStore
    sys.path.insert(0, sys.argv[2])
    from test_reliability import _synthetic_kv, _snapshot_tokens

    store = DiskStore(sys.argv[1], block_size=16)
    first = int(sys.argv[3])
    ns = None
    for i in range(first, first + 10000):
        toks = _snapshot_tokens(i)
        cache = []
        for _ in range(2):
            c = KVCache()
            a = mx.array(_synthetic_kv(toks))
            c.update_and_fetch(a, a + 1)
            cache.append(c)
        mx.eval([c.state for c in cache])
        if ns is None:
            ns = store.register_namespace(b"f" * 16, L.describe_cache(cache), {"t": 1})
        store.save(ns, toks, cache)
        print(i, flush=True)
    """
)


def _snapshot_tokens(i: int) -> list[int]:
    """Snapshot ``i``: shares a prefix with others (dedup), then its own tokens."""
    rng = random.Random(i)
    shared = random_tokens(16 * (i % 4), seed=99)
    return shared + [rng.randrange(3, 512) for _ in range(rng.randrange(5, 90))]


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_crash_tool_three_rounds(tiny_llama_path, tmp_path):
    """tools/crash_test.py: 3 rounds of kill -9 against the real server."""
    out = tmp_path / "summary.json"
    p = subprocess.run(
        [sys.executable, "-m", "tiercache.tools.crash_test", "--rounds", "3", "--model",
         str(tiny_llama_path), "--disk-dir", str(tmp_path / "disk"), "--json-out", str(out),
         "--max-kill-delay", "1.5", "--prompts", "5", "--check-prompts", "2"],
        cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["rounds_survived"] == 3 and summary["kills"] == 3
    assert set(summary["problems_found"]) <= CRASH_OK
    assert summary["problems_after_fix"] == 0
    assert summary["outputs_compared"] > 0


def test_sigkill_during_save_loop_leaves_only_orphans(tmp_path):
    """SIGKILL a process in the middle of DiskStore.save loops, three times."""
    path = tmp_path / "store"
    reported: list[int] = []
    first = 0
    rng = random.Random(7)
    for _kill in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(ROOT / "tests"), str(first)],
            cwd=str(ROOT), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        want = rng.randrange(3, 12)
        got = []
        deadline = time.monotonic() + 90
        while len(got) < want and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            got.append(int(line))
        assert got, proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.05))  # land somewhere inside the next save
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # Lines printed before the kill but not read yet are completed saves, too.
        got += [int(x) for x in proc.stdout.read().split()]
        proc.stdout.close()
        proc.stderr.close()
        reported += got
        first = got[-1] + 1 + 1000  # the next process saves new snapshots

    with DiskStore(path) as store:
        problems = store.check(temp_grace=0)
        assert {p.kind for p in problems} <= CRASH_OK, [p.to_dict() for p in problems]
        ns = next(iter(store.namespaces()))
        for i in reported:
            toks = _snapshot_tokens(i)
            cache, n = store.fetch(ns, toks)
            assert n == len(toks), (i, n, len(toks))
            want = _synthetic_kv(toks)
            for layer in cache:
                np.testing.assert_array_equal(np.array(layer.keys[..., :n, :]), want)
                np.testing.assert_array_equal(np.array(layer.values[..., :n, :]), want + 1)
        store.check(fix=True, temp_grace=0)
        assert store.check(temp_grace=0) == []
        assert store.stats()["corrupt_records"] == 0


# --------------------------------------------------------------------------- corruption


def _cold_logits(model, prompt):
    return first_logits(model, make_prompt_cache(model), prompt)


def _plan_files(cache: TieredPromptCache, ns, toks):
    plan = cache.disk.longest_prefix(ns, toks)
    return plan, [cache.disk.file_path(r) for r in plan.records]


def test_corruption_under_live_cache(tiny_llama, tiny_llama_path, tmp_path, caplog):
    model, _ = tiny_llama
    key = "tiny"
    prompts = [random_tokens(50, seed=100 + i) for i in range(5)]
    cache = TieredPromptCache(max_size=10, disk_dir=tmp_path / "store", block_size=B)
    try:
        ns = cache.register_model(key, tiny_llama_path, model)
        for toks in prompts:
            cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        plans = [_plan_files(cache, ns, t) for t in prompts]
        for plan, files in plans:
            assert plan.n_tokens == 50 and len(files) == 4  # 3 blocks + tail

        # 0: flip bytes in the middle of block 2 (data section: checksum catches it)
        f = plans[0][1][1]
        raw = bytearray(f.read_bytes())
        for off in (len(raw) // 2, len(raw) - 5):
            raw[off] ^= 0xFF
        f.write_bytes(bytes(raw))
        # 1: truncate block 1
        f = plans[1][1][0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        # 2: delete the tail file
        plans[2][1][3].unlink()
        # 3: garbage over the LMDB record of block 2
        bad_rec = plans[3][0].chain[1].id
        cache.disk.index.write(lambda txn: txn.put(bad_rec, b"\x07garbage", db=cache.disk.index.records))
        # 4: a flipped byte in the JSON header of block 3
        f = plans[4][1][2]
        raw = bytearray(f.read_bytes())
        raw[12] ^= 0x20
        f.write_bytes(bytes(raw))

        expect_max = {0: B, 1: 0, 2: 3 * B, 3: B, 4: 2 * B}
        cache.clear("memory")
        caplog.set_level(logging.WARNING, logger="tiercache")
        nxt = [7, 9]
        for rnd in range(2):  # second round: nothing new is logged or counted
            cache.clear("memory")
            for i, toks in enumerate(prompts):
                query = toks + nxt
                got, rest = cache.fetch_nearest_cache(key, query)
                n = len(query) - len(rest)
                assert n <= expect_max[i], (i, n)
                if got is None:
                    got = make_prompt_cache(model)
                    rest = query
                np.testing.assert_allclose(
                    first_logits(model, got, rest), _cold_logits(model, query), atol=1e-4, rtol=0
                )
        stats = cache.stats()
        # Four bad files and the damaged LMDB record are each counted once.
        assert stats["disk"]["corrupt_records"] == 5, stats["disk"]
        dropped = [r for r in caplog.records if "dropping bad disk record" in r.getMessage()]
        assert len(dropped) == 4, [r.getMessage() for r in dropped]
        # The bad file records are gone from the index.
        with cache.disk.index.read() as txn:
            for i, pos in ((0, 1), (1, 0), (2, 3), (4, 2)):
                assert cache.disk.index.get(txn, plans[i][0].records[pos].id) is None
        # The damaged LMDB record was removed by the fetch that found it; check()
        # finds what is left (now-unreachable children) and fix repairs everything.
        cache.disk.check(fix=True, temp_grace=0)
        assert cache.disk.check(temp_grace=0) == []
        # Undamaged prompts re-insert and hit disk fully again.
        for toks in prompts:
            cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        cache.clear("memory")
        for toks in prompts:
            found = cache.fetch(key, toks + nxt)
            rest = found.rest
            assert len(rest) == len(nxt)
            assert found.disk_tokens == len(toks)
    finally:
        cache.close()


def test_damaged_lmdb_record_counted_and_removed_on_fetch(tmp_path):
    store = DiskStore(tmp_path / "s", block_size=B)
    toks = _snapshot_tokens(3)
    c = KVCache()
    a = mx.array(_synthetic_kv(toks))
    c.update_and_fetch(a, a)
    from tiercache.store import layers as L

    ns = store.register_namespace(b"f" * 16, L.describe_cache([c]), {})
    store.save(ns, toks, [c])
    first = store.longest_prefix(ns, toks).chain[0].id
    store.index.write(lambda txn: txn.put(first, b"junk", db=store.index.records))
    assert store.fetch(ns, toks) == (None, 0)
    try:
        assert store.stats()["corrupt_records"] == 1
        with store.index.read() as txn:
            assert txn.get(first, db=store.index.records) is None
    finally:
        store.close()


# --------------------------------------------------------------------------- full disk


def test_enospc_serves_from_memory_and_recovers(tiny_llama, tiny_llama_path, tmp_path,
                                                monkeypatch, caplog):
    model, _ = tiny_llama
    key = "tiny"
    real_write = disk_mod.write_tensor_file
    state = {"full": True, "calls": 0}

    def full_disk(path, tensors, meta):
        state["calls"] += 1
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, tensors, meta)

    monkeypatch.setattr(disk_mod, "write_tensor_file", full_disk)
    caplog.set_level(logging.WARNING, logger="tiercache")
    prompts = [random_tokens(40, seed=200 + i) for i in range(6)]
    cache = TieredPromptCache(max_size=10, disk_dir=tmp_path / "store", block_size=B)
    try:
        cache.register_model(key, tiny_llama_path, model)
        for toks in prompts:
            cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        w = cache.stats()["writer"]
        assert w["errors"] == len(prompts) and w["written"] == 0
        assert state["calls"] >= len(prompts)
        assert cache.stats()["disk"]["entries"] == 0
        failed = [r for r in caplog.records if "disk write failed" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]  # once per interval
        # Memory keeps serving, with correct results.
        for toks in prompts:
            found = cache.fetch(key, toks + [5])
            got, rest = found.prompt_cache, found.rest
            assert found.memory_tokens == len(toks) and rest == [5]
            np.testing.assert_allclose(first_logits(model, got, rest),
                                       _cold_logits(model, toks + [5]), atol=1e-4, rtol=0)
        # Space comes back: the next writes land and serve from disk.
        state["full"] = False
        for toks in prompts:
            cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        assert cache.stats()["writer"]["written"] == len(prompts)
        assert cache.stats()["disk"]["entries"] > 0
        cache.clear("memory")
        for toks in prompts:
            found = cache.fetch(key, toks + [5])
            got, rest = found.prompt_cache, found.rest
            assert found.disk_tokens == len(toks)
        assert cache.disk.check(temp_grace=0) == []
    finally:
        cache.close()


def test_enospc_inside_os_write_leaves_no_temp_files(tiny_llama, tiny_llama_path, tmp_path,
                                                     monkeypatch):
    """A write that fails mid-file (ENOSPC from the file object) removes its temp file."""
    import tiercache.store.blockfile as bf

    model, _ = tiny_llama
    key = "tiny"
    real_fsync = os.fsync
    state = {"full": True}

    def fsync(fd):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(bf.os, "fsync", fsync)
    cache = TieredPromptCache(max_size=10, disk_dir=tmp_path / "store", block_size=B)
    try:
        cache.register_model(key, tiny_llama_path, model)
        toks = random_tokens(40, seed=300)
        cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        assert cache.stats()["writer"]["errors"] == 1
        leftovers = [p for p in (tmp_path / "store").rglob("*.safetensors*") if p.is_file()]
        assert leftovers == []
        assert cache.disk.check(temp_grace=0) == []
        state["full"] = False
        cache.insert_cache(key, toks, prefilled_cache(model, toks))
        assert cache.flush(60)
        assert cache.stats()["disk"]["entries"] == 40 // B + 1
    finally:
        cache.close()


# --------------------------------------------------------------------------- map full


def test_lmdb_map_full_grows(tmp_path):
    path = tmp_path / "idx"
    path.mkdir()
    ix = Index(path, map_size=64 * 1024)
    try:
        start = ix.env.info()["map_size"]
        rng = random.Random(1)
        n = 200
        for i in range(n):
            toks = np.array([rng.randrange(512) for _ in range(256)], dtype="<u4").tobytes()
            rid = i.to_bytes(16, "little")
            rec = Record(rid, KIND_BLOCK, b"n" * 16, b"p" * 16, 10, 1, 0.0, 0.0, 0, 256, toks)
            assert ix.write(lambda txn, rec=rec: ix.insert(txn, rec))
        assert ix.env.info()["map_size"] > start
        with ix.read() as txn:
            assert txn.stat(ix.records)["entries"] == n
            assert ix.total_bytes(txn) == 10 * n
    finally:
        ix.close()
    # Reopening with the small default adopts the grown file.
    ix = Index(path, map_size=64 * 1024)
    try:
        with ix.read() as txn:
            assert txn.stat(ix.records)["entries"] == n
        assert ix.write(lambda txn: ix.insert(
            txn, Record(b"z" * 16, KIND_BLOCK, b"n" * 16, b"p" * 16, 1, 1, 0.0, 0.0, 0, 1,
                        b"\x01\x00\x00\x00")))
    finally:
        ix.close()


def test_lmdb_raw_map_full_is_what_we_handle(tmp_path):
    """Sanity: without the grow loop a 64 KiB map really fills (so the test above
    exercises the grow path, not a no-op)."""
    env = lmdb.open(str(tmp_path / "raw"), map_size=64 * 1024, max_dbs=2)
    try:
        with pytest.raises(lmdb.MapFullError):
            with env.begin(write=True) as txn:
                for i in range(200):
                    txn.put(i.to_bytes(16, "little"), b"x" * 1024)
    finally:
        env.close()


# --------------------------------------------------------------------------- faults while serving


def test_fetch_disk_failure_keeps_memory_hit(tiny_llama, tiny_llama_path, tmp_path, monkeypatch):
    """A failing disk lookup must not raise into the caller, and must not lose the
    memory entry that was handed over before the disk was asked."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=4, disk_dir=tmp_path / "d", block_size=4)
    try:
        tc.register_model("m", tiny_llama_path, model)
        toks = random_tokens(12, seed=1)
        tc.insert_cache("m", toks, prefilled_cache(model, toks))
        tc.flush()

        def boom(*a, **k):
            raise lmdb.Error("simulated LMDB failure")

        monkeypatch.setattr(tc.disk, "longest_prefix", boom)
        query = toks + random_tokens(12, seed=2)
        cache, rem = tc.fetch_nearest_cache("m", query)
        assert_warm_equals_cold(model, cache, query, rem)
        assert len(rem) == 12
        # the caller didn't re-insert: a give-back-free miss path would have lost it
    finally:
        monkeypatch.undo()
        tc.close()


def test_fetch_and_insert_after_close_do_not_raise(tiny_llama, tiny_llama_path, tmp_path):
    """Server shutdown closes the cache while the generation thread may still be
    serving a request: fetch and insert must degrade to memory-only, not raise."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=4, disk_dir=tmp_path / "d", block_size=4)
    toks = random_tokens(12, seed=3)
    key = str(tiny_llama_path)  # unregistered key naming a model folder
    tc.insert_cache(key, toks, prefilled_cache(model, toks))
    tc.close()
    query = toks + random_tokens(12, seed=4)
    cache, rem = tc.fetch_nearest_cache(key, query)
    assert_warm_equals_cold(model, cache, query, rem)
    other = str(tiny_llama_path) + "/"  # another spelling: not yet bound to a namespace
    tc.insert_cache(other, toks, prefilled_cache(model, toks))
    cache, rem = tc.fetch_nearest_cache(other, query)
    assert_warm_equals_cold(model, cache, query, rem)


def _corrupt_record_token(store_dir, position, new_token):
    """Rewrites the first token of the block record ending at ``position`` in LMDB
    (a bit flip in the index: the record stays decodable)."""
    from tiercache.store.disk import DiskStore
    from tiercache.store.index import KIND_BLOCK, Record

    st = DiskStore(store_dir)
    try:
        with st.index.read() as txn:
            recs = [Record.decode(rid, raw) for rid, raw in st.index.iter_records(txn)]
        (rec,) = [r for r in recs if r.kind == KIND_BLOCK and r.position == position]
        toks = rec.token_list
        old = toks[0]
        toks[0] = new_token
        from tiercache.store.hashing import pack_tokens

        rec.tokens = pack_tokens(toks)
        st.index.write(lambda txn: txn.put(rec.id, rec.encode(), db=st.index.records))
        return old
    finally:
        st.close()


def test_prewarm_never_serves_a_record_whose_tokens_do_not_match_its_hash(
    tiny_llama, tiny_llama_path, tmp_path
):
    """Prewarm keys memory entries by the tokens stored in LMDB records; a record
    whose tokens don't hash to its id (index damage, poisoning) must not become a
    memory entry, or the memory tier serves KV of other tokens (a wrong hit)."""
    model, _ = tiny_llama
    d = tmp_path / "d"
    toks = random_tokens(12, seed=7)
    tc = TieredPromptCache(max_size=4, disk_dir=d, block_size=4)
    tc.register_model("m", tiny_llama_path, model)
    tc.insert_cache("m", toks, prefilled_cache(model, toks))
    tc.close()
    bad = list(toks)
    bad[8] = (toks[8] + 1) % 500 + 3
    _corrupt_record_token(d, 12, bad[8])

    tc = TieredPromptCache(max_size=4, disk_dir=d, prewarm_bytes=1 << 30)
    try:
        tc.register_model("m", tiny_llama_path, model)
        assert tc.wait_prewarmed(30)
        # The damaged chain was not prewarmed: memory holds nothing.
        assert tc.stats()["memory"]["prewarmed_bytes"] == 0 and len(tc) == 0
        query = bad + random_tokens(6, seed=8)
        found = tc.fetch("m", query)
        # The disk serves the undamaged blocks [0, 8) only, exactly.
        assert found.source == "disk" and found.disk_tokens == 8
        assert_warm_equals_cold(model, found.prompt_cache, query, found.rest)
    finally:
        tc.close()

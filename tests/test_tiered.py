"""TieredPromptCache with real tiny models, real LMDB and files: budget and eviction
order, disk fallback and promotion, write-behind under a slow disk, restart, exact
hits, max_bytes on every path, threads, write policies, memory-only mode, salts and
namespaces. (Hybrid-model checkpoints: test_tiered_checkpoints.py.)"""

from __future__ import annotations

import random
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_tokens
from mlx_helpers import assert_warm_equals_cold, first_logits, prefill, prefilled_cache
from mlx_lm.models.cache import make_prompt_cache

from tiercache import FetchResult, TieredPromptCache
from tiercache.store.disk import DiskStore
from tiercache.tiers.memory import clone_prompt_cache
from tiercache.store.namespaces import model_namespace

B = 8  # block size: small so short prompts span several blocks
GEN = 12  # greedy tokens compared against a cold run


def _size(snapshot) -> int:
    return sum(c.nbytes for c in snapshot)


def _tc(tmp_path, **kw):
    kw.setdefault("block_size", B)
    return TieredPromptCache(disk_dir=tmp_path / "store", **kw)


# --------------------------------------------------------------------- the lookup result


def test_fetch_result_counts_any_tier():
    # A tier added later (say a remote one) reports under its own name; the
    # convenience properties keep meaning what they meant.
    r = FetchResult(None, [7], query_tokens=41, tokens_by_tier={"remote": 40})
    assert (r.source, r.cached_tokens, r.memory_tokens, r.disk_tokens) == ("remote", 40, 0, 0)
    miss = FetchResult(None, [1, 2], query_tokens=2)
    assert (miss.source, miss.cached_tokens) == ("none", 0)
    tc = TieredPromptCache(max_size=1)
    assert tc.wait_prewarmed(0)  # nothing to prewarm: done at once
    assert tc.fetch("k", []) == FetchResult(None, [])


# --------------------------------------------------------------------- budget and order


def test_budget_and_exact_eviction_order(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    seqs = {name: random_tokens(20 + i, seed=100 + i) for i, name in enumerate("ADBCEFGHI")}
    snaps = {n: prefilled_cache(model, t) for n, t in seqs.items()}
    S = _size(snaps["A"])
    assert all(_size(s) == S for s in snaps.values())  # same buffer size: budget in entries
    tc = _tc(tmp_path, max_size=100, max_bytes=4 * S + S // 2, handover=False)
    order = []
    inner = tc.memory.on_evict
    by_tokens = {tuple(t): n for n, t in seqs.items()}

    def record(key_, tokens, pc, ctype):
        order.append(by_tokens[tuple(tokens)])
        inner(key_, tokens, pc, ctype)

    tc.memory.on_evict = record
    types = dict(A="assistant", D="assistant", B="user", C="system", E="assistant",
                 F="user", G="user", H="system", I="system")

    def ins(name):
        tc.insert_cache(key, seqs[name], snaps[name], cache_type=types[name])
        assert tc.nbytes <= tc.max_bytes

    for n in "ADBC":
        ins(n)
    assert order == [] and len(tc) == 4
    found = tc.fetch(key, seqs["A"] + [5])  # A becomes more recent than D
    assert found.source == "memory" and found.memory_tokens == len(seqs["A"])
    ins("E")  # assistants [D, A, E] outnumber users: LRU assistant D goes
    ins("F")  # assistants [A, E] >= users [B, F]: A
    ins("G")  # assistants [E] < users [B, F, G] >= systems [C]: B
    ins("H")  # [E] < [F, G] >= [C, H]: F
    ins("I")  # [E] >= [G]: E
    assert order == ["D", "A", "B", "F", "E"]
    tc.trim_to(n_sequences=2)  # no assistants; users [G] < systems [C, H, I]: C, then H
    assert order == ["D", "A", "B", "F", "E", "C", "H"]
    assert sorted(by_tokens[t] for _, t, _, _ in tc.memory.entries()) == ["G", "I"]
    st = tc.stats()
    assert st["memory"]["evictions"] == 7 and st["disk"]["demotions"] == 7
    assert tc.stats_by_type()["user"]["n_sequences"] == 1

    # Evicted snapshots come back from disk (written through), exactly.
    assert tc.flush(30)
    for name in ("D", "B", "C"):
        q = seqs[name] + [7, 8, 9]
        found = tc.fetch(key, q)
        cache, rem = found.prompt_cache, found.rest
        assert found.source == "disk" and found.disk_tokens == len(seqs[name])
        assert tc.nbytes <= tc.max_bytes
        assert_warm_equals_cold(model, cache, q, rem, GEN)
    assert tc.stats()["disk"]["promotions"] == 3
    assert tc.close()


# --------------------------------------------------------------------- promotion


def test_disk_longer_than_memory_promotes(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    long = random_tokens(40, seed=7)
    tc = _tc(tmp_path)
    tc.insert_cache(key, long, prefilled_cache(model, long))
    assert tc.flush(30)
    tc.clear("memory")
    tc.insert_cache(key, long[:16], prefilled_cache(model, long[:16]))  # memory: 16, disk: 40
    q = long + [3, 4, 5]
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert (found.source, found.disk_tokens, found.memory_tokens) == ("disk", 40, 0)
    assert found.cached_tokens == len(q) - len(rem) == 40
    want = first_logits(model, prefilled_cache(model, long), rem)
    np.testing.assert_allclose(first_logits(model, cache, rem), want, atol=1e-4)
    # The promoted snapshot now serves the same lookup from memory.
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert (found.source, found.memory_tokens) == ("memory", 40)
    assert_warm_equals_cold(model, cache, q, rem, GEN)
    # Disk ahead by 4 tokens: the cost model decides. Reading the 40-token prefix
    # at 1 MB/s takes longer than computing 4 tokens at 10^6 tokens/s: memory wins.
    tc.insert_cache(key, long[:36], prefilled_cache(model, long[:36]))
    tc.cost_model.set_rates(disk_bytes_per_second=1e6, prefill_tokens_per_second=1e6)
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert (found.source, found.memory_tokens) == ("memory", 36)
    assert tc.stats()["disk"]["promotions"] == 1
    assert tc.close()


# --------------------------------------------------------------------- write-behind


def test_write_behind_never_blocks_and_overflow_drops(tiny_llama, tiny_llama_path, tmp_path, monkeypatch):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    seqs = [random_tokens(24, seed=200 + i) for i in range(8)]
    snaps = [prefilled_cache(model, t) for t in seqs]
    S = _size(snaps[0])
    entered, release = threading.Event(), threading.Event()
    real_save = DiskStore.save

    def slow_save(self, *a, **kw):  # fault injection: a disk that hangs
        entered.set()
        assert release.wait(60)
        return real_save(self, *a, **kw)

    monkeypatch.setattr(DiskStore, "save", slow_save)
    tc = _tc(tmp_path, writer_queue_bytes=2 * S + S // 2)
    tc.insert_cache(key, seqs[0], snaps[0])
    assert entered.wait(10)  # the writer is stuck inside save with job 0
    for t, s in zip(seqs[1:], snaps[1:]):
        tc.insert_cache(key, t, s)  # returns although the disk doesn't move
    w = tc.stats()["writer"]
    assert w["pending"] == 3 and w["queue_bytes"] == 2 * S  # 1 in save + 2 queued
    assert w["dropped_writes"] == 5 and w["written"] == 0  # oldest pending dropped
    # Snapshots still waiting (or dropped) are served from memory.
    for t in (seqs[3], seqs[7]):
        found = tc.fetch(key, t + [1])
        rem = found.rest
        assert found.source == "memory" and len(rem) == 1
    release.set()
    assert tc.flush(30)
    w = tc.stats()["writer"]
    assert (w["written"], w["dropped_writes"], w["errors"], w["pending"]) == (3, 5, 0, 0)
    assert tc.disk.check() == []
    tc.clear("memory")
    for i, t in enumerate(seqs):
        found = tc.fetch(key, t + [1])
        assert found.disk_tokens == (24 if i in (0, 6, 7) else 0)
    assert tc.close()


def test_close_drains_within_timeout(tiny_llama, tiny_llama_path, tmp_path, monkeypatch):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    seqs = [random_tokens(17, seed=300 + i) for i in range(3)]
    real_save = DiskStore.save

    def slow_save(self, *a, **kw):
        time.sleep(0.15)
        return real_save(self, *a, **kw)

    monkeypatch.setattr(DiskStore, "save", slow_save)
    tc = _tc(tmp_path)
    for t in seqs:
        tc.insert_cache(key, t, prefilled_cache(model, t))
    assert tc.close(flush_timeout=30) is True  # drained
    monkeypatch.setattr(DiskStore, "save", real_save)
    with _tc(tmp_path) as tc2:
        for t in seqs:
            found = tc2.fetch(key, t + [1])
            assert found.disk_tokens == 17
    # A timeout too short to drain: close says so, drops the rest, stays consistent.
    monkeypatch.setattr(DiskStore, "save", slow_save)
    tc3 = _tc(tmp_path)
    more = [random_tokens(17, seed=400 + i) for i in range(4)]
    for t in more:
        tc3.insert_cache(key, t, prefilled_cache(model, t))
    assert tc3.close(flush_timeout=0.05) is False
    assert tc3.writer.counters["dropped_writes"] >= 1
    monkeypatch.setattr(DiskStore, "save", real_save)
    with DiskStore(tmp_path / "store") as store:
        assert store.check() == []


# --------------------------------------------------------------------- restart


def test_restart_serves_from_disk(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = (str(tiny_llama_path), None, None)  # mlx_lm.server's key shape
    seqs = [random_tokens(n, seed=500 + n) for n in (13, 30, 45)]
    tc = _tc(tmp_path, prewarm_bytes=0)
    for t in seqs:
        tc.insert_cache(key, t, prefilled_cache(model, t))
    assert tc.close(flush_timeout=30)
    tc = _tc(tmp_path, prewarm_bytes=1 << 20)  # the index is the truth: no scan
    assert len(tc) == 0
    for t in seqs:
        q = t + [9, 10]
        found = tc.fetch(key, q)
        cache, rem = found.prompt_cache, found.rest
        assert found.source == "disk" and found.disk_tokens == len(t)
        assert_warm_equals_cold(model, cache, q, rem, GEN)
    assert tc.close()


def test_prewarm_restores_recent_snapshots_into_memory(tiny_llama, tiny_llama_path, tmp_path):
    """After a restart, prewarm (started by register_model) puts the most recently
    used snapshots back in memory: the first lookups are memory hits, exact."""
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    seqs = [random_tokens(n, seed=900 + n) for n in (20, 33, 41)]
    tc = _tc(tmp_path)
    tc.register_model(key, tiny_llama_path, model)
    for t in seqs:
        tc.insert_cache(key, t, prefilled_cache(model, t))
        time.sleep(0.01)  # distinct access times
    salted = random_tokens(25, seed=999)
    tc.insert_cache(key, salted, prefilled_cache(model, salted), salt="tenant")
    assert tc.close(flush_timeout=30)
    # Budget for about two of the three snapshots: the two most recent win.
    # Restored buffers are rounded up to 256 rows (room for the next tokens), so
    # each of these short snapshots restores to 256 rows.
    per_row = sum(2 * c.keys[..., :1, :].nbytes for c in prefilled_cache(model, seqs[0]))
    budget = 2 * 256 * per_row
    tc = _tc(tmp_path, prewarm_bytes=budget)
    assert len(tc) == 0
    tc.register_model(key, tiny_llama_path, model)
    assert tc.wait_prewarmed(60)
    st = tc.stats()["memory"]
    assert st["entries"] == 2 and 0 < st["prewarmed_bytes"] <= budget
    for t in seqs[1:]:
        q = t + [9, 10]
        found = tc.fetch(key, q)
        cache, rem = found.prompt_cache, found.rest
        assert found.source == "memory" and found.memory_tokens == len(t)
        assert_warm_equals_cold(model, cache, q, rem, GEN)
    # The oldest one and the salted tenant's come from disk (salts are never guessed).
    found = tc.fetch(key, seqs[0] + [9, 10])
    cache, rem = found.prompt_cache, found.rest
    assert found.source == "disk"
    found = tc.fetch(key, salted + [9])
    rem = found.rest
    assert found.source == "none" and len(rem) == len(salted) + 1
    assert tc.close()


# --------------------------------------------------------------------- exact hit


def test_exact_hit_leaves_a_token(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    toks = random_tokens(33, seed=11)
    tc = _tc(tmp_path)
    tc.insert_cache(key, toks, prefilled_cache(model, toks))
    for _ in range(2):  # memory hit (handed over), then the same from disk
        found = tc.fetch(key, toks)
        cache, rem = found.prompt_cache, found.rest
        assert len(rem) >= 1 and rem == toks[len(toks) - len(rem):]
        assert found.cached_tokens == len(toks) - 1
        assert_warm_equals_cold(model, cache, toks, rem, GEN)
        tc.flush(30)
    assert tc.stats()["disk"]["hits"] == 1
    cache, rem = tc.fetch_nearest_cache(key, toks[:1])  # one-token query: nothing to reuse
    assert cache is None and rem == toks[:1]
    assert tc.close()


# --------------------------------------------------------------------- max_bytes


def test_max_bytes_on_every_path(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    small = [random_tokens(20, seed=600 + i) for i in range(4)]
    big = random_tokens(300, seed=9)  # 300 tokens: a 512-row buffer, twice the size
    S = _size(prefilled_cache(model, small[0]))
    tc = _tc(tmp_path, max_bytes=2 * S + S // 2)
    for t in small:  # insert
        tc.insert_cache(key, t, prefilled_cache(model, t))
        assert tc.nbytes <= tc.max_bytes
    assert len(tc) == 2
    tc.insert_cache(key, big, prefilled_cache(model, big))  # bigger than what is left
    assert tc.nbytes <= tc.max_bytes and len(tc) == 1
    assert tc.flush(30)
    for t in small:  # promotion
        found = tc.fetch(key, t + [1])
        assert found.source in ("disk", "memory")
        assert tc.nbytes <= tc.max_bytes
    tc.trim_to(n_bytes=S)  # trim_to
    assert tc.nbytes <= S
    tc.trim_to(n_bytes=0)
    assert tc.nbytes == 0 and len(tc) == 0
    # A snapshot larger than the whole budget is never held, but persisted.
    tiny = _tc(tmp_path / "t", max_bytes=S // 2)
    tiny.insert_cache(key, small[0], prefilled_cache(model, small[0]))
    assert tiny.nbytes == 0
    tiny.flush(30)
    found = tiny.fetch(key, small[0] + [1])
    assert found.disk_tokens == 20 and tiny.nbytes <= tiny.max_bytes
    assert tiny.close() and tc.close()


# --------------------------------------------------------------------- threads


def test_threads_no_errors_no_wrong_hits(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    base = random_tokens(24, seed=42)
    # Sequences sharing prefixes of different lengths: wrong hits would be easy.
    seqs = [base[:k] + random_tokens(12 + i, seed=700 + i) for i, k in enumerate((0, 8, 8, 16, 24, 24))]
    snaps = [prefilled_cache(model, t) for t in seqs]
    S = _size(snaps[0])
    queries = [t + [5, 6] for t in seqs] + [t[: len(t) - 3] + [7] for t in seqs]
    ref_keys = [[np.array(c.keys[..., : len(q), :]) for c in prefilled_cache(model, q)] for q in queries]
    tc = _tc(tmp_path, max_bytes=2 * S, writer_queue_bytes=4 * S)
    for t, s in zip(seqs, snaps):  # the disk starts with everything, memory with little
        tc.insert_cache(key, t, s)
    assert tc.flush(30)
    tc.clear("memory")
    results, errors = [], []

    def worker(wid):
        rng = random.Random(wid)
        try:
            for _ in range(25):
                i = rng.randrange(len(seqs))
                tc.insert_cache(key, seqs[i], clone_prompt_cache(snaps[i]),
                                cache_type=rng.choice(["assistant", "user", "system"]))
                qi = rng.randrange(len(queries))
                found = tc.fetch(key, queries[qi])
                results.append((qi, found.prompt_cache, found.rest, found.source, found.cached_tokens))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 100
    assert {r[3] for r in results} >= {"memory", "disk"}
    for qi, cache, rem, src, n in results:
        q = queries[qi]
        assert n == len(q) - len(rem) and rem == q[n:] and len(rem) >= 1
        if cache is None:
            assert n == 0
            continue
        for layer, ref in zip(cache, ref_keys[qi]):  # no wrong hit: the rows are q's
            assert layer.offset == n
            np.testing.assert_allclose(np.array(layer.keys[..., :n, :]), ref[..., :n, :], atol=1e-4)
    sample = [r for r in results if r[1] is not None][::12]
    for qi, cache, rem, _, _ in sample:
        want = first_logits(model, make_prompt_cache(model), queries[qi])
        np.testing.assert_allclose(first_logits(model, cache, rem), want, atol=1e-4)
    assert tc.flush(30)
    assert tc.stats()["writer"]["errors"] == 0
    assert tc.disk.check() == []
    assert tc.close()


# --------------------------------------------------------------------- write policies


def test_write_back_persists_only_on_eviction(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    seqs = [random_tokens(20, seed=800 + i) for i in range(3)]
    tc = _tc(tmp_path, write_policy="back")
    for t in seqs:
        tc.insert_cache(key, t, prefilled_cache(model, t))
    assert tc.flush(30)
    assert tc.stats()["disk"]["entries"] == 0 and tc.stats()["writer"]["written"] == 0
    tc.trim_to(n_sequences=1)  # evicts seqs[0], seqs[1]
    assert tc.flush(30)
    assert tc.stats()["writer"]["written"] == 2
    tc.clear("memory")
    for i, t in enumerate(seqs):
        q = t + [4]
        found = tc.fetch(key, q)
        cache, rem = found.prompt_cache, found.rest
        if i < 2:
            assert found.source == "disk"
            assert_warm_equals_cold(model, cache, q, rem, GEN)
        else:
            assert cache is None and found.source == "none"
    with pytest.raises(ValueError):
        TieredPromptCache(write_policy="around")
    assert tc.close()


def test_memory_only(tiny_llama, tiny_llama_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    toks = random_tokens(30, seed=12)
    tc = TieredPromptCache(max_size=1)
    tc.insert_cache(key, toks, prefilled_cache(model, toks))
    q = toks + [1, 2]
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert found.source == "memory"
    assert_warm_equals_cold(model, cache, q, rem, GEN)
    other = random_tokens(30, seed=13)
    tc.insert_cache(key, toks, prefilled_cache(model, toks))
    tc.insert_cache(key, other, prefilled_cache(model, other))  # max_size=1: toks is gone for good
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert cache is None and rem == q and found.source == "none"
    st = tc.stats()
    assert "disk" not in st and "writer" not in st and st["memory"]["entries"] == 1
    assert tc.flush() and tc.close()


# --------------------------------------------------------------------- salts, namespaces


def test_salt_isolation(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    toks = random_tokens(26, seed=14)
    q = toks + [3]
    tc = _tc(tmp_path)
    tc.insert_cache(key, toks, prefilled_cache(model, toks), salt="tenant-a")
    assert tc.flush(30)
    for tier in ("memory", "disk"):
        assert tc.fetch_nearest_cache(key, q, salt="tenant-b")[0] is None
        assert tc.fetch_nearest_cache(key, q)[0] is None
        found = tc.fetch(key, q, salt="tenant-a")
        rem = found.rest
        assert found.source == tier and len(rem) == 1
        tc.clear("memory")
    assert tc.close()


def test_register_model_namespace_equals_auto(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    toks = random_tokens(20, seed=15)
    tc = _tc(tmp_path)
    auto_key = str(tiny_llama_path)
    tc.insert_cache(auto_key, toks, prefilled_cache(model, toks))
    assert tc.flush(30)
    auto_ns = tc.namespace_of(auto_key)
    assert tc.namespace_of("my-model") is None
    reg = tc.register_model("my-model", tiny_llama_path, model)
    assert reg == auto_ns == model_namespace(tc.disk, tiny_llama_path, model)
    # Another spelling of the same model finds the same disk entries.
    for k in ("my-model", (str(tiny_llama_path), None, None)):
        found = tc.fetch(k, toks + [2])
        rem = found.rest
        assert found.source == "disk" and len(rem) == 1
    # A key naming no model folder stays memory-only (and never hits the disk).
    found = tc.fetch("no-such-model", toks + [2])
    assert found.source == "none"
    assert tc.close()


def test_snapshot_not_matching_its_tokens_is_refused(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    toks = random_tokens(21, seed=16)
    tc = _tc(tmp_path)
    tc.insert_cache(key, toks + [5], prefilled_cache(model, toks))  # one token more than the cache holds
    assert tc.flush(30)
    cache, rem = tc.fetch_nearest_cache(key, toks + [5, 6])
    assert cache is None and tc.stats()["rejected_inserts"] == 1
    assert tc.stats()["disk"]["entries"] == 0
    assert tc.close()


def _buffer_address(layer) -> int:
    mx.eval(layer.keys)
    return np.array(layer.keys, copy=False).ctypes.data


def test_hits_decode_in_place(tiny_llama, tiny_llama_path, tmp_path):
    """A disk hit (keep_promoted=False) and a memory handover after the writer is
    done give the caller buffers with spare rows that nobody else holds: the next
    tokens are written in place, no copy of the snapshot."""
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    t = random_tokens(300, seed=77)
    tc = _tc(tmp_path, keep_promoted=False)
    tc.insert_cache(key, t, prefilled_cache(model, t))
    assert tc.flush(30)
    tc.clear("memory")
    q = t + [5, 6]
    found = tc.fetch(key, q)
    cache, rem = found.prompt_cache, found.rest
    assert found.source == "disk" and len(tc.memory) == 0
    assert all(c.keys.shape[2] % 256 == 0 and c.keys.shape[2] > c.offset for c in cache)
    before = [_buffer_address(c) for c in cache]
    out = model(mx.array([rem]), cache=cache)
    mx.eval(out)
    assert [_buffer_address(c) for c in cache] == before
    np.testing.assert_allclose(
        np.array(out[0, -1]), np.array(prefill(model, q, make_prompt_cache(model))), atol=1e-5
    )
    # Memory handover of a snapshot the writer already wrote: also in place.
    full = q + [7]
    tc.insert_cache(key, q, cache)
    assert tc.flush(30)
    found = tc.fetch(key, full)
    cache, rem = found.prompt_cache, found.rest
    assert found.source == "memory" and rem == [7]
    before = [_buffer_address(c) for c in cache]
    mx.eval(model(mx.array([rem]), cache=cache))
    assert [_buffer_address(c) for c in cache] == before
    assert tc.close()


def _fake_adapter(folder, seed):
    """An adapter folder as mlx-lm writes one (config + safetensors weights)."""
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"fine_tune_type": "lora", "num_layers": 2}')
    save_file({"lora_a": np.full((4, 4), seed, np.float32)}, str(folder / "adapters.safetensors"))
    return folder


def test_adapter_and_draft_are_part_of_the_namespace(tiny_llama, tiny_llama_path, tmp_path):
    """mlx_lm.server keys are (model, adapter, draft): a LoRA changes every layer's
    KV, so entries stored with an adapter must never serve the base model (or
    another adapter), and a draft model's cache layers belong to the layout."""
    model, _ = tiny_llama
    base = (str(tiny_llama_path), None, None)
    lora1 = (str(tiny_llama_path), str(_fake_adapter(tmp_path / "lora1", 1)), None)
    lora2 = (str(tiny_llama_path), str(_fake_adapter(tmp_path / "lora2", 2)), None)
    t = random_tokens(40, seed=31)
    tc = _tc(tmp_path)
    tc.insert_cache(lora1, t, prefilled_cache(model, t))
    assert tc.flush(30)
    tc.clear("memory")
    for other in (base, lora2):
        found = tc.fetch(other, t + [5])
        rem = found.rest
        assert found.source == "none" and len(rem) == len(t) + 1
    found = tc.fetch(lora1, t + [5])
    rem = found.rest
    assert found.source == "disk" and rem == [5]
    # register_model with the adapter binds the same namespace the key derives.
    derived = tc.namespace_of(lora1)
    assert derived is not None
    assert tc.register_model(lora1, tiny_llama_path, model, adapter_path=lora1[1]) == derived
    # A draft model adds its cache layers to the layout: main + draft layers
    # round-trip through disk as one prompt cache.
    spec = (str(tiny_llama_path), None, str(tiny_llama_path))
    tc.register_model(spec, tiny_llama_path, model, draft_model_path=spec[2], draft_model=model)
    both = prefilled_cache(model, t) + prefilled_cache(model, t)
    tc.insert_cache(spec, t, both)
    assert tc.flush(30)
    tc.clear("memory")
    found = tc.fetch(spec, t + [5])
    cache, rem = found.prompt_cache, found.rest
    assert found.source == "disk" and len(cache) == 2 * len(prefilled_cache(model, t))
    found = tc.fetch(base, t + [5])
    rem = found.rest
    assert found.source == "none"
    assert tc.close()


def test_disk_win_does_not_reinsert_a_cloned_memory_hit(tiny_llama, tiny_llama_path, tmp_path):
    """When the disk beats a memory hit that was cloned (not handed over), the clone
    must not be re-inserted: the entry is still in memory, so the "give back" only
    adds a redundant trimmed copy and evicts a useful entry to make room."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=3, disk_dir=tmp_path / "d", block_size=4, keep_promoted=False)
    try:
        tc.register_model("m", tiny_llama_path, model)
        t = random_tokens(24, seed=11)
        tc.insert_cache("m", t[:20], prefilled_cache(model, t[:20]))
        tc.flush()
        other = random_tokens(10, seed=12)
        diverging = t[:8] + random_tokens(6, seed=13)
        third = random_tokens(9, seed=14)
        for toks in (other, diverging, third):  # pushes t[:20] out of memory
            tc.insert_cache("m", toks, prefilled_cache(model, toks))
        held = {tuple(e[1]) for e in tc.memory.entries()}
        assert tuple(t[:20]) not in held and len(held) == 3
        found = tc.fetch("m", t)
        cache, rem = found.prompt_cache, found.rest
        assert found.source == "disk"
        assert_warm_equals_cold(model, cache, t, rem)
        after = {tuple(e[1]) for e in tc.memory.entries()}
        assert after == held  # nothing evicted, no redundant t[:8] entry
    finally:
        tc.close()

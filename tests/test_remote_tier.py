"""The remote tier with a real redis-server, real tiny MLX models, real LMDB and files:
two caches with separate disk dirs share one Redis. Hits across caches (trimmable
tails and hybrid-model checkpoints), copies into the local disk, poisoned entries,
Redis killed / stopped / restarted, salts and namespaces."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import random_tokens
from mlx_helpers import cold_greedy, greedy_continue, prefill
from mlx_lm.models.cache import make_prompt_cache
from server_helpers import wait_for

from tiercache import TieredPromptCache
from tiercache.remote.codec import decode, encode, namespace_pattern, record_key
from tiercache.store.index import Record

B = 8
GEN = 10


def _tc(tmp_path, name, url, **kw):
    kw.setdefault("block_size", B)
    kw.setdefault("remote_timeout_ms", 2000)  # generous: the shared CI machine is slow
    return TieredPromptCache(disk_dir=tmp_path / name, remote_url=url, **kw)


def _insert(tc, key, model, tokens, salt=None):
    cache = make_prompt_cache(model)
    prefill(model, tokens, cache)
    tc.insert_cache(key, tokens, cache, salt=salt)
    assert tc.flush(30)


def _keys(r) -> list[bytes]:
    return sorted(r.scan_iter(match=namespace_pattern()))


def test_hit_across_caches_is_exact_and_copied_to_local_disk(tiny_llama, tiny_llama_path, tmp_path,
                                                              redis_server):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url)
    a.register_model(key, tiny_llama_path, model)
    b.register_model(key, tiny_llama_path, model)
    prompt = random_tokens(45, seed=1)  # 5 blocks + a 5-token tail
    _insert(a, key, model, prompt)
    assert a.stats()["remote"]["pushed_records"] == 6
    assert len(_keys(redis_server.client())) == 6

    query = prompt + random_tokens(7, seed=2)
    found = b.fetch(key, query)
    cache, rest = found.prompt_cache, found.rest
    assert found.source == "remote" and found.remote_tokens == 45
    assert rest == query[45:]
    assert greedy_continue(model, cache, rest, GEN) == cold_greedy(model, query, GEN)
    st = b.stats()["remote"]
    assert st["hits"] == 1 and st["hit_tokens"] == 45 and st["bytes_in"] > 0
    assert st["breaker"] == "closed" and st["rejected"] == 0

    # The hit was written to b's own disk: a cache on b's folder alone serves it.
    assert b.flush(30)
    b.close()
    local = TieredPromptCache(disk_dir=tmp_path / "b", block_size=B)
    local.register_model(key, tiny_llama_path, model)
    found = local.fetch(key, query)
    cache, rest = found.prompt_cache, found.rest
    assert found.source == "disk" and found.disk_tokens == 45
    assert greedy_continue(model, cache, rest, GEN) == cold_greedy(model, query, GEN)
    local.close()
    a.close()


def test_local_blocks_are_not_fetched_again(tiny_llama, tiny_llama_path, tmp_path, redis_server):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url, max_size=0)  # no memory tier: disk then remote
    for tc in (a, b):
        tc.register_model(key, tiny_llama_path, model)
    system = random_tokens(32, seed=3)  # 4 blocks both hold
    _insert(b, key, model, system)
    longer = system + random_tokens(30, seed=4)
    _insert(a, key, model, longer)
    query = longer + random_tokens(5, seed=5)
    found = b.fetch(key, query)
    cache, rest = found.prompt_cache, found.rest
    assert found.remote_tokens == len(longer)
    assert greedy_continue(model, cache, rest, GEN) == cold_greedy(model, query, GEN)
    # Only what b lacked came over the network: 3 blocks and the tail, not 7 + 1.
    records = b.stats()["remote"]
    assert records["restored_bytes"] < a.stats()["remote"]["pushed_bytes"]
    for tc in (a, b):
        tc.close()


def test_checkpoint_hit_on_hybrid_model(tiny_hybrid, tiny_hybrid_path, tmp_path, redis_server):
    model, _ = tiny_hybrid
    key = str(tiny_hybrid_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url)
    for tc in (a, b):
        tc.register_model(key, tiny_hybrid_path, model)
    prompt = random_tokens(60, seed=6)
    p = 37  # a checkpoint mid-block (4 blocks + 5 tokens)
    _insert(a, key, model, prompt[:p])
    found = b.fetch(key, prompt)
    cache, rest = found.prompt_cache, found.rest
    assert found.remote_tokens == p and rest == prompt[p:]
    # Exact against a cold run split at the same position (chunk-boundary rule).
    ref = make_prompt_cache(model)
    prefill(model, prompt[:p], ref)
    assert greedy_continue(model, cache, rest, GEN) == greedy_continue(model, ref, prompt[p:], GEN)
    for tc in (a, b):
        tc.close()


def _poison(r, mutate):
    """Rewrites every stored value with ``mutate(record, payload) -> value``."""
    for k in _keys(r):
        rr = decode(r.get(k))
        r.set(k, mutate(rr.record, rr.payload))


def _other_tokens(rec: Record, payload: bytes) -> bytes:
    tokens = bytes((b + 1) % 256 for b in rec.tokens)  # right key, other tokens
    return encode(Record(**{**rec.__dict__, "tokens": tokens}), payload)


def _flipped_bytes(rec: Record, payload: bytes) -> bytes:
    data = bytearray(payload)
    data[len(data) // 2] ^= 0xFF
    return encode(rec, bytes(data))


def _forged(rec: Record, payload: bytes) -> bytes:
    # Self-consistent but foreign: a record whose own id is another chain's,
    # stored under this key.
    return encode(Record(**{**rec.__dict__, "id": bytes(16)}), payload)


@pytest.mark.parametrize("mutate", [_other_tokens, _flipped_bytes, _forged])
def test_poisoned_entry_is_a_counted_miss(mutate, tiny_llama, tiny_llama_path, tmp_path,
                                          redis_server):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url)
    for tc in (a, b):
        tc.register_model(key, tiny_llama_path, model)
    prompt = random_tokens(40, seed=7)
    _insert(a, key, model, prompt)
    _poison(redis_server.client(), mutate)
    query = prompt + [5, 6, 7]
    found = b.fetch(key, query)
    cache, rest = found.prompt_cache, found.rest
    assert cache is None and rest == query
    assert found.remote_tokens == 0
    st = b.stats()["remote"]
    assert st["rejected"] >= 1 and st["hits"] == 0 and st["misses"] == 1
    # Nothing poisoned reached b's disk.
    assert b.flush(30) and b.stats()["disk"]["entries"] == 0
    for tc in (a, b):
        tc.close()


def test_redis_killed_stopped_and_restarted(tiny_llama, tiny_llama_path, tmp_path, redis_server):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url, remote_timeout_ms=50)
    for tc in (a, b):
        tc.register_model(key, tiny_llama_path, model)
    first = random_tokens(30, seed=8)
    _insert(b, key, model, first)  # b's own disk has it

    # A stuck Redis (SIGSTOP): lookups time out and fall back to local tiers.
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        query = first + random_tokens(12, seed=12)  # long enough to ask the remote
        found = b.fetch(key, query)
        cache, rest = found.prompt_cache, found.rest
        assert found.source in ("memory", "disk") and found.cached_tokens == 30
        assert greedy_continue(model, cache, rest, GEN) == cold_greedy(model, query, GEN)
        assert b.stats()["remote"]["timeouts"] >= 1
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

    # Killed: every request still served, the breaker opens after repeated failures.
    redis_server.kill()
    other = random_tokens(30, seed=9)
    for i in range(5):
        q = other + [i + 3]
        found = b.fetch(key, q)
        cache, rest = found.prompt_cache, found.rest
        assert cache is None and rest == q
    st = b.stats()["remote"]
    assert st["errors"] >= 3 and st["breaker"] in ("open", "half_open") and st["breaker_opened"] >= 1
    _insert(a, key, model, other)  # a's push is dropped while Redis is gone, a keeps serving
    assert a.stats()["remote"]["dropped_pushes"] >= 1

    # Back (empty, same port): after the cooldown the breaker lets a trial through
    # and hits resume for what is pushed from now on.
    redis_server.start()
    third = random_tokens(30, seed=10)

    def pushed():
        _insert(a, key, model, third + [len(_keys(redis_server.client()))])
        return a.stats()["remote"]["pushed_records"] > 0 and len(_keys(redis_server.client())) > 0

    wait_for(pushed, timeout=60, interval=0.3)

    def remote_hit():
        found = b.fetch(key, third + [1, 2])
        return found.remote_tokens >= 24

    wait_for(remote_hit, timeout=60, interval=0.3)
    assert b.stats()["remote"]["breaker"] == "closed"
    for tc in (a, b):
        tc.close()


def test_salt_and_namespace_isolation(tiny_llama, tiny_llama_path, tiny_sliding, tiny_sliding_path,
                                      tmp_path, redis_server):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    a = _tc(tmp_path, "a", redis_server.url)
    b = _tc(tmp_path, "b", redis_server.url)
    for tc in (a, b):
        tc.register_model(key, tiny_llama_path, model)
    prompt = random_tokens(30, seed=11)
    _insert(a, key, model, prompt, salt="tenant-1")
    query = prompt + [3, 4]
    found = b.fetch(key, query, salt="tenant-2")
    assert found.cached_tokens == 0
    found = b.fetch(key, query)
    assert found.cached_tokens == 0
    found = b.fetch(key, query, salt="tenant-1")
    assert found.remote_tokens == 30

    # Another model on the same Redis: its own keys, never the llama's.
    smodel, _ = tiny_sliding
    skey = str(tiny_sliding_path)
    c = _tc(tmp_path, "c", redis_server.url)
    c.register_model(skey, tiny_sliding_path, smodel)
    found = c.fetch(skey, query, salt="tenant-1")
    assert found.cached_tokens == 0
    prefix = record_key(a._ns_by_key[key], b"")
    assert all(k.decode().startswith(prefix) for k in _keys(redis_server.client()))
    for tc in (a, b, c):
        tc.close()


def test_remote_needs_a_disk_tier_and_a_redis_url():
    with pytest.raises(ValueError, match="disk_dir"):
        TieredPromptCache(remote_url="redis://127.0.0.1:1/0")


def test_slow_redis_never_holds_the_disk_writer_and_drops_are_counted(tiny_llama, tiny_llama_path,
                                                                      tmp_path, redis_server, monkeypatch):
    import threading

    from tiercache.remote.client import RemoteClient

    model, _ = tiny_llama
    key = str(tiny_llama_path)
    gate = threading.Event()
    real_put = RemoteClient.put_many

    def slow_put(self, items, ttl):  # fault injection: a Redis that takes forever to write
        gate.wait(60)
        return real_put(self, items, ttl)

    monkeypatch.setattr(RemoteClient, "put_many", slow_put)
    a = _tc(tmp_path, "a", redis_server.url)
    a.register_model(key, tiny_llama_path, model)
    for seed in range(5):
        cache = make_prompt_cache(model)
        tokens = random_tokens(24, seed=40 + seed)  # 3 blocks each
        prefill(model, tokens, cache)
        a.insert_cache(key, tokens, cache)
        if seed == 0:  # the first push now hangs; room for one more job behind it
            assert a.writer.flush(60)
            a.remote.push_queue_bytes = a.stats()["disk"]["bytes"]
    assert a.writer.flush(60)  # every snapshot reached the local disk while Redis hangs
    assert a.stats()["disk"]["entries"] == 5 * 3
    st = a.stats()["remote"]
    assert st["push_pending"] >= 1 and st["dropped_pushes"] >= 1 and st["pushed_records"] == 0
    gate.set()
    assert a.remote.flush(60)
    assert a.stats()["remote"]["pushed_records"] >= 1
    a.close()

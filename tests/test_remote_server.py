"""Two real ``tiercache-server`` processes (separate disk dirs) share one real
redis-server: remote hits with cold-equal greedy output, usage and /metrics,
cache_salt and namespace isolation across servers, poisoned entries, and Redis
killed and restarted under running servers."""

from __future__ import annotations

import httpx
import pytest
from conftest import random_tokens
from redis_helpers import MISSING, REDIS_BIN, RedisServer
from server_helpers import wait_for

from tiercache.remote.codec import decode, encode, namespace_pattern
from tiercache.store.index import Record
from tiercache.tools.server_process import start_server

pytestmark = pytest.mark.slow

BLOCK = 16


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory):
    if REDIS_BIN is None:
        pytest.skip(MISSING)
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


def _args(model_path, disk, redis_url, timeout_ms="1000"):
    return ["--model", str(model_path), "--disk-dir", str(disk), "--block-size", str(BLOCK),
            "--max-tokens", "8", "--remote-url", redis_url, "--remote-timeout-ms", timeout_ms]


@pytest.fixture(scope="module")
def servers(tiny_llama_path, tmp_path_factory, redis_srv):
    tmp = tmp_path_factory.mktemp("remote-srv")
    one = start_server(_args(tiny_llama_path, tmp / "disk1", redis_srv.url), tmp / "one.log")
    two = start_server(_args(tiny_llama_path, tmp / "disk2", redis_srv.url), tmp / "two.log")
    yield one, two
    for srv in (one, two):
        assert srv.stop() == 0, srv.log()


def _complete(srv, ids, **kw):
    r = httpx.post(srv.base_url + "/v1/completions",
                   json={"prompt": ids, "max_tokens": 8, "temperature": 0, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]


def _remote(srv) -> dict:
    return httpx.get(srv.base_url + "/v1/cache/stats", timeout=10).json()["tiers"]["remote"]


def _keys(redis_srv) -> list[bytes]:
    return list(redis_srv.client().scan_iter(match=namespace_pattern()))


def test_prompt_from_one_server_is_a_remote_hit_on_the_other(servers, redis_srv):
    one, two = servers
    ids = random_tokens(100, seed=21)
    cold, d1 = _complete(one, ids)
    assert d1["cached_tokens"] == 0 and d1["remote_tokens"] == 0
    wait_for(lambda: len(_keys(redis_srv)) >= 100 // BLOCK, timeout=60)

    warm, d2 = _complete(two, ids)
    assert warm == cold
    # Six full blocks; the first server's tail (prompt end + generated tokens)
    # runs past this prompt, and remote tails are found by their whole tokens.
    assert d2["remote_tokens"] == 96 and d2["memory_tokens"] == 0 and d2["disk_tokens"] == 0
    assert d2["cached_tokens"] == 96
    stats = _remote(two)
    assert stats["hits"] == 1 and stats["rejected"] == 0 and stats["breaker"] == "closed"
    metrics = httpx.get(two.base_url + "/metrics").text
    for line in ('tiercache_prefix_cache_hit_tokens_total{tier="remote"} 96.0',
                 "tiercache_remote_hits_total 1.0", 'tiercache_remote_breaker_state{state="closed"} 1.0',
                 "tiercache_remote_bytes_in_total", "tiercache_remote_lookup_seconds_total"):
        assert line in metrics, line

    # The second server kept a copy: the same prompt again is a local hit.
    _, d3 = _complete(two, ids)
    assert d3["remote_tokens"] == 0 and d3["cached_tokens"] >= 96


def test_cache_salt_isolates_across_servers(servers, redis_srv):
    one, two = servers
    ids = random_tokens(80, seed=22)
    cold, _ = _complete(one, ids, cache_salt="tenant-a")
    wait_for(lambda: _remote(one)["push_queue_bytes"] == 0, timeout=60)
    n = len(_keys(redis_srv))
    assert n >= 80 // BLOCK
    _, other = _complete(two, ids, cache_salt="tenant-b")
    assert other["cached_tokens"] == 0
    warm, same = _complete(two, ids, cache_salt="tenant-a")
    assert same["remote_tokens"] == 79 and warm == cold


def test_other_model_never_sees_the_namespace(servers, redis_srv, tiny_sliding_path, tmp_path):
    one, _ = servers
    ids = random_tokens(80, seed=23)
    _complete(one, ids)
    wait_for(lambda: _remote(one)["push_queue_bytes"] == 0, timeout=60)
    other = start_server(_args(tiny_sliding_path, tmp_path / "disk3", redis_srv.url), tmp_path / "s.log")
    try:
        _, d = _complete(other, ids)
        assert d["cached_tokens"] == 0 and d["remote_tokens"] == 0
        assert _remote(other)["rejected"] == 0  # different keys, not rejected records
    finally:
        assert other.stop() == 0


def _other_tokens(rec: Record, payload: bytes) -> bytes:
    return encode(Record(**{**rec.__dict__, "tokens": bytes((b + 1) % 256 for b in rec.tokens)}), payload)


def _flipped(rec: Record, payload: bytes) -> bytes:
    data = bytearray(payload)
    data[-3] ^= 0x5A
    return encode(rec, bytes(data))


@pytest.mark.parametrize("mutate", [_other_tokens, _flipped])
def test_poisoned_entries_are_counted_misses(mutate, servers, redis_srv):
    one, two = servers
    ids = random_tokens(90, seed=24 if mutate is _flipped else 25)
    cold, _ = _complete(one, ids)
    wait_for(lambda: _remote(one)["push_queue_bytes"] == 0 and _remote(one)["pushed_records"] > 0,
             timeout=60)
    r = redis_srv.client()
    for k in _keys(redis_srv):
        rr = decode(r.get(k))
        r.set(k, mutate(rr.record, rr.payload))
    before = _remote(two)["rejected"]
    out, d = _complete(two, ids)
    assert out == cold and d["cached_tokens"] == 0 and d["remote_tokens"] == 0
    assert _remote(two)["rejected"] > before
    assert "tiercache_remote_rejected_total" in httpx.get(two.base_url + "/metrics").text


def test_redis_killed_then_back(servers, redis_srv):
    one, two = servers
    redis_srv.kill()
    # Every request succeeds from local tiers while Redis is gone.
    for seed in (31, 32, 33, 34):
        ids = random_tokens(70, seed=seed)
        cold, _ = _complete(one, ids)
        again, d = _complete(one, ids)
        assert again == cold and d["cached_tokens"] == 69 and d["remote_tokens"] == 0
        _complete(two, ids[:40] + random_tokens(30, seed=seed + 100))
    stats = _remote(two)
    assert stats["errors"] >= 1
    assert "tiercache_remote_errors_total" in httpx.get(two.base_url + "/metrics").text

    # Redis back (empty, same port): once the breakers let a trial through,
    # what the first server computes is a remote hit on the second again.
    redis_srv.start()
    seeds = iter(range(1000, 1100))

    def remote_hit_resumed():
        ids = random_tokens(70, seed=next(seeds))
        cold, _ = _complete(one, ids)
        try:
            wait_for(lambda: len(_keys(redis_srv)) >= 4 and _remote(one)["push_queue_bytes"] == 0,
                     timeout=3)
        except AssertionError:
            return False
        warm, d = _complete(two, ids)
        assert warm == cold
        return d["remote_tokens"] == 64

    wait_for(remote_hit_resumed, timeout=120, interval=0.5)
    assert _remote(two)["breaker"] == "closed"

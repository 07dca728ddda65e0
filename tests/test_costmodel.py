"""The disk-vs-memory cost model: its arithmetic, its choice in both directions in
TieredPromptCache (rates set through the public API, never timed), and the warm
restart of issue 15 (memory held 1 token, disk 9: the server now serves 9)."""

from __future__ import annotations

import math
import time

import pytest
from conftest import random_tokens
from fastapi.testclient import TestClient

from mlx_helpers import cold_greedy, greedy_continue, prefilled_cache
from tiercache import TieredPromptCache
from tiercache.server.app import create_app
from tiercache.server.config import ServerConfig
from tiercache.tiers.costmodel import (
    DEFAULT_DISK_BYTES_PER_SECOND,
    DEFAULT_PREFILL_TOKENS_PER_SECOND,
    HORIZON_SECONDS,
    MIN_PREFILL_TOKENS,
    SEED_SECONDS,
    PromotionCostModel,
    RunningRate,
)

B = 8


def test_prefer_disk_compares_read_time_with_compute_time():
    cm = PromotionCostModel(disk_bytes_per_second=1e9, prefill_tokens_per_second=1000)
    # 100 MB in 0.1 s vs 200 tokens in 0.2 s: read.
    assert cm.prefer_disk(memory_tokens=800, disk_tokens=1000, disk_bytes=100_000_000)
    # 100 MB in 0.1 s vs 50 tokens in 0.05 s: compute.
    assert not cm.prefer_disk(memory_tokens=950, disk_tokens=1000, disk_bytes=100_000_000)
    # Nothing in memory: any longer disk prefix; never a shorter or equal one.
    assert cm.prefer_disk(memory_tokens=0, disk_tokens=1, disk_bytes=10**12)
    assert not cm.prefer_disk(memory_tokens=10, disk_tokens=10, disk_bytes=1)
    assert not cm.prefer_disk(memory_tokens=0, disk_tokens=0, disk_bytes=0)
    cm.set_rates(prefill_tokens_per_second=100)  # a slower model: now read
    assert cm.prefer_disk(memory_tokens=950, disk_tokens=1000, disk_bytes=100_000_000)
    assert cm.snapshot() == {"disk_bytes_per_second": 1_000_000_000,
                             "prefill_tokens_per_second": 100.0}
    with pytest.raises(ValueError):
        cm.set_rates(disk_bytes_per_second=0)
    with pytest.raises(ValueError):
        cm.set_rates(prefill_tokens_per_second=math.nan)


def test_running_rate_weighs_seconds_and_forgets_old_evidence():
    r = RunningRate(100.0, seed_seconds=1.0, horizon=10.0)
    assert r.value == 100.0
    r.observe(0.01, 0.001)  # a tiny, overhead-dominated sample barely moves it
    assert 99 < r.value < 100
    r.observe(10_000.0, 10.0)  # 10 s at 1000/s: the seed is discounted by e^-1
    keep = math.exp(-1.0)
    amount = (100.0 * math.exp(-0.0001) + 0.01) * keep + 10_000.0
    seconds = (1.0 * math.exp(-0.0001) + 0.001) * keep + 10.0
    assert r.value == pytest.approx(amount / seconds)
    assert 900 < r.value < 1000
    for bad in ((0, 1.0), (5, 0.0), (-1, 1.0), (math.inf, 1.0), (1, math.nan)):
        r.observe(*bad)
    assert r.value == pytest.approx(amount / seconds)
    cm = PromotionCostModel()
    assert cm.disk_bytes_per_second == DEFAULT_DISK_BYTES_PER_SECOND
    assert cm.prefill_tokens_per_second == DEFAULT_PREFILL_TOKENS_PER_SECOND
    cm.observe_prefill(MIN_PREFILL_TOKENS - 1, 1.0)  # one step's overhead: not a rate
    assert cm.prefill_tokens_per_second == DEFAULT_PREFILL_TOKENS_PER_SECOND
    cm.observe_prefill(30_000, 2 * HORIZON_SECONDS)  # long real evidence outweighs the seed
    assert cm.prefill_tokens_per_second == pytest.approx(
        (DEFAULT_PREFILL_TOKENS_PER_SECOND * SEED_SECONDS * math.exp(-2) + 30_000)
        / (SEED_SECONDS * math.exp(-2) + 2 * HORIZON_SECONDS))


@pytest.mark.parametrize("direction", ["disk", "memory"])
def test_tiered_cache_follows_the_cost_model(tiny_llama, tiny_llama_path, tmp_path, direction):
    # Memory holds 1 token of the query, disk 9 (the prompt of an earlier run).
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    query = random_tokens(10, seed=3)
    other = query[:1] + random_tokens(6, seed=4)
    with TieredPromptCache(disk_dir=tmp_path / "store", block_size=B) as tc:
        tc.insert_cache(key, query[:9], prefilled_cache(model, query[:9]))
        assert tc.flush(30)
    with TieredPromptCache(disk_dir=tmp_path / "store", block_size=B) as tc:
        tc.insert_cache(key, other, prefilled_cache(model, other))
        plan = tc.disk.longest_prefix(next(iter(tc.disk.namespaces())), query, limit=9)
        read = sum(r.nbytes for r in plan.records)
        assert plan.n_tokens == 9 and read > 0
        if direction == "disk":
            # Reading takes read/1e9 s (microseconds); 8 tokens at 100/s take 80 ms.
            tc.cost_model.set_rates(disk_bytes_per_second=1e9, prefill_tokens_per_second=100)
        else:
            # Reading takes read/1e3 s (seconds); 8 tokens at 10^6/s take 8 us.
            tc.cost_model.set_rates(disk_bytes_per_second=1e3, prefill_tokens_per_second=1e6)
        disk_before = tc.cost_model.disk_bytes_per_second
        info = tc.fetch(key, query)
        cache, rem = info.prompt_cache, info.rest
        if direction == "disk":
            assert (info.source, info.disk_tokens, info.memory_tokens) == ("disk", 9, 0)
            assert tc.stats()["disk"]["promotions"] == 1
            # The restore itself was observed: the estimate moved off the set rate.
            assert tc.cost_model.disk_bytes_per_second != disk_before
        else:
            assert (info.source, info.disk_tokens, info.memory_tokens) == ("memory", 0, 1)
            assert tc.stats()["disk"]["promotions"] == 0
            assert tc.cost_model.disk_bytes_per_second == disk_before
        assert len(rem) == len(query) - info.cached_tokens
        # Either way the KV is right: greedy output equals a cold run.
        assert greedy_continue(model, cache, rem, 6) == cold_greedy(model, query, 6)
        stats = tc.stats()["disk"]["cost_model"]
        assert set(stats) == {"disk_bytes_per_second", "prefill_tokens_per_second"}


def _serve(cfg):
    client = TestClient(create_app(cfg))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.05)
    return client


def _complete(client, prompt):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]


def test_warm_restart_serves_the_disk_prefix_memory_lacks(tiny_llama_path, tmp_path):
    # Issue 15: after a restart, a short prompt that memory had 1 token of and disk 9
    # reported cached_tokens: 1 (disk had to offer a whole block more).
    cfg = ServerConfig(model=str(tiny_llama_path), disk_dir=str(tmp_path / "d"), block_size=16)
    a = [7] + random_tokens(80, seed=21)
    b = [7] + random_tokens(9, seed=22)
    client = _serve(cfg)
    try:
        _complete(client, b)
    finally:
        client.__exit__(None, None, None)  # flushes the writer
    client = _serve(cfg)
    try:
        _complete(client, a)  # memory now holds a, which shares b's first token
        details = _complete(client, b)
        assert details == {"cached_tokens": 9, "memory_tokens": 0, "disk_tokens": 9, "pending_tokens": 0}
        # The server reports its prefill timings to the cost model.
        cost = client.get("/v1/cache/stats").json()["tiers"]["disk"]["cost_model"]
        assert cost["prefill_tokens_per_second"] != DEFAULT_PREFILL_TOKENS_PER_SECOND
    finally:
        client.__exit__(None, None, None)

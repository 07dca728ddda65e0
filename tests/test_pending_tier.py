"""The pending tier: a snapshot the writer has not committed yet is a hit.

Memory budget below one snapshot, so a snapshot only lives in the writer's host
buffers until its files are on disk. The same request twice back to back (no
sleep, no flush) must be a hit whose greedy output equals the cold run; a stalled
disk (fault injection: the block-file write waits on an event) makes the second
request a pending-tier hit for sure.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_tokens
from mlx_helpers import cold_greedy, greedy_continue, prefill
from mlx_lm.models.cache import make_prompt_cache

import tiercache.store.disk as disk_mod
from tiercache import TieredPromptCache
from tiercache.store import layers as L

B = 8
GEN = 10
SMALL = 1024  # bytes: far below one snapshot of the tiny models


def _serve(tc, model, key, prompt):
    """One request as the server runs it: lookup, prefill the rest, generate, insert."""
    info = tc.fetch(key, prompt)
    cache, rem = info.prompt_cache, info.rest
    if cache is None:
        cache, rem = make_prompt_cache(model), list(prompt)
    out = greedy_continue(model, cache, rem, GEN)
    tc.insert_cache(key, list(prompt) + out[:-1], cache)
    return out, info


@pytest.fixture
def stalled_disk(monkeypatch):
    """Block-file writes wait until the event is set (a disk that hangs)."""
    gate = threading.Event()
    real = disk_mod.write_tensor_file

    def slow_write(*a, **kw):
        assert gate.wait(60), "test never released the disk"
        return real(*a, **kw)

    monkeypatch.setattr(disk_mod, "write_tensor_file", slow_write)
    yield gate
    gate.set()


def test_back_to_back_is_a_hit_equal_to_cold(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    prompt = random_tokens(60, seed=5)
    cold = cold_greedy(model, prompt, GEN)
    with TieredPromptCache(max_bytes=SMALL, disk_dir=tmp_path / "s", block_size=B) as tc:
        tc.register_model(key, tiny_llama_path, model)
        first, info1 = _serve(tc, model, key, prompt)
        second, info2 = _serve(tc, model, key, prompt)
        assert len(tc.memory) == 0  # nothing fits the memory budget
    assert info1.cached_tokens == 0 and first == cold
    # Pending or already committed: either way a hit, never a miss.
    assert info2.source in ("pending", "disk") and info2.cached_tokens == len(prompt) - 1
    assert second == cold


def test_stalled_disk_second_request_is_a_pending_hit(tiny_llama, tiny_llama_path, tmp_path, stalled_disk):
    model, _ = tiny_llama
    key = str(tiny_llama_path)
    prompt = random_tokens(60, seed=6)
    other = prompt[:37] + random_tokens(30, seed=7)  # diverges inside block 5
    cold, cold_other = cold_greedy(model, prompt, GEN), cold_greedy(model, other, GEN)
    tc = TieredPromptCache(max_bytes=SMALL, disk_dir=tmp_path / "s", block_size=B)
    try:
        tc.register_model(key, tiny_llama_path, model)
        first, _ = _serve(tc, model, key, prompt)
        second, info = _serve(tc, model, key, prompt)
        assert first == cold and second == cold
        assert info.source == "pending" and info.pending_tokens == len(prompt) - 1
        assert info.disk_tokens == 0 and info.memory_tokens == 0
        # A diverging prompt reuses the common prefix, token by token (trimmable).
        third, info = _serve(tc, model, key, other)
        assert info.source == "pending" and info.pending_tokens == 37 and third == cold_other
        st = tc.stats()
        assert st["pending"]["hits"] == 2 and st["pending"]["hit_tokens"] == len(prompt) - 1 + 37
        assert st["pending"]["entries"] >= 1 and st["pending"]["bytes"] > 0
        assert st["disk"]["entries"] == 0 and st["disk"]["bytes_written"] == 0
        stalled_disk.set()
        assert tc.flush(60)
        st = tc.stats()
        assert st["pending"]["entries"] == 0 and st["pending"]["bytes"] == 0
        assert st["disk"]["bytes_written"] == st["disk"]["bytes"] > 0
        again, info = _serve(tc, model, key, prompt)
        assert info.source == "disk" and again == cold
    finally:
        stalled_disk.set()
        tc.close()


def _arrays(cache):
    out = []
    for c in cache:
        state = c.state
        for a in (state if isinstance(state, (list, tuple)) else [state]):
            out.extend(a if isinstance(a, (list, tuple)) else [a])
    return [np.array(a) for a in out if a is not None]


def test_restore_from_host_buffers_is_exact(tiny_llama, tiny_hybrid, tiny_sliding):
    for model, _ in (tiny_llama, tiny_hybrid, tiny_sliding):
        toks = random_tokens(40, seed=8)
        cache = make_prompt_cache(model)
        prefill(model, toks, cache)
        host = L.to_host(cache)
        back = L.from_host(host, len(toks))
        assert [type(c) for c in back] == [type(c) for c in cache]
        assert [getattr(c, "offset", None) for c in back] == [getattr(c, "offset", None) for c in cache]
        assert len(_arrays(back)) == len(_arrays(cache)) > 0
        for a, b in zip(_arrays(back), _arrays(cache)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        # Both continue identically.
        nxt = random_tokens(5, seed=9)
        assert greedy_continue(model, back, nxt, 4) == greedy_continue(model, cache, nxt, 4)


def test_trimmed_prefix_matches_a_cold_prefill(tiny_llama):
    model, _ = tiny_llama
    toks = random_tokens(50, seed=10)
    cache = make_prompt_cache(model)
    prefill(model, toks, cache)
    back = L.from_host(L.to_host(cache), 23)
    ref = make_prompt_cache(model)
    prefill(model, toks[:23], ref)
    for a, b in zip(back, ref):
        assert a.offset == b.offset == 23
        assert mx.array_equal(a.keys[..., :23, :], b.keys[..., :23, :]).item()
        assert not mx.any(a.keys[..., 23:, :]).item()  # no stale rows after the prefix


def test_non_trimmable_pending_snapshot_only_whole(tiny_hybrid, tiny_hybrid_path, tmp_path, stalled_disk):
    model, _ = tiny_hybrid
    key = str(tiny_hybrid_path)
    toks = random_tokens(30, seed=11)
    snap = make_prompt_cache(model)
    prefill(model, toks[:20], snap)
    tc = TieredPromptCache(max_bytes=SMALL, disk_dir=tmp_path / "s", block_size=B)
    try:
        tc.register_model(key, tiny_hybrid_path, model)
        tc.insert_cache(key, toks[:20], snap)
        # Shorter than the snapshot, or diverging inside it: recurrent state can't
        # be cut, so no hit (the disk tier would only restore its checkpoint too).
        assert tc.fetch_nearest_cache(key, toks[:15])[0] is None
        assert tc.fetch_nearest_cache(key, toks[:10] + random_tokens(15, seed=12))[0] is None
        # A query that extends it: the whole snapshot, exactly as inserted.
        found = tc.fetch(key, toks)
        cache, rem = found.prompt_cache, found.rest
        assert found.pending_tokens == 20 and rem == toks[20:]
        assert len(_arrays(cache)) == len(_arrays(snap)) > 0
        for a, b in zip(_arrays(cache), _arrays(snap)):
            assert np.array_equal(a, b)
    finally:
        stalled_disk.set()
        tc.close()

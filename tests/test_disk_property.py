"""Property tests of the disk tier against a brute-force model of what is stored.

Caches are built synthetically (no model) so that every row's content encodes its
token and position: a restored cache is compared array-for-array with a cache
built directly for the restored tokens, so wrong data can never pass.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from tiercache.store.disk import DiskStore
from tiercache.store.layers import describe_cache

B = 4
H, D = 2, 32


def _rows(tokens, dtype=mx.float32):
    t = np.asarray(tokens, dtype=np.float32)
    pos = np.arange(len(tokens), dtype=np.float32)
    h = np.arange(H, dtype=np.float32)[:, None, None]
    d = np.arange(D, dtype=np.float32)[None, None, :]
    k = (t[None, :, None] * 1.5 + pos[None, :, None] * 0.25 + h + d * 0.01)[None]
    v = (t[None, :, None] - pos[None, :, None] * 0.5 - h - d * 0.02)[None]
    return mx.array(k).astype(dtype), mx.array(v).astype(dtype)


def make_cache(kind: str, tokens) -> list:
    """A prompt cache for ``tokens`` whose content is a function of the tokens."""
    k, v = _rows(tokens)
    out = []
    if kind in ("kv", "hybrid"):
        c = KVCache()
        c.update_and_fetch(k, v)  # padded buffer, like a real prefill
        out.append(c)
    if kind == "bf16":
        c = KVCache()
        c.update_and_fetch(k.astype(mx.bfloat16), v.astype(mx.bfloat16))
        out.append(c)
    if kind == "quant":
        c = QuantizedKVCache(group_size=32, bits=8)
        c.update_and_fetch(k, v)
        out.append(c)
        c2 = KVCache()
        c2.update_and_fetch(k, v)
        out.append(c2)
    if kind == "hybrid":
        a = ArraysCache(2)
        t = np.asarray(tokens, dtype=np.float64)
        # Recurrent-like state: depends on every token and on the length.
        a[0] = mx.array([[float(len(tokens)), float((t * np.arange(1, len(t) + 1)).sum())]])
        a[1] = mx.array(np.full((1, 3), float(t.sum() if len(t) else 0)), dtype=mx.float32)
        out.append(a)
    mx.eval([x for c in out for x in _arrays(c)])
    return out


def _arrays(c):
    if isinstance(c, ArraysCache):
        return [a for a in c.cache if a is not None]
    keys, values = c.keys, c.values
    if isinstance(keys, tuple):
        return [a[..., : c.offset, :] for a in keys + values]
    return [keys[..., : c.offset, :], values[..., : c.offset, :]]


def assert_same(restored, expected):
    assert len(restored) == len(expected)
    for r, e in zip(restored, expected):
        assert type(r) is type(e)
        if not isinstance(r, ArraysCache):
            assert r.offset == e.offset
        for x, y in zip(_arrays(r), _arrays(e), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert mx.array_equal(x, y).item()


def _store(tmp: str, kind: str, **kw):
    store = DiskStore(Path(tmp) / "s", block_size=B, **kw)
    ns = store.register_namespace(b"\x07" * 16, describe_cache(make_cache(kind, [3, 4])), {})
    return store, ns


def _common(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_length(stored, query, limit, trimmable):
    """Brute force: longest restorable prefix of ``query[:limit]``."""
    q = query[:limit]
    if trimmable:
        return max((_common(s, q) for s in stored), default=0)
    return max((len(s) for s in stored if len(s) <= len(q) and q[: len(s)] == s), default=0)


token_lists = st.lists(st.integers(3, 5), min_size=0, max_size=14)
ops = st.lists(
    st.tuples(st.booleans(), token_lists, st.floats(0, 1)), min_size=1, max_size=12
)


@pytest.mark.parametrize("kind", ["kv", "hybrid"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_longest_prefix_matches_brute_force(kind, ops):
    trimmable = kind != "hybrid"
    with tempfile.TemporaryDirectory() as tmp:
        store, ns = _store(tmp, kind)
        stored: list[list[int]] = []
        for is_save, toks, frac in ops:
            if is_save:
                store.save(ns, toks, make_cache(kind, toks))
                if toks:
                    stored.append(list(toks))
                continue
            limit = round(frac * len(toks))
            want = expected_length(stored, toks, limit, trimmable)
            plan = store.longest_prefix(ns, toks, limit=limit)
            assert plan.n_tokens == want, (stored, toks, limit)
            cache, n = store.fetch(ns, toks, limit=limit)
            assert n == want
            if n:
                assert_same(cache, make_cache(kind, toks[:n]))
            else:
                assert cache is None
        assert store.check() == []
        store.close()


@pytest.mark.parametrize("kind", ["kv", "bf16", "quant", "hybrid"])
def test_dtypes_and_classes_round_trip(kind, tmp_path):
    toks = [3 + (i * 7) % 11 for i in range(23)]
    store, ns = _store(str(tmp_path), kind)
    store.save(ns, toks, make_cache(kind, toks))
    store.close()
    store, ns = _store(str(tmp_path), kind)
    for n in ([23] if kind == "hybrid" else [1, 3, 4, 5, 8, 13, 22, 23]):
        cache, got = store.fetch(ns, toks[:n] + [99], limit=n)
        assert got == n
        assert_same(cache, make_cache(kind, toks[:n]))
        if kind != "hybrid":
            # The restored layers keep working as mlx-lm caches: append a row.
            k, v = _rows(toks[: n + 1])
            for c in cache:
                kk, vv = k[..., n:, :], v[..., n:, :]
                if kind == "bf16":
                    kk, vv = kk.astype(mx.bfloat16), vv.astype(mx.bfloat16)
                c.update_and_fetch(kk, vv)
            assert_same(cache, make_cache(kind, toks[: n + 1]))
    store.close()


def test_save_rejects_mismatched_cache(tmp_path):
    store, ns = _store(str(tmp_path), "kv")
    with pytest.raises(ValueError):
        store.save(ns, [3, 4, 5], make_cache("kv", [3, 4]))  # offset != len(tokens)
    with pytest.raises(ValueError):
        store.save(ns, [3, 4], make_cache("bf16", [3, 4]))  # other layout
    with pytest.raises(ValueError):
        store.save(b"\x00" * 16, [3, 4], make_cache("kv", [3, 4]))  # unknown namespace
    assert store.n_records() == 0
    store.close()

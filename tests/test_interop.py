"""tiercache.admin.interop: mlx-lm prompt-cache files out of and into a DiskStore."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import CacheList, KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

import tiercache.admin.interop as interop
from mlx_helpers import cold_greedy, greedy_continue, prefill
from tiercache.admin import inspect as I
from tiercache.store.disk import DiskStore
from tiercache.admin.interop import InteropError, export_mlx_lm, import_mlx_lm, read_prompt_cache
from tiercache.store.namespaces import model_namespace

B = 8
STEP = 16


def _stored(tmp_path, name, model_path, model, tokens, step=None):
    store = DiskStore(tmp_path / name, block_size=B)
    ns = model_namespace(store, model_path, model)
    cache = make_prompt_cache(model)
    prefill(model, tokens, cache, step=step)
    store.save(ns, tokens, cache)
    return store, ns


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_hybrid", "tiny_sliding"])
def test_export_then_mlx_lm_load_generates_like_a_cold_run(request, tmp_path, make_tokens, which):
    model, _ = request.getfixturevalue(which)
    path = request.getfixturevalue(which + "_path")
    toks = make_tokens(37, seed=3)
    store, ns = _stored(tmp_path, "s", path, model, toks, step=STEP)
    try:
        (end,) = I.snapshot_ends(I.load_view(store))
        out = tmp_path / "x.safetensors"
        res = export_mlx_lm(store, end.id, out)
        assert res.tokens == len(toks) and res.namespace == ns.hex()
        cache, meta = load_prompt_cache(str(out), return_metadata=True)
        assert json.loads(meta["tokens"]) == toks and meta["tiercache"] == "export"
        more = make_tokens(3, seed=4)
        # Same prefill chunk boundaries as the stored snapshot (recurrent layers).
        assert greedy_continue(model, cache, more, 12) == cold_greedy(model, toks + more, 12, step=STEP)
        # Our own reader builds the same objects without load_prompt_cache.
        mine, meta2 = read_prompt_cache(out)
        assert meta2 == meta
        assert [type(c) for c in mine] == [type(c) for c in cache]
        assert greedy_continue(model, mine, more, 12) == cold_greedy(model, toks + more, 12, step=STEP)
    finally:
        store.close()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_hybrid"])
def test_import_round_trip(request, tmp_path, make_tokens, which):
    model, _ = request.getfixturevalue(which)
    path = request.getfixturevalue(which + "_path")
    toks = make_tokens(29, seed=5)
    src, ns = _stored(tmp_path, "src", path, model, toks, step=STEP)
    out = tmp_path / "x.safetensors"
    export_mlx_lm(src, I.snapshot_ends(I.load_view(src))[0], out)
    src.close()
    dst = DiskStore(tmp_path / "dst", block_size=B)
    try:
        res = import_mlx_lm(dst, out, path)  # namespace not registered yet: probes the model
        assert res.namespace == ns.hex() and res.tokens == len(toks) and res.records_written > 0
        again = import_mlx_lm(dst, out, path, model=model)
        assert again.records_written == 0 and again.namespace == ns.hex()
        cache, n = dst.fetch(ns, toks + [9])
        assert n == len(toks)
        assert greedy_continue(model, cache, [9], 10) == cold_greedy(model, toks + [9], 10, step=STEP)
    finally:
        dst.close()


def test_import_rejects_a_file_of_another_model(tmp_path, tiny_hybrid, tiny_hybrid_path, tiny_llama_path,
                                                make_tokens):
    model, _ = tiny_hybrid
    toks = make_tokens(12)
    src, _ = _stored(tmp_path, "src", tiny_hybrid_path, model, toks)
    out = tmp_path / "x.safetensors"
    export_mlx_lm(src, I.snapshot_ends(I.load_view(src))[0], out)
    src.close()
    with DiskStore(tmp_path / "dst", block_size=B) as dst:
        with pytest.raises(InteropError, match="does not match the model"):
            import_mlx_lm(dst, out, tiny_llama_path)
        assert dst.n_records() == 0


def test_disallowed_class_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 2, 3, 4)), mx.zeros((1, 2, 3, 4)))
    good = tmp_path / "good.safetensors"
    save_prompt_cache(str(good), [c, c], {"tokens": "[1,2,3]"})
    arrays, meta = mx.load(str(good), return_metadata=True)
    meta["1.1"] = "Popen"
    evil = tmp_path / "evil.safetensors"
    mx.save_safetensors(str(evil), arrays, meta)

    def boom(*a, **k):
        raise AssertionError("built a layer before checking every class")

    monkeypatch.setattr(interop, "_build", boom)
    with pytest.raises(InteropError, match="layer 1: cache class 'Popen' is not allowed"):
        read_prompt_cache(evil)


def test_disallowed_class_inside_a_cache_list(tmp_path):
    a, b = KVCache(), KVCache()
    for x in (a, b):
        x.update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))
    f = tmp_path / "cl.safetensors"
    save_prompt_cache(str(f), [CacheList(a, b)])
    cache, _ = read_prompt_cache(f)
    assert type(cache[0]) is CacheList and [type(x) for x in cache[0].caches] == [KVCache, KVCache]
    assert cache[0].caches[1].offset == 2
    arrays, meta = mx.load(str(f), return_metadata=True)
    # The child class names are stored as strings (arrays of code points).
    name_keys = [k for k, v in arrays.items() if v.ndim == 1 and v.size and "".join(map(chr, v.tolist())) == "KVCache"]
    assert name_keys
    arrays[name_keys[0]] = mx.array([ord(ch) for ch in "Popen"])
    evil = tmp_path / "evil.safetensors"
    mx.save_safetensors(str(evil), arrays, meta)
    with pytest.raises(InteropError, match="'Popen' is not allowed"):
        read_prompt_cache(evil)


def test_not_a_prompt_cache_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InteropError):
        read_prompt_cache(junk)
    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"w": mx.zeros((2,))})
    with pytest.raises(InteropError, match="not an mlx-lm prompt-cache file"):
        read_prompt_cache(plain)
    with pytest.raises(InteropError, match="no such file"):
        read_prompt_cache(tmp_path / "missing.safetensors")


def test_hybrid_block_end_is_not_exportable(tmp_path, tiny_hybrid, tiny_hybrid_path, make_tokens):
    model, _ = tiny_hybrid
    toks = make_tokens(20)
    store, ns = _stored(tmp_path, "s", tiny_hybrid_path, model, toks)
    try:
        view = I.load_view(store)
        block = next(r for r in view.records.values() if r.kind == 0)
        with pytest.raises(ValueError, match="only be restored at a checkpoint"):
            export_mlx_lm(store, block, tmp_path / "x.safetensors")
        # A plan from a lookup exports too.
        plan = store.longest_prefix(ns, toks)
        res = export_mlx_lm(store, plan, tmp_path / "y")
        assert res.path.endswith("y.safetensors") and res.tokens == len(toks)
    finally:
        store.close()

"""DiskStore with real tiny MLX models: round trip, prefix reuse, dedup, hybrid and
sliding-window checkpoints, namespaces, salts, file format and store settings."""

from __future__ import annotations

import copy
import shutil
import stat

import numpy as np
import pytest
from conftest import random_tokens
from mlx_helpers import cold_greedy, first_logits, greedy_continue, prefill, prefilled_cache
from mlx_lm.models.cache import make_prompt_cache

from tiercache.store.disk import DiskStore, StoreError
from tiercache.store.index import KIND_BLOCK
from tiercache.store.namespaces import model_namespace

B = 8


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_round_trip(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    toks = random_tokens(45, seed=1)
    with DiskStore(tmp_path / "s", block_size=B) as store:
        ns = model_namespace(store, tiny_llama_path, model)
        res = store.save(ns, toks, prefilled_cache(model, toks))
        assert res.records_written == 45 // B + 1
    nxt = [17]
    with DiskStore(tmp_path / "s") as store:  # fresh object, adopts the block size
        assert store.block_size == B
        ns = model_namespace(store, tiny_llama_path, model)
        plan = store.longest_prefix(ns, toks)
        assert plan.n_tokens == 45
        restored = store.restore(plan)
        assert all(c.offset == 45 for c in restored)
        want = first_logits(model, prefilled_cache(model, toks), nxt)
        got = first_logits(model, store.restore(plan), nxt)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert greedy_continue(model, restored, nxt, 32) == greedy_continue(
            model, prefilled_cache(model, toks), nxt, 32
        )
        cache, n = store.fetch(ns, toks + nxt)
        assert n == 45 and cache is not None


def test_prefix_reuse(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    T = random_tokens(40, seed=2)
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = model_namespace(store, tiny_llama_path, model)
    store.save(ns, T, prefilled_cache(model, T))
    gen_ks = {1, 7, 8, 9, 16, 23, 33, 39, 40}
    for k in range(0, 41):
        nxt = (T[k] + 1) % 512 if k < len(T) else 5
        prompt = T[:k] + [max(nxt, 3), 4, 5, 6]
        plan = store.longest_prefix(ns, prompt, limit=len(prompt) - 1)
        assert plan.n_tokens == k, k
        arr_plan = store.longest_prefix(ns, np.array(prompt, dtype=np.int32), limit=len(prompt) - 1)
        assert [r.id for r in arr_plan.records] == [r.id for r in plan.records]
        # The prompt itself stored: the last token is always left to prefill.
        assert store.longest_prefix(ns, T[:k], limit=max(0, k - 1)).n_tokens == max(0, k - 1)
        if k in gen_ks:
            cache, n = store.fetch(ns, prompt, limit=len(prompt) - 1)
            assert n == k
            assert greedy_continue(model, cache, prompt[n:], 8) == cold_greedy(model, prompt, 8)
    # Longer stored prompt, shorter query: capped by the query and the limit.
    assert store.longest_prefix(ns, T + [9, 9], limit=41).n_tokens == 40
    store.close()


def test_dedup(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    shared = random_tokens(4 * B, seed=3)
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = model_namespace(store, tiny_llama_path, model)
    results = []
    for i in range(3):
        toks = shared + random_tokens(2 * B + 3, seed=10 + i)
        results.append(store.save(ns, toks, prefilled_cache(model, toks)))
    block_files = _files(tmp_path / "s" / "blocks")
    assert len(block_files) == 4 + 3 * 2
    assert len(_files(tmp_path / "s" / "checkpoints")) == 3  # one tail each
    sizes = {p.stat().st_size for p in block_files}
    assert len(sizes) == 1  # every full block has the same size
    block_bytes = sizes.pop()
    assert results[0].records_written == 7 and results[0].records_skipped == 0
    for r in results[1:]:
        assert r.records_written == 3 and r.records_skipped == 4
    all_bytes = sum(p.stat().st_size for p in _files(tmp_path / "s" / "blocks"))
    assert all_bytes == 10 * block_bytes
    tails = sum(p.stat().st_size for p in _files(tmp_path / "s" / "checkpoints"))
    assert store.total_bytes() == all_bytes + tails
    assert sum(r.bytes_written for r in results) == all_bytes + tails
    # Saving the same snapshot again writes nothing.
    toks = shared + random_tokens(2 * B + 3, seed=10)
    again = store.save(ns, toks, prefilled_cache(model, toks))
    assert again.records_written == 0 and again.bytes_written == 0
    store.close()


def _checkpoint_case(model, path, tmp_path, p1, p2, end, extra_lookup):
    """Common body of the hybrid and sliding-window tests.

    The boundary rule: a restored checkpoint at ``p`` followed by a prefill of
    ``[p, end)`` is exact only against a cold run that also prefilled ``[0, p)``
    and then ``[p, end)`` as separate chunks. Recurrent (ArraysCache) state and
    a wrapped RotatingKVCache depend on where prefill chunks start and end, so a
    server that wants exact hits must save checkpoints only at the boundaries of
    the chunks it prefilled, and compare/resume from exactly those boundaries.
    """
    T = random_tokens(end, seed=4)
    store = DiskStore(tmp_path / "s", block_size=4)
    ns = model_namespace(store, path, model)
    cache = make_prompt_cache(model)
    prefill(model, T[:p1], cache)
    store.save(ns, T[:p1], cache)
    prefill(model, T[p1:p2], cache)
    store.save(ns, T[:p2], cache)
    for k in range(0, end + 1):
        prompt = T[:k] + [3, 4, 5]
        if k < len(T):
            prompt[k] = 3 if T[k] != 3 else 4
        expect = p2 if k >= p2 else p1 if k >= p1 else 0
        assert store.longest_prefix(ns, prompt, limit=len(prompt) - 1).n_tokens == expect, k
        if k in extra_lookup:
            # Limit between checkpoints: the earlier one.
            assert store.longest_prefix(ns, T, limit=k).n_tokens == (p2 if k >= p2 else p1 if k >= p1 else 0)
    for p in (p1, p2):
        cache, n = store.fetch(ns, T, limit=end - 1)
        if p == p1:
            cache, n = store.fetch(ns, T, limit=p2 - 1)
        assert n == p
        warm = greedy_continue(model, cache, T[p:], 16)
        cold = make_prompt_cache(model)
        prefill(model, T[:p], cold)
        assert warm == greedy_continue(model, cold, T[p:], 16)
        c1, _ = store.fetch(ns, T, limit=p)
        c2 = make_prompt_cache(model)
        prefill(model, T[:p], c2)
        np.testing.assert_allclose(
            first_logits(model, c1, T[p:]), first_logits(model, c2, T[p:]), rtol=0, atol=1e-5
        )
    store.close()


def test_hybrid_checkpoints(tiny_hybrid, tiny_hybrid_path, tmp_path):
    model, _ = tiny_hybrid
    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    assert "ArraysCache" in kinds
    _checkpoint_case(model, tiny_hybrid_path, tmp_path, 10, 21, 30, {9, 10, 15, 20, 21, 29})


def test_sliding_checkpoints(tiny_sliding, tiny_sliding_path, tmp_path):
    model, _ = tiny_sliding
    windows = [c.max_size for c in make_prompt_cache(model) if type(c).__name__ == "RotatingKVCache"]
    assert windows and max(windows) == 16
    # Both checkpoints lie past the window: the rotating layers have wrapped.
    _checkpoint_case(model, tiny_sliding_path, tmp_path, 19, 37, 45, {18, 19, 30, 37, 44})


def test_sliding_wrapped_by_decoding(tiny_sliding, tiny_sliding_path, tmp_path):
    """A RotatingKVCache rotated in place by one-token decode steps restores exactly."""
    model, _ = tiny_sliding
    prompt = random_tokens(12, seed=5)
    cache = make_prompt_cache(model)
    gen = greedy_continue(model, cache, prompt, 14)  # cache holds prompt + gen[:-1]
    held = prompt + gen[:-1]
    assert cache[0]._idx < cache[0].offset  # really wrapped in place
    store = DiskStore(tmp_path / "s", block_size=4)
    ns = model_namespace(store, tiny_sliding_path, model)
    store.save(ns, held, cache)
    restored, n = store.fetch(ns, held + [gen[-1]])
    assert n == len(held)
    ref = copy.deepcopy(cache)
    np.testing.assert_allclose(
        first_logits(model, restored, [gen[-1]]), first_logits(model, ref, [gen[-1]]), rtol=0, atol=1e-5
    )
    restored, _ = store.fetch(ns, held + [gen[-1]])
    assert greedy_continue(model, restored, [gen[-1]], 24) == greedy_continue(model, cache, [gen[-1]], 24)
    store.close()


def test_namespaces_isolated(tiny_llama, tiny_llama_path, tiny_sliding, tiny_sliding_path, tmp_path):
    m1, _ = tiny_llama
    m2, _ = tiny_sliding
    T = random_tokens(20, seed=6)
    store = DiskStore(tmp_path / "s", block_size=4)
    ns1 = model_namespace(store, tiny_llama_path, m1)
    ns2 = model_namespace(store, tiny_sliding_path, m2)
    assert ns1 != ns2
    store.save(ns1, T, prefilled_cache(m1, T))
    assert store.longest_prefix(ns2, T + [3]).n_tokens == 0
    store.save(ns2, T[:12], prefilled_cache(m2, T[:12]))
    assert store.longest_prefix(ns1, T + [3], limit=20).n_tokens == 20
    assert store.longest_prefix(ns2, T + [3], limit=20).n_tokens == 12
    c2, n2 = store.fetch(ns2, T + [3])
    assert n2 == 12 and [type(c).__name__ for c in c2] == [type(c).__name__ for c in make_prompt_cache(m2)]
    assert greedy_continue(m2, c2, T[12:], 6) == cold_greedy(m2, T, 6)
    store.clear(ns1)
    assert store.longest_prefix(ns1, T + [3]).n_tokens == 0
    assert store.longest_prefix(ns2, T + [3]).n_tokens == 12
    assert set(store.namespaces()) == {ns1, ns2}
    store.close()


def test_changed_weights_new_namespace(tiny_llama, tiny_llama_path, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, _ = tiny_llama
    T = random_tokens(12, seed=7)
    store = DiskStore(tmp_path / "s", block_size=4)
    ns = model_namespace(store, tiny_llama_path, model)
    desc = store.layer_desc(ns)
    store.save(ns, T, prefilled_cache(model, T))
    copy_dir = tmp_path / "m"
    shutil.copytree(tiny_llama_path, copy_dir)
    assert model_namespace(store, copy_dir, layer_desc=desc) == ns  # same files, same ns
    # Same tensors, another header (metadata) -> other namespace.
    w = copy_dir / "model.safetensors"
    save_file(load_file(w), w, metadata={"format": "mlx", "edited": "1"})
    ns_h = model_namespace(store, copy_dir, layer_desc=desc)
    assert ns_h != ns
    # Bigger file -> other namespace again.
    with open(w, "ab") as f:
        f.write(b"\0" * 8)
    ns_s = model_namespace(store, copy_dir, layer_desc=desc)
    assert ns_s not in (ns, ns_h)
    for other in (ns_h, ns_s):
        assert store.longest_prefix(other, T + [3]).n_tokens == 0
    assert store.longest_prefix(ns, T + [3]).n_tokens == 12
    store.close()


def test_salt_isolation(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    T = random_tokens(14, seed=8)
    store = DiskStore(tmp_path / "s", block_size=4)
    ns = model_namespace(store, tiny_llama_path, model)
    store.save(ns, T, prefilled_cache(model, T), salt="tenant-a")
    q = T + [3]
    assert store.longest_prefix(ns, q, salt="tenant-a").n_tokens == 14
    assert store.longest_prefix(ns, q, salt="tenant-b").n_tokens == 0
    assert store.longest_prefix(ns, q).n_tokens == 0
    assert store.fetch(ns, q, salt="tenant-b") == (None, 0)
    store.close()


def test_files_are_safetensors_and_private(tiny_hybrid, tiny_hybrid_path, tmp_path):
    from safetensors.numpy import load_file

    model, _ = tiny_hybrid
    T = random_tokens(10, seed=9)
    root = tmp_path / "s"
    store = DiskStore(root, block_size=4)
    ns = model_namespace(store, tiny_hybrid_path, model)
    store.save(ns, T, prefilled_cache(model, T))
    files = _files(root / "blocks") + _files(root / "checkpoints")
    assert len(files) == 3
    for p in files:
        tensors = load_file(p)
        assert tensors and all(isinstance(a, np.ndarray) for a in tensors.values())
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for d in [root] + [p for p in root.rglob("*") if p.is_dir() and "index" not in p.name]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for p in (root / "index.lmdb").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    # The block file holds only the live rows of the KV layers.
    with store.index.read() as txn:
        recs = [store.index.get(txn, k) for k, _ in store.index.iter_records(txn)]
    blk = next(r for r in recs if r.kind == KIND_BLOCK)
    t = load_file(store.file_path(blk))
    kv = [k for k in t if k.endswith(".k")]
    assert kv and all(t[k].shape[2] == 4 for k in kv)
    store.close()


def test_settings_checked_on_open(tmp_path):
    root = tmp_path / "s"
    DiskStore(root, block_size=8).close()
    with pytest.raises(StoreError, match="block size"):
        DiskStore(root, block_size=16)
    DiskStore(root, block_size=8).close()
    s = DiskStore(root)
    assert s.settings()["format_version"] >= 1 and s.settings()["mlx_lm_version"]
    fmt = s.settings()
    fmt["format_version"] = 99
    s.index.write(lambda txn: s.index.put_format(txn, fmt))
    s.close()
    with pytest.raises(StoreError, match="newer"):
        DiskStore(root)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(StoreError):
        DiskStore(junk)
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(StoreError):
        DiskStore(tmp_path / "absent", readonly=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError):
        DiskStore(f)

"""Damage on disk and in the index: lookups fall back to the longest valid prefix
(never wrong data), check() names each problem, check(fix=True) repairs it all.
Also: a write that fails mid-save leaves the index and the folder as they were."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import random_tokens
from mlx_helpers import cold_greedy, greedy_continue, prefill
from mlx_lm.models.cache import make_prompt_cache

from tiercache.store import blockfile
from tiercache.store.blockfile import TEMP_MARK
from tiercache.store.disk import DiskStore
from tiercache.store.hashing import block_hashes, chain_root
from tiercache.store.namespaces import model_namespace

B = 4
N = 30  # 7 full blocks + a 2-token tail
BAD = 4  # index of the damaged block: tokens [16, 20)


@pytest.fixture
def stored(tiny_llama, tiny_llama_path, tmp_path):
    model, _ = tiny_llama
    T = random_tokens(N, seed=21)
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = model_namespace(store, tiny_llama_path, model)
    cache = make_prompt_cache(model)
    prefill(model, T, cache)
    store.save(ns, T, cache)
    hashes = block_hashes(chain_root(ns), T, B)
    with store.index.read() as txn:
        recs = [store.index.get(txn, h) for h in hashes]
    yield model, store, ns, T, recs
    store.close()


def _kinds(problems):
    return {p.kind for p in problems}


def _damage(how, store, rec):
    path = store.file_path(rec)
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(rec.nbytes - 7)
        return "size_mismatch"
    if how == "flip":
        with open(path, "r+b") as f:
            f.seek(rec.nbytes - 3)  # inside the data section
            b = f.read(1)
            f.seek(rec.nbytes - 3)
            f.write(bytes([b[0] ^ 0x40]))
        return "checksum_mismatch"
    if how == "delete":
        path.unlink()
        return "missing_file"
    if how == "symlink":
        data = path.read_bytes()
        path.unlink()
        target = path.with_name("elsewhere")
        target.write_bytes(data)
        os.rename(target, store.path / "outside")
        os.symlink(store.path / "outside", path)
        return "symlink"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "symlink"])
def test_damaged_file(stored, how):
    model, store, ns, T, recs = stored
    kind = _damage(how, store, recs[BAD])
    problems = store.check()
    assert any(p.kind == kind and p.target == recs[BAD].id.hex() for p in problems), problems
    prompt = T + [3]
    # The plan still reaches the end (the index can't see file damage)...
    assert store.longest_prefix(ns, prompt, limit=N).n_tokens == N
    # ...but restore verifies the files and falls back to the longest valid prefix.
    cache, n = store.fetch(ns, prompt, limit=N)
    assert n == BAD * B
    assert greedy_continue(model, cache, prompt[n:], 8) == cold_greedy(model, prompt, 8)
    assert store.counters["corrupt_records"] == 1
    # The unreachable descendants are reported and repaired.
    after = store.check()
    assert "dangling_parent" in _kinds(after)
    store.check(fix=True)
    assert store.check() == []
    assert store.longest_prefix(ns, prompt, limit=N).n_tokens == BAD * B
    # Saving again heals the store completely.
    cache = make_prompt_cache(model)
    prefill(model, T, cache)
    res = store.save(ns, T, cache)
    assert res.records_written == 7 - BAD + 1
    cache, n = store.fetch(ns, prompt, limit=N)
    assert n == N
    assert greedy_continue(model, cache, prompt[n:], 8) == cold_greedy(model, prompt, 8)
    assert store.check() == []


def test_deleted_parent_record(stored):
    model, store, ns, T, recs = stored
    bad = recs[BAD]
    store.index.write(lambda txn: txn.delete(bad.id, db=store.index.records))
    prompt = T + [3]
    assert store.longest_prefix(ns, prompt, limit=N).n_tokens == BAD * B
    cache, n = store.fetch(ns, prompt, limit=N)
    assert n == BAD * B
    assert greedy_continue(model, cache, prompt[n:], 8) == cold_greedy(model, prompt, 8)
    problems = store.check(temp_grace=0)  # the orphan was written just now
    kinds = _kinds(problems)
    assert {"orphan_file", "dangling_parent", "dangling_child", "byte_drift"} <= kinds, problems
    assert any(p.kind == "orphan_file" and bad.id.hex() in p.target for p in problems)
    dangling = {p.target for p in problems if p.kind == "dangling_parent"}
    assert recs[BAD + 1].id.hex() in dangling
    store.check(fix=True, temp_grace=0)
    assert store.check(temp_grace=0) == []
    assert store.n_records() == BAD
    assert store.total_bytes() == sum(r.nbytes for r in recs[:BAD])
    assert not store.file_path(bad).exists()


def test_leftover_temp_file(stored):
    model, store, ns, T, recs = stored
    path = store.file_path(recs[0])
    tmp = path.with_name(path.name + TEMP_MARK + "12345-abcd")
    tmp.write_bytes(b"partial")
    assert store.check() == []  # young temp files may belong to a running writer
    problems = store.check(temp_grace=0)
    assert [(p.kind, p.target) for p in problems] == [("temp_file", str(tmp))]
    cache, n = store.fetch(ns, T + [3], limit=N)
    assert n == N
    store.check(fix=True, temp_grace=0)
    assert not tmp.exists()
    assert store.check(temp_grace=0) == []


def test_orphan_file_and_byte_drift(stored):
    model, store, ns, T, recs = stored
    orphan = store.path / "blocks" / "ff" / ("ff" * 16 + ".safetensors")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * 10)
    store.index.write(lambda txn: store.index.add_total(txn, 123))
    # Unindexed files younger than the grace may be a save's, renamed in before its commit.
    assert _kinds(store.check()) == {"byte_drift"}
    assert _kinds(store.check(temp_grace=0)) == {"orphan_file", "byte_drift"}
    store.check(fix=True, temp_grace=0)
    assert store.check(temp_grace=0) == [] and not orphan.exists()
    assert store.fetch(ns, T + [3], limit=N)[1] == N


@pytest.mark.parametrize("fail_at", [1, 3, 9])
def test_failed_write_leaves_no_trace(stored, monkeypatch, fail_at):
    """ENOSPC on the n-th fsync of a save: the save raises, the index is unchanged,
    no temp or partial file is visible, and the next save works."""
    model, store, ns, T, recs = stored
    T2 = T[:8] + random_tokens(22, seed=22)
    cache = make_prompt_cache(model)
    prefill(model, T2, cache)
    before_files = sorted(p for p in store.path.rglob("*.safetensors*"))
    before = (store.n_records(), store.total_bytes())
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(blockfile.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        store.save(ns, T2, cache)
    monkeypatch.setattr(blockfile.os, "fsync", real_fsync)
    assert (store.n_records(), store.total_bytes()) == before
    assert sorted(p for p in store.path.rglob("*.safetensors*")) == before_files
    assert store.check(temp_grace=0) == []
    assert store.longest_prefix(ns, T2 + [3], limit=30).n_tokens == 8
    res = store.save(ns, T2, cache)
    assert res.records_written == 30 // B - 2 + 1
    c2, n = store.fetch(ns, T2 + [3], limit=30)
    assert n == 30
    assert greedy_continue(model, c2, [3], 6) == cold_greedy(model, T2 + [3], 6)
    assert store.check(temp_grace=0) == []


def test_failed_file_write(stored, monkeypatch):
    """A write error inside the data section (not only fsync)."""
    model, store, ns, T, recs = stored
    T2 = random_tokens(13, seed=23)
    cache = make_prompt_cache(model)
    prefill(model, T2, cache)
    before = (store.n_records(), store.total_bytes())
    real = blockfile._write_rows
    calls = {"n": 0}

    def failing(f, h, arr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, h, arr)

    monkeypatch.setattr(blockfile, "_write_rows", failing)
    with pytest.raises(OSError):
        store.save(ns, T2, cache)
    monkeypatch.setattr(blockfile, "_write_rows", real)
    assert (store.n_records(), store.total_bytes()) == before
    assert store.check(temp_grace=0) == []
    store.save(ns, T2, cache)
    assert store.fetch(ns, T2 + [3], limit=13)[1] == 13


def test_first_token_index_damage(stored):
    """The first-token index is derived data: damage there costs hits, never data."""
    model, store, ns, T, recs = stored
    with store.index.read() as txn:
        tail_id = store.index.child_ids_starting(txn, recs[-1].id, bytes(4 * [0]))  # none
        assert tail_id == []
        tail = [store.index.get(txn, c) for c in store.index.child_ids(txn, recs[-1].id)][0]
    key = store.index.firsttok_key(tail)
    store.index.write(lambda txn: txn.delete(key, tail.id, db=store.index.firsttok))
    assert store.longest_prefix(ns, T + [3], limit=N).n_tokens == 7 * B
    assert [p.kind for p in store.check()] == ["prefix_link"]
    store.check(fix=True)
    assert store.check() == []
    assert store.longest_prefix(ns, T + [3], limit=N).n_tokens == N


def test_poisoned_record_is_a_miss(stored):
    """A record whose stored tokens are not the prompt's (collision or tampering)
    ends the match: it is never served, and a save never extends it."""
    model, store, ns, T, recs = stored
    bad = recs[BAD]
    forged = list(T[BAD * B : (BAD + 1) * B])
    forged[0] = forged[0] + 1
    from tiercache.store.hashing import pack_tokens

    bad.tokens = pack_tokens(forged)
    store.index.write(lambda txn: txn.put(bad.id, bad.encode(), db=store.index.records))
    prompt = T + [3]
    assert store.longest_prefix(ns, prompt, limit=N).n_tokens == BAD * B
    cache, n = store.fetch(ns, prompt, limit=N)
    assert n == BAD * B
    assert greedy_continue(model, cache, prompt[n:], 6) == cold_greedy(model, prompt, 6)
    c = make_prompt_cache(model)
    prefill(model, T, c)
    res = store.save(ns, T, c)  # the poisoned hash blocks the rest of the chain
    assert res.records_written == 0
    assert store.longest_prefix(ns, prompt, limit=N).n_tokens == BAD * B
    problems = store.check()
    assert ("hash_mismatch", bad.id.hex()) in [(p.kind, p.target) for p in problems]
    store.check(fix=True)
    assert store.check() == []
    assert store.save(ns, T, c).records_written == 7 - BAD + 1
    assert store.fetch(ns, prompt, limit=N)[1] == N


def test_hybrid_bad_checkpoint_falls_back(tiny_hybrid, tiny_hybrid_path, tmp_path):
    model, _ = tiny_hybrid
    T = random_tokens(30, seed=24)
    store = DiskStore(tmp_path / "s", block_size=B)
    ns = model_namespace(store, tiny_hybrid_path, model)
    cache = make_prompt_cache(model)
    prefill(model, T[:10], cache)
    store.save(ns, T[:10], cache)
    prefill(model, T[10:21], cache)
    store.save(ns, T[:21], cache)
    plan = store.longest_prefix(ns, T, limit=29)
    assert plan.n_tokens == 21
    with open(store.file_path(plan.last), "r+b") as f:
        f.seek(plan.last.nbytes - 1)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    restored, n = store.fetch(ns, T, limit=29)
    assert n == 10
    cold = make_prompt_cache(model)
    prefill(model, T[:10], cold)
    assert greedy_continue(model, restored, T[10:], 8) == greedy_continue(model, cold, T[10:], 8)
    store.check(fix=True)
    assert store.check() == []
    store.close()


def test_undecodable_record_counted_and_dropped(stored):
    model, store, ns, T, recs = stored
    bad = recs[BAD]
    store.index.write(lambda txn: txn.put(bad.id, b"junk", db=store.index.records))
    assert "bad_record" in _kinds(store.check())
    plan = store.longest_prefix(ns, T + [3], limit=N)
    assert plan.n_tokens == BAD * B and plan.damaged == [bad.id]
    cache, n = store.fetch(ns, T + [3], limit=N)
    assert n == BAD * B and store.counters["corrupt_records"] == 1
    with store.index.read() as txn:
        assert txn.get(bad.id, db=store.index.records) is None
    store.check(fix=True)
    assert store.check() == []


def test_readonly_store_never_raises_on_bad_files(stored):
    model, store, ns, T, recs = stored
    _damage("flip", store, recs[BAD])
    store.close()  # one LMDB environment per process
    ro = DiskStore(store.path, readonly=True)
    cache, n = ro.fetch(ns, T + [3], limit=N)
    assert n == BAD * B  # can't repair, but still the longest valid prefix
    assert greedy_continue(model, cache, [3], 6) == cold_greedy(model, T[:n] + [3], 6)
    assert ro.fetch(ns, T[:12] + [3], limit=12)[1] == 12  # undamaged prefixes still hit
    ro.close()
    rw = DiskStore(store.path)
    assert rw.fetch(ns, T + [3], limit=N)[1] == BAD * B
    rw.close()


@pytest.mark.parametrize("content", [b"\x01\x02\x03", b"\x0a\x00\x00\x00\x00\x00\x00\x00{\"a\""])
def test_hashing_reader_closes_file_on_truncated_header(tmp_path, content):
    """A block file truncated inside its header must not leak the descriptor
    (restores of damaged stores would otherwise run out of fds)."""
    from tiercache.store.blockfile import BlockFileError, HashingReader

    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(BlockFileError) as ei:
        HashingReader(p)
    tb = ei.value.__traceback__
    readers = []
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, HashingReader):
            readers.append(obj)
        tb = tb.tb_next
    assert readers and all(r.f.closed for r in readers)

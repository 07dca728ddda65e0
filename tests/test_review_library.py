"""Regression tests from a library review: wrong hits, lost entries, exceptions
escaping into the generation thread, leaked file descriptors."""

from __future__ import annotations

import lmdb
import pytest
from conftest import random_tokens
from mlx_helpers import cold_greedy, greedy_continue, prefill
from mlx_lm.models.cache import make_prompt_cache

from tiercache import TieredPromptCache

B = 4


def _snap(model, tokens):
    cache = make_prompt_cache(model)
    prefill(model, tokens, cache)
    return cache


def _gen_equals_cold(model, cache, query, rem, n=8):
    assert cache is not None and 0 < len(rem) < len(query)
    assert all(c.offset == len(query) - len(rem) for c in cache)
    assert greedy_continue(model, cache, rem, n) == cold_greedy(model, query, n)


def test_fetch_disk_failure_keeps_memory_hit(tiny_llama, tiny_llama_path, tmp_path, monkeypatch):
    """A failing disk lookup must not raise into the caller, and must not lose the
    memory entry that was handed over before the disk was asked."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=4, disk_dir=tmp_path / "d", block_size=B)
    try:
        tc.register_model("m", tiny_llama_path, model)
        toks = random_tokens(12, seed=1)
        tc.insert_cache("m", toks, _snap(model, toks))
        tc.flush()

        def boom(*a, **k):
            raise lmdb.Error("simulated LMDB failure")

        monkeypatch.setattr(tc.disk, "longest_prefix", boom)
        query = toks + random_tokens(12, seed=2)
        cache, rem = tc.fetch_nearest_cache("m", query)
        _gen_equals_cold(model, cache, query, rem)
        assert len(rem) == 12
        # the caller didn't re-insert: a give-back-free miss path would have lost it
    finally:
        monkeypatch.undo()
        tc.close()


def test_fetch_and_insert_after_close_do_not_raise(tiny_llama, tiny_llama_path, tmp_path):
    """Server shutdown closes the cache while the generation thread may still be
    serving a request: fetch and insert must degrade to memory-only, not raise."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=4, disk_dir=tmp_path / "d", block_size=B)
    toks = random_tokens(12, seed=3)
    key = str(tiny_llama_path)  # unregistered key naming a model folder
    tc.insert_cache(key, toks, _snap(model, toks))
    tc.close()
    query = toks + random_tokens(12, seed=4)
    cache, rem = tc.fetch_nearest_cache(key, query)
    _gen_equals_cold(model, cache, query, rem)
    other = str(tiny_llama_path) + "/"  # another spelling: not yet bound to a namespace
    tc.insert_cache(other, toks, _snap(model, toks))
    cache, rem = tc.fetch_nearest_cache(other, query)
    _gen_equals_cold(model, cache, query, rem)


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
    tc = TieredPromptCache(max_size=4, disk_dir=d, block_size=B)
    tc.register_model("m", tiny_llama_path, model)
    tc.insert_cache("m", toks, _snap(model, toks))
    tc.close()
    bad = list(toks)
    bad[8] = (toks[8] + 1) % 500 + 3
    _corrupt_record_token(d, 12, bad[8])

    tc = TieredPromptCache(max_size=4, disk_dir=d, prewarm_bytes=1 << 30)
    try:
        tc.register_model("m", tiny_llama_path, model)
        assert tc.wait_prewarmed(30)
        query = bad + random_tokens(6, seed=8)
        cache, rem = tc.fetch_nearest_cache("m", query)
        if cache is not None:
            # whatever is served must be exact for the query
            _gen_equals_cold(model, cache, query, rem)
    finally:
        tc.close()


def test_disk_win_does_not_reinsert_a_cloned_memory_hit(tiny_llama, tiny_llama_path, tmp_path):
    """When the disk beats a memory hit that was cloned (not handed over), the clone
    must not be re-inserted: the entry is still in memory, so the "give back" only
    adds a redundant trimmed copy and evicts a useful entry to make room."""
    model, _ = tiny_llama
    tc = TieredPromptCache(max_size=3, disk_dir=tmp_path / "d", block_size=B, keep_promoted=False)
    try:
        tc.register_model("m", tiny_llama_path, model)
        t = random_tokens(24, seed=11)
        tc.insert_cache("m", t[:20], _snap(model, t[:20]))
        tc.flush()
        other = random_tokens(10, seed=12)
        diverging = t[:8] + random_tokens(6, seed=13)
        third = random_tokens(9, seed=14)
        for toks in (other, diverging, third):  # pushes t[:20] out of memory
            tc.insert_cache("m", toks, _snap(model, toks))
        held = {tuple(e[1]) for e in tc.memory.entries()}
        assert tuple(t[:20]) not in held and len(held) == 3
        found = tc.fetch("m", t)
        cache, rem = found.prompt_cache, found.rest
        assert found.source == "disk"
        _gen_equals_cold(model, cache, t, rem)
        after = {tuple(e[1]) for e in tc.memory.entries()}
        assert after == held  # nothing evicted, no redundant t[:8] entry
    finally:
        tc.close()

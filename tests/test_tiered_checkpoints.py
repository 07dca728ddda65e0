"""Checkpoints for agentic traffic (tiercache.tiers.checkpoints) with the tiny hybrid model
(lfm2: ArraysCache + KVCache, not trimmable) through TieredPromptCache."""

from __future__ import annotations

import pytest
from mlx_helpers import greedy_continue, prefill
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

from tiercache import TieredPromptCache
from tiercache.tiers.checkpoints import (
    Checkpoint,
    CheckpointPolicy,
    chunk_boundaries,
    last_user_message_start,
    prefill_with_checkpoints,
)

STEP = 16
GEN = 10
SYSTEM = (
    "You are a careful assistant. Answer briefly, cite the files you read, and never "
    "invent tool results. The project is a tiered prefix cache for MLX models."
)


def _tokens(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def _chat(user, history=()):
    return [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": user}]


def _run(model, cache, prompt, stops, offset=0):
    """The server's prefill (rule of checkpoints.py) then greedy generation.

    Returns (snapshots at stops, generated tokens); ``cache`` ends holding
    ``prompt + generated[:-1]``.
    """
    snaps = prefill_with_checkpoints(model, cache, prompt[offset:-1], stops, STEP, offset=offset)
    return snaps, greedy_continue(model, cache, prompt[-1:], GEN)


def test_chunk_boundaries_rule():
    assert chunk_boundaries(0, 40, [], 16) == [16, 32, 40]
    assert chunk_boundaries(0, 40, [10], 16) == [10, 26, 40]
    assert chunk_boundaries(10, 40, [10], 16) == [26, 40]  # restored at a stop: same tail
    assert chunk_boundaries(0, 40, [10, 12, 40, 99], 16) == [10, 12, 28, 40]
    assert chunk_boundaries(5, 5, [5], 16) == []
    with pytest.raises(ValueError):
        chunk_boundaries(0, 4, [], 0)


def test_last_user_message_start(tiny_hybrid):
    _, tok = tiny_hybrid
    a = _tokens(tok, _chat("What does the writer do when the disk is slow?"))
    pos = last_user_message_start(tok, _chat("What does the writer do when the disk is slow?"))
    b = _tokens(tok, _chat("Completely different question #2"))
    assert pos == last_user_message_start(tok, _chat("Completely different question #2"))
    assert a[:pos] == b[:pos] and a[pos] != b[pos]  # exactly where the two diverge
    sys_only = tok.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=True)
    assert pos >= len(sys_only)  # the system turn and the user header are included
    # Content that starts like a sentinel can't move the position into the content.
    assert last_user_message_start(tok, _chat("#tiercache-sentinel-B# hi")) == pos
    # With history, the position is after the whole history.
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert last_user_message_start(tok, _chat("next", hist)) > pos
    assert last_user_message_start(tok, [{"role": "system", "content": SYSTEM}]) == 0


def test_policy():
    pol = CheckpointPolicy(min_tokens=32)
    assert pol.plan(prompt_len=100, user_start=40, trimmable=False, total_len=120) == [
        Checkpoint(40, "system"), Checkpoint(100, "user"), Checkpoint(120, "assistant")]
    # Trimmable caches serve shorter prefixes by trimming: no system checkpoint.
    assert pol.plan(prompt_len=100, user_start=40, trimmable=True) == [Checkpoint(100, "user")]
    # Only on a good hit: short one-off prompts get no checkpoints, only the snapshot.
    assert pol.plan(prompt_len=30, user_start=20, trimmable=False, total_len=35) == [
        Checkpoint(35, "assistant")]
    assert pol.stops(prompt_len=100, user_start=40, trimmable=False) == [40]
    assert pol.stops(prompt_len=100, user_start=40, trimmable=False, cached=40) == []
    assert pol.stops(prompt_len=100, user_start=20, trimmable=False) == []


def test_hybrid_conversation_reuses_system_prompt(tiny_hybrid, tiny_hybrid_path, tmp_path):
    model, tok = tiny_hybrid
    key = str(tiny_hybrid_path)
    assert not can_trim_prompt_cache(make_prompt_cache(model))
    pol = CheckpointPolicy(min_tokens=16)
    tc = TieredPromptCache(disk_dir=tmp_path / "store", block_size=8)

    # Conversation A: cold, checkpoints as the policy says.
    msgs_a = _chat("What does the writer do when the disk is slow?")
    prompt_a = _tokens(tok, msgs_a)
    p = last_user_message_start(tok, msgs_a)
    stops = pol.stops(prompt_len=len(prompt_a), user_start=p, trimmable=False)
    assert stops == [p] and p >= 16
    cache = make_prompt_cache(model)
    snaps, gen_a = _run(model, cache, prompt_a, stops)
    assert set(snaps) == {p}
    tc.insert_cache(key, prompt_a[:p], snaps[p], cache_type="system")
    tc.insert_cache(key, prompt_a + gen_a[:-1], cache, cache_type="assistant")

    # Conversation B: same system prompt, another user message.
    msgs_b = _chat("Completely different question #2")
    prompt_b = _tokens(tok, msgs_b)
    sys_len = len(tok.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=True))
    pb = last_user_message_start(tok, msgs_b)
    assert pb == p
    cold = make_prompt_cache(model)
    _, want = _run(model, cold, prompt_b, pol.stops(prompt_len=len(prompt_b), user_start=pb, trimmable=False))

    def warm(tcache):
        found = tcache.fetch(key, prompt_b)
        c, rem = found.prompt_cache, found.rest
        n = len(prompt_b) - len(rem)
        assert c is not None and n >= sys_len and n == p
        st = pol.stops(prompt_len=len(prompt_b), user_start=pb, trimmable=False, cached=n)
        return _run(model, c, prompt_b, st, offset=n)[1], found.source

    assert warm(tc) == (want, "memory")
    assert tc.close(flush_timeout=30)
    with TieredPromptCache(disk_dir=tmp_path / "store", block_size=8) as tc2:  # restart
        assert warm(tc2) == (want, "disk")


def test_exact_hit_hybrid_leaves_a_token(tiny_hybrid, tiny_hybrid_path, tmp_path):
    model, tok = tiny_hybrid
    key = str(tiny_hybrid_path)
    prompt = _tokens(tok, _chat("exact"))
    p = last_user_message_start(tok, _chat("exact"))
    cache = make_prompt_cache(model)
    snaps = prefill_with_checkpoints(model, cache, prompt, [p], STEP)
    with TieredPromptCache(disk_dir=tmp_path / "s", block_size=8) as tc:
        tc.insert_cache(key, prompt[:p], snaps[p], cache_type="system")
        tc.insert_cache(key, prompt, cache, cache_type="user")
        c, rem = tc.fetch_nearest_cache(key, prompt)  # not trimmable: the checkpoint at p
        assert len(rem) >= 1 and len(prompt) - len(rem) == p
        cold = make_prompt_cache(model)
        prefill_with_checkpoints(model, cold, prompt[:-1], [p], STEP)
        want = greedy_continue(model, cold, prompt[-1:], GEN)
        prefill_with_checkpoints(model, c, prompt[p:-1], [p], STEP, offset=p)
        assert greedy_continue(model, c, prompt[-1:], GEN) == want


def test_prefill_with_checkpoints_snapshots_are_stable(tiny_llama):
    model, _ = tiny_llama
    toks = list(range(3, 60))
    cache = make_prompt_cache(model)
    snaps = prefill_with_checkpoints(model, cache, toks, [10, 30, 57, 80], STEP)
    assert sorted(snaps) == [10, 30, 57]
    for pos, snap in snaps.items():  # later writes into `cache` didn't leak into them
        assert all(c.offset == pos for c in snap)
        ref = make_prompt_cache(model)
        prefill(model, toks[:pos], ref)
        import numpy as np

        for a, b in zip(snap, ref):
            np.testing.assert_allclose(np.array(a.keys[..., :pos, :]), np.array(b.keys[..., :pos, :]), atol=1e-4)

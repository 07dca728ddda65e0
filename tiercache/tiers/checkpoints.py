"""Per-request checkpoint helpers for agentic (multi-turn) traffic.

A server using :class:`tiercache.TieredPromptCache` inserts, per request:

* ``"user"``: the prompt state right after prefill;
* ``"assistant"``: the full state after generation (prompt + generated tokens);
* ``"system"``: for caches with non-trimmable layers (``ArraysCache``,
  ``RotatingKVCache``...), the state at the *start of the last user message*,
  found with :func:`last_user_message_start`. A trimmable cache can serve any
  shorter prefix by trimming, so it needs no such checkpoint; a recurrent cache
  can only be restored at a position where a snapshot was taken, and the start of
  the last user message is where the next conversation with the same system
  prompt and history diverges.

:class:`CheckpointPolicy` decides which of these pay for their memory and disk
("only update on a good hit": positions shorter than ``min_tokens`` are one-off
prompts that are cheap to recompute and would only push useful entries out).

The chunk-boundary rule (why :func:`prefill_with_checkpoints` exists)
-----------------------------------------------------------------------
The state of a recurrent layer (``ArraysCache``: conv and SSM states) after a
prefill depends, in floating point, on where the prefill *chunks* started and
ended, not only on the tokens. A restored checkpoint therefore continues
bit-for-bit like a cold run only if both split the prompt at the same positions.
The rule every prefill must follow, cold or warm:

    Let ``r`` be the position the cache already holds (0 for a cold start, the
    restored position for a hit) and ``S`` the set of checkpoint positions of
    the request. Chunk boundaries are generated from ``b = r``:
    ``next(b) = min(smallest s in S with s > b, b + step, end)``.
    In words: split exactly at every checkpoint position, and between two
    consecutive splits, every ``step`` tokens counted from the last split
    (a checkpoint position or the restored position).

Consequence: a checkpoint taken at position ``p`` restores exactly, because
after ``p`` the boundaries depend only on ``p``, ``step`` and the checkpoint
positions after ``p`` — all of which a cold run with the same checkpoint
positions shares. ``end`` is the number of tokens handed to the prefill: like
mlx-lm's ``generate_step`` (which feeds the last prompt token with the first
decode step), a server typically prefills ``prompt[:-1]`` with this function and
hands the last token to the generator. Pure-attention (``KVCache``) models are
insensitive to chunking up to float rounding and need no such care, but the rule
does no harm there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache

from ..chat.render import render_chat
from .memory import clone_prompt_cache
from ..store.namespaces import cache_arrays

def last_user_message_start(tokenizer: Any, messages: list[dict], **template_kwargs) -> int:
    """Token position where the last user or tool-result message's *content* starts.

    A thin wrapper over :func:`tiercache.chat.render_chat` (``need_user_start=True``),
    which renders the chat exactly as the server does and finds the position with
    the sentinel technique. Everything before the returned position (system
    prompt, tools, history, the role header of that message) is shared by any
    request that differs only from that message on.

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer.
        messages: the chat, as passed to ``apply_chat_template``.
        **template_kwargs: extra template arguments (``tools``, ``enable_thinking``...),
            the same the server uses for the real prompt.

    Returns:
        The position, or 0 if there is no user or tool message.
    """
    tools = template_kwargs.pop("tools", None)
    return render_chat(tokenizer, messages, tools=tools, template_kwargs=template_kwargs,
                       need_user_start=True).user_start


@dataclass(frozen=True)
class Checkpoint:
    """One snapshot to insert: the state after ``position`` tokens, of ``cache_type``."""

    position: int
    cache_type: str


class CheckpointPolicy:
    """Decides which checkpoints a request inserts.

    Args:
        min_tokens: checkpoints at positions shorter than this are not inserted
            (one-off short prompts are cheap to recompute and would evict useful
            entries). The final ``"assistant"`` snapshot is always inserted, as
            mlx-lm's server does, when it has at least ``min_assistant_tokens``.
        min_assistant_tokens: floor for the ``"assistant"`` snapshot (default 1).
    """

    def __init__(self, min_tokens: int = 256, min_assistant_tokens: int = 1):
        if min_tokens < 0 or min_assistant_tokens < 0:
            raise ValueError("minimums must be >= 0")
        self.min_tokens = min_tokens
        self.min_assistant_tokens = min_assistant_tokens

    def stops(self, *, prompt_len: int, user_start: int, trimmable: bool, cached: int = 0) -> list[int]:
        """Positions the prefill must split at (and snapshot), for :func:`prefill_with_checkpoints`.

        Only the ``"system"`` checkpoint at the last user message's start lies
        inside the prefill; it is returned when it is past ``cached`` (no need to
        re-snapshot what the cache already restored) and the policy wants it.
        """
        return [
            c.position
            for c in self.plan(prompt_len=prompt_len, user_start=user_start, trimmable=trimmable)
            if c.cache_type == "system" and cached < c.position < prompt_len
        ]

    def plan(
        self,
        *,
        prompt_len: int,
        user_start: int,
        trimmable: bool,
        total_len: int | None = None,
    ) -> list[Checkpoint]:
        """The checkpoints a request should insert, shortest first.

        Args:
            prompt_len: tokens in the prompt.
            user_start: :func:`last_user_message_start` of the request (0 if none).
            trimmable: ``can_trim_prompt_cache(cache)`` of the model's cache.
            total_len: tokens the cache holds after generation (``None``: not known
                yet; the ``"assistant"`` checkpoint is then left out).

        Returns:
            ``"system"`` at ``user_start`` (non-trimmable caches only, when
            ``min_tokens <= user_start < prompt_len``), ``"user"`` at ``prompt_len``
            (when ``>= min_tokens``), ``"assistant"`` at ``total_len``.
        """
        out: list[Checkpoint] = []
        if not trimmable and 0 < user_start < prompt_len and user_start >= self.min_tokens:
            out.append(Checkpoint(user_start, "system"))
        if prompt_len > 0 and prompt_len >= self.min_tokens:
            out.append(Checkpoint(prompt_len, "user"))
        if (
            total_len is not None
            and total_len >= max(1, self.min_assistant_tokens)
            and all(c.position != total_len for c in out)
        ):
            out.append(Checkpoint(total_len, "assistant"))
        return out

    def for_cache(self, cache: list, **kwargs) -> list[Checkpoint]:
        """:meth:`plan` with ``trimmable`` read from a prompt cache."""
        return self.plan(trimmable=can_trim_prompt_cache(cache), **kwargs)


def chunk_boundaries(start: int, end: int, stops: Sequence[int], step: int) -> list[int]:
    """End positions of the prefill chunks from ``start`` to ``end`` (the module's rule)."""
    if step <= 0:
        raise ValueError("step must be positive")
    cuts = sorted({s for s in stops if start < s < end})
    out, b, k = [], start, 0
    while b < end:
        while k < len(cuts) and cuts[k] <= b:
            k += 1
        nxt = min(b + step, end, cuts[k] if k < len(cuts) else end)
        out.append(nxt)
        b = nxt
    return out


def prefill_with_checkpoints(
    model: Any,
    cache: list,
    tokens: Sequence[int],
    stops: Sequence[int],
    step: int,
    *,
    offset: int | None = None,
) -> dict[int, list]:
    """Prefills ``tokens`` into ``cache`` following the chunk-boundary rule.

    Args:
        model: an mlx-lm model.
        cache: the prompt cache to extend in place (may hold a restored prefix).
        tokens: the tokens to feed (those after what ``cache`` already holds).
        stops: absolute checkpoint positions (counted from the start of the
            sequence, like the positions of :class:`Checkpoint`).
        step: prefill chunk size.
        offset: tokens ``cache`` already holds; by default read from the cache's
            first layer with an ``offset`` (0 if none).

    Returns:
        ``{position: snapshot}`` for every stop in ``(offset, offset + len(tokens)]``:
        evaluated shallow clones (:func:`tiercache.tiers.memory.clone_prompt_cache`) that
        stay valid while ``cache`` keeps being written (copy-on-write).
    """
    toks = [int(t) for t in tokens]
    if offset is None:
        offset = next((int(c.offset) for c in cache if isinstance(getattr(c, "offset", None), int)), 0)
    end = offset + len(toks)
    want = {s for s in stops if offset < s <= end}
    snaps: dict[int, list] = {}
    b = offset
    for e in chunk_boundaries(offset, end, stops, step):
        out = model(mx.array(toks[b - offset : e - offset])[None], cache=cache)
        mx.eval(out, list(cache_arrays(cache)))
        if e in want:
            snaps[e] = clone_prompt_cache(cache)
        b = e
    return snaps

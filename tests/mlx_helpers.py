"""Plain helper functions for driving mlx-lm models in tests.

Import them directly (``from mlx_helpers import prefill, cold_greedy``); the
tests directory is on ``sys.path`` under pytest.

Recurrent layers (``ArraysCache``) give results that depend on how the
prompt is split into chunks, so every helper honours ``step`` exactly:
``step=None`` means one forward pass over all tokens.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache


def _as_list(tokens) -> list[int]:
    if isinstance(tokens, mx.array):
        return [int(t) for t in tokens.reshape(-1).tolist()]
    return [int(t) for t in tokens]


def _eval_cache(cache) -> None:
    mx.eval([c.state for c in cache])


def prefill(model, tokens: Sequence[int], cache, step: int | None = None) -> mx.array:
    """Run ``model`` over ``tokens``, updating ``cache`` in place.

    Args:
        model: An mlx-lm model.
        tokens: Token ids (list or 1-D ``mx.array``), at least one.
        cache: List of mlx-lm cache layers (e.g. from ``make_prompt_cache``).
        step: Chunk size; ``None`` processes all tokens in one forward pass.

    Returns:
        The (evaluated) logits of the last token, shape ``(vocab,)``.
    """
    toks = _as_list(tokens)
    if not toks:
        raise ValueError("prefill needs at least one token")
    step = len(toks) if step is None else int(step)
    if step <= 0:
        raise ValueError("step must be positive")
    logits = None
    for start in range(0, len(toks), step):
        chunk = mx.array(toks[start : start + step])[None]
        logits = model(chunk, cache=cache)[0, -1]
        mx.eval(logits)
        _eval_cache(cache)
    return logits


def greedy_continue(
    model, cache, prompt_tokens: Sequence[int], n: int, step: int | None = None
) -> list[int]:
    """Prefill ``prompt_tokens`` into ``cache`` and greedily decode ``n`` tokens.

    There is no EOS stop. As in mlx-lm's generation loop, the last generated
    token is *not* fed back, so afterwards the cache holds
    ``prompt_tokens + result[:-1]``.

    Args:
        model: An mlx-lm model.
        cache: Cache layers to extend (may already hold a prefix).
        prompt_tokens: Tokens to prefill (at least one).
        n: Number of tokens to generate.
        step: Prefill chunk size (see ``prefill``).

    Returns:
        The generated token ids.
    """
    logits = prefill(model, prompt_tokens, cache, step=step)
    out: list[int] = []
    for i in range(n):
        tok = int(mx.argmax(logits).item())
        out.append(tok)
        if i + 1 < n:
            logits = model(mx.array([[tok]]), cache=cache)[0, -1]
            mx.eval(logits)
            _eval_cache(cache)
    return out


def cold_greedy(model, tokens: Sequence[int], n: int, step: int | None = None) -> list[int]:
    """Greedy continuation of ``tokens`` from a fresh ``make_prompt_cache(model)``.

    Args:
        model: An mlx-lm model.
        tokens: The full prompt.
        n: Number of tokens to generate.
        step: Prefill chunk size (see ``prefill``).

    Returns:
        The generated token ids.
    """
    return greedy_continue(model, make_prompt_cache(model), tokens, n, step=step)


def prefilled_cache(model, tokens: Sequence[int], step: int | None = None) -> list:
    """Return a fresh ``make_prompt_cache(model)`` prefilled with ``tokens`` (a snapshot).

    Args:
        model: An mlx-lm model.
        tokens: Token ids, at least one.
        step: Prefill chunk size (see ``prefill``).
    """
    cache = make_prompt_cache(model)
    prefill(model, tokens, cache, step=step)
    return cache


def assert_warm_equals_cold(model, cache, query: Sequence[int], rest: Sequence[int], n: int = 8) -> None:
    """Assert that generating from a fetched ``(cache, rest)`` equals a cold run of ``query``.

    Args:
        model: An mlx-lm model.
        cache: The fetched prompt cache (extended in place).
        query: The whole query the cache was fetched for.
        rest: The tokens the fetch left to compute (at least one).
        n: Number of greedy tokens compared.
    """
    assert cache is not None and 0 < len(rest) < len(query)
    assert all(c.offset == len(query) - len(rest) for c in cache)
    assert greedy_continue(model, cache, rest, n) == cold_greedy(model, query, n)


def first_logits(model, cache, tokens: Sequence[int]) -> np.ndarray:
    """Logits of the last of ``tokens`` after one forward pass on ``cache``.

    Typical use: compare a restored cache against a cold one by feeding the
    remaining suffix. ``cache`` is updated in place.

    Args:
        model: An mlx-lm model.
        cache: Cache layers (already holding any prefix).
        tokens: Tokens to feed in a single forward pass.

    Returns:
        A float32 numpy array of shape ``(vocab,)``.
    """
    logits = prefill(model, tokens, cache, step=None)
    return np.array(logits.astype(mx.float32))

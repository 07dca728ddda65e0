"""What happens to one request's generated tokens, on either generation path.

The sequential path (:meth:`server.engine.Engine.generate`) and the batch
scheduler (:mod:`server.batching`) both hand every generated token to one
:class:`RequestOutput`: it detokenizes, hands the text to
:class:`server.output_events.OutputEvents` (reasoning and tool-call parsing,
stop strings on content), decides the finish reason and, at the end, reports
usage, metrics (also the dashboard's recent requests and the cache's prefill
cost model) and the request's log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .metrics import request_summary
from .output_events import OutputEvents, _StopText  # noqa: F401  (_StopText: tests)

logger = logging.getLogger("tiercache.server")


@dataclass
class Fetched:
    """A request's prompt cache as found in the tiered cache.

    Attributes:
        found: The cache's :class:`tiercache.FetchResult` (per-tier counts).
        seconds: Time the lookup and restore took.
        disk_tier: Whether the cache has a disk tier (``pending_tokens`` shown).
        remote_tier: Whether the cache has a remote tier (``remote_tokens`` shown).
    """

    found: Any
    seconds: float
    disk_tier: bool = False
    remote_tier: bool = False

    @property
    def prompt_cache(self) -> list | None:
        """The restored cache, or ``None`` on a miss."""
        return self.found.prompt_cache

    @property
    def rest(self) -> list[int]:
        """Prompt tokens the cache does not hold (never empty)."""
        return list(self.found.rest)

    @property
    def cached(self) -> int:
        """Prompt tokens the cache holds."""
        return self.found.cached_tokens if self.found.prompt_cache is not None else 0

    @property
    def memory(self) -> int:
        """Of those, tokens served from the memory tier."""
        return self.found.memory_tokens

    @property
    def disk(self) -> int:
        """Of those, tokens served from the disk tier."""
        return self.found.disk_tokens


class RequestOutput:
    """Turns one request's generated tokens into its events.

    Emits ``("start", usage)`` from :meth:`start`; ``("text", str)``,
    ``("reasoning", str)`` and ``("tool_call", ToolCallEvent)`` while tokens
    are fed; and ``("done", finish_reason, usage, stop_sequence)`` from
    :meth:`finish` (``finish_reason`` is ``"tool_calls"`` when a tool call was
    emitted, ``stop_sequence`` the stop string that ended generation or None).

    Args:
        params: The request's :class:`server.engine.GenParams`.
        tokenizer: The mlx-lm ``TokenizerWrapper``.
        emit: Thread-safe callback for events.
        metrics: A :class:`server.metrics.Metrics` (optional).
        cache: The tiered cache, taught the prefill speed (optional).
    """

    def __init__(self, params: Any, tokenizer: Any, emit: Callable[[tuple], None],
                 metrics: Any = None, cache: Any = None):
        self.params = params
        self.emit = emit
        self.metrics = metrics
        self.cache = cache
        self.eos = set(tokenizer.eos_token_ids)
        self.detokenizer = tokenizer.detokenizer
        self.events = OutputEvents(params, tokenizer, list(params.tokens), emit)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.fetched: Fetched | None = None
        self.usage: dict = {}
        self.t_start = time.perf_counter()
        self.t_fetched = self.t_start
        self.t_first: float | None = None
        self._finished = False

    @property
    def prompt_tokens(self) -> list[int]:
        """The request's prompt token ids."""
        return self.params.tokens

    def start(self, fetched: Fetched) -> None:
        """Record the prefix lookup and emit the ``start`` event."""
        self.fetched = fetched
        self.t_fetched = time.perf_counter()
        found, n = fetched.found, len(self.params.tokens)
        if self.metrics is not None:
            self.metrics.observe_fetch(n, fetched.memory, fetched.disk, fetched.seconds,
                                       remote=found.remote_tokens, pending=found.pending_tokens)
        details = {
            "cached_tokens": fetched.cached,
            "memory_tokens": fetched.memory,
            "disk_tokens": fetched.disk,
            # Tiers added later (writer-pending, remote) report themselves.
            **{f"{tier}_tokens": k for tier, k in found.tokens_by_tier.items()},
        }
        if fetched.disk_tier:  # always shown with a disk tier
            details.setdefault("pending_tokens", 0)
        if fetched.remote_tier:  # always shown with a remote tier
            details.setdefault("remote_tokens", 0)
        self.usage = {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n,
                      "prompt_tokens_details": details}
        self.emit(("start", self.usage))

    def feed(self, token: int) -> bool:
        """Take one generated token.

        Args:
            token: The token id.

        Returns:
            Whether the request is done (end of sequence, a stop string or
            ``max_tokens``); :attr:`finish_reason` then says which.
        """
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.generated.append(int(token))
        if token in self.eos:
            self.finish_reason = "stop"
            return True
        self.detokenizer.add_token(token)
        if self.events.feed(self.detokenizer.last_segment):
            self.finish_reason = "stop"
            return True
        if len(self.generated) >= self.params.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def finish(self, reason: str | None = None) -> None:
        """Flush held-back text, emit ``done``, record metrics and log the request.

        Args:
            reason: Overrides the finish reason (e.g. ``"cancelled"``);
                by default the one :meth:`feed` found, else ``"length"``.
        """
        if self._finished:
            return
        self._finished = True
        if reason is not None:
            self.finish_reason = reason
        elif self.finish_reason is None:
            self.finish_reason = "length"
        if not self.events.done and self.finish_reason != "cancelled":
            self.detokenizer.finalize()
            if self.events.feed(self.detokenizer.last_segment):
                self.finish_reason = "stop"
            else:
                self.events.finish()
        if self.events.tool_calls and self.finish_reason != "cancelled":
            self.finish_reason = "tool_calls"
        n_prompt = len(self.params.tokens)
        self.usage["completion_tokens"] = len(self.generated)
        self.usage["total_tokens"] = n_prompt + len(self.generated)
        self.emit(("done", self.finish_reason, self.usage, self.events.stop_sequence))
        self._record(time.perf_counter())

    def _record(self, t_end: float) -> None:
        """Observe the request's metrics and write its log line."""
        p, f = self.params, self.fetched
        n = len(self.generated)
        prefill_s = (self.t_first or t_end) - self.t_start
        ttft = (self.t_first - p.arrived) if self.t_first is not None else None
        decode_s = t_end - (self.t_first or t_end)
        decode_tps = (n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0
        if self.metrics is not None:
            if ttft is not None:
                self.metrics.ttft.observe(ttft)
            self.metrics.prefill.observe(prefill_s)
            self.metrics.generated_tokens.inc(n)
            self.metrics.recent.add(request_summary(p.api, self.usage, ttft, prefill_s,
                                                    decode_tps, self.finish_reason))
        if self.t_first is not None and f is not None and self.finish_reason != "cancelled":
            self._observe_prefill(len(f.rest), self.t_first - self.t_fetched)
        cached, memory, disk = (f.cached, f.memory, f.disk) if f is not None else (0, 0, 0)
        logger.info(
            "request %s: prompt=%d cached=%d (memory=%d disk=%d) prefill=%.3fs ttft=%s "
            "decode=%.1f tok/s completion=%d finish=%s",
            p.request_id,
            len(p.tokens),
            cached,
            memory,
            disk,
            prefill_s,
            f"{ttft:.3f}s" if ttft is not None else "-",
            decode_tps,
            n,
            self.finish_reason,
        )

    def _observe_prefill(self, n_tokens: int, seconds: float) -> None:
        """Teach the cache's cost model how fast this model prefills here."""
        if self.cache is None:
            return
        try:
            self.cache.observe_prefill(n_tokens, seconds)
        except Exception:  # the cost model is advisory
            logger.exception("observe_prefill failed")

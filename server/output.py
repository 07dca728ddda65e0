"""What happens to one request's generated tokens, on either generation path.

The sequential path (:meth:`server.engine.Engine.generate`) and the batch
scheduler (:mod:`server.batching`) both hand every generated token to one
:class:`RequestOutput`: it detokenizes, applies stop strings, emits the
request's events, decides the finish reason and, at the end, reports usage,
metrics and the request's log line. Anything that post-processes generated
text (an output parser, say) replaces :class:`PlainText`, the step that turns
detokenized text into events, in :class:`RequestOutput`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("tiercache.server")


class _StopText:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to send, stop hit)."""
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                end = min(hits)
                out, self.sent = self.text[self.sent:end], end
                return out, True
        end = len(self.text) - self.keep
        if end > self.sent:
            out, self.sent = self.text[self.sent:end], end
            return out, False
        return "", False

    def flush(self) -> str:
        """Return whatever is still held back."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class PlainText:
    """Generated text -> ``("text", piece)`` events, cut at the first stop string.

    The text-to-events step of :class:`RequestOutput`; an output parser
    (reasoning, tool calls) replaces it with an object of the same interface.

    Args:
        params: The request (its ``stops``).
        tokenizer: The model's mlx-lm ``TokenizerWrapper`` (unused here).
        prompt: The prompt token ids (unused here).
        emit: Receives the events.
    """

    def __init__(self, params: Any, tokenizer: Any, prompt: list[int],
                 emit: Callable[[tuple], None]):
        self.emit = emit
        self.stopper = _StopText(params.stops)
        self.tool_calls = 0
        self.done = False

    def feed(self, piece: str) -> bool:
        """Handle a generated piece; return True when generation must stop."""
        text, hit = self.stopper.feed(piece)
        if text:
            self.emit(("text", text))
        if hit:
            self.done = True
        return hit

    def finish(self) -> None:
        """Emit whatever is still held back (not after a stop string)."""
        if self.done:
            return
        tail = self.stopper.flush()
        if tail:
            self.emit(("text", tail))


@dataclass
class Fetched:
    """A request's prompt cache as found in the tiered cache.

    Attributes:
        prompt_cache: The restored cache, or ``None`` on a miss.
        rest: Prompt tokens the cache does not hold (never empty).
        cached: Prompt tokens the cache holds.
        memory: Of those, tokens served from the memory tier.
        disk: Of those, tokens served from the disk tier.
        seconds: Time the lookup and restore took.
    """

    prompt_cache: list | None
    rest: list[int]
    cached: int
    memory: int
    disk: int
    seconds: float


class RequestOutput:
    """Turns one request's generated tokens into its events.

    Emits ``("start", usage)`` from :meth:`start`, ``("text", piece)`` while
    tokens are fed, and ``("done", finish_reason, usage)`` from :meth:`finish`.

    Args:
        params: The request's :class:`server.engine.GenParams`.
        tokenizer: The mlx-lm ``TokenizerWrapper``.
        emit: Thread-safe callback for events.
        metrics: A :class:`server.metrics.Metrics` (optional).
    """

    def __init__(self, params: Any, tokenizer: Any, emit: Callable[[tuple], None],
                 metrics: Any = None):
        self.params = params
        self.emit = emit
        self.metrics = metrics
        self.eos = set(tokenizer.eos_token_ids)
        self.detokenizer = tokenizer.detokenizer
        self.events = PlainText(params, tokenizer, params.tokens, emit)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.fetched: Fetched | None = None
        self.usage: dict = {}
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self._finished = False

    @property
    def prompt_tokens(self) -> list[int]:
        """The request's prompt token ids."""
        return self.params.tokens

    def start(self, fetched: Fetched) -> None:
        """Record the prefix lookup and emit the ``start`` event."""
        self.fetched = fetched
        n = len(self.params.tokens)
        if self.metrics is not None:
            self.metrics.observe_fetch(n, fetched.memory, fetched.disk, fetched.seconds)
        self.usage = {
            "prompt_tokens": n,
            "completion_tokens": 0,
            "total_tokens": n,
            "prompt_tokens_details": {
                "cached_tokens": fetched.cached,
                "memory_tokens": fetched.memory,
                "disk_tokens": fetched.disk,
            },
        }
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
        self.emit(("done", self.finish_reason, self.usage))
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

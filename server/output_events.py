"""Generated text -> engine events: output parsing, then stop strings on content."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class _StopText:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to send, stop hit)."""
        self.text += piece
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
            if hits:
                end, self.matched = min(hits)
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


class OutputEvents:
    """Turns generated text into engine events: parsing, then stop strings.

    Chat requests go through :class:`tiercache.chat.OutputParser`; stop strings
    apply to content text only. Held-back content is flushed before a
    reasoning or tool-call event so events keep the order of the text.

    Args:
        p: The request (``stops``, ``chat``, ``tools``, ``reasoning``,
            ``parallel_tool_calls``).
        tokenizer: The model's mlx-lm ``TokenizerWrapper``.
        prompt: The prompt token ids (a template may open a think block there).
        emit: Receives the events.
    """

    def __init__(self, p: Any, tokenizer: Any, prompt: list[int],
                 emit: Callable[[tuple], None]):
        from tiercache.chat import OutputParser

        self.emit = emit
        self.stopper = _StopText(p.stops)
        self.parser = OutputParser(tokenizer, p.tools, p.reasoning, prompt) if p.chat else None
        self.single_call = not p.parallel_tool_calls
        self.tool_calls = 0
        self.done = False

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended generation, if one did."""
        return self.stopper.matched

    def feed(self, piece: str) -> bool:
        """Handle a generated piece; return True when generation must stop."""
        if self.parser is None:
            return self._content(piece)
        return self._events(self.parser.feed(piece))

    def finish(self) -> None:
        """Emit everything still held back (not after a stop string)."""
        if self.done:
            return
        if self.parser is not None and self._events(self.parser.finish()):
            return
        tail = self.stopper.flush()
        if tail:
            self.emit(("text", tail))

    def _events(self, events: list) -> bool:
        from tiercache.chat import ReasoningDelta, TextDelta

        for ev in events:
            if isinstance(ev, TextDelta):
                if self._content(ev.text):
                    return True
                continue
            tail = self.stopper.flush()
            if tail:
                self.emit(("text", tail))
            if isinstance(ev, ReasoningDelta):
                self.emit(("reasoning", ev.text))
            else:
                self.emit(("tool_call", ev))
                self.tool_calls += 1
                if self.single_call:
                    self.done = True
                    return True
        return False

    def _content(self, piece: str) -> bool:
        text, hit = self.stopper.feed(piece)
        if text:
            self.emit(("text", text))
        if hit:
            self.done = True
        return hit

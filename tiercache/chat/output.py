"""Streaming parser of generated text: content, reasoning and tool calls.

Generated text arrives in the pieces mlx-lm's streaming detokenizer yields.
:class:`OutputParser` splits it into :class:`TextDelta`, :class:`ReasoningDelta`
and :class:`ToolCallEvent` events with mlx-lm's own machinery: the think and
tool-call markers the ``TokenizerWrapper`` inferred for the model, mlx-lm's
``TextStateMachine`` (which matches markers on text, so a marker split across
pieces is still found, and holds back text that may be the start of one), and
the model's ``tool_parser``.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from mlx_lm.generate import TextStateMachine

__all__ = ["OutputParser", "ReasoningDelta", "TextDelta", "ToolCallEvent", "new_call_id",
           "prompt_opens_thinking"]

logger = logging.getLogger("tiercache.chat")


@dataclass(frozen=True)
class TextDelta:
    """Content text."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Reasoning ("thinking") text, without the think markers."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """One parsed tool call.

    Attributes:
        id: A fresh call id (``call_...``).
        name: The function name.
        arguments_json: The arguments, a JSON object as a string.
    """

    id: str
    name: str
    arguments_json: str


Event = TextDelta | ReasoningDelta | ToolCallEvent


def new_call_id() -> str:
    """Return a fresh OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


def prompt_opens_thinking(tokenizer: Any, prompt: list[int] | None) -> bool:
    """Whether ``prompt`` ends inside an open think block (the template opened it).

    Args:
        tokenizer: An mlx-lm ``TokenizerWrapper``.
        prompt: The prompt token ids.

    Returns:
        True if the last think-start marker in the prompt has no think-end after it.
    """
    if not prompt or not getattr(tokenizer, "has_thinking", False):
        return False
    return tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)


def _calls_from(parsed: Any) -> list[ToolCallEvent]:
    """Validate what a tool parser returned; raise ValueError if it is not tool calls."""
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise ValueError("no tool call")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a tool call is not an object")
        name = item.get("name")
        args = item.get("arguments", {})
        if not isinstance(name, str) or not name:
            raise ValueError("a tool call has no name")
        if isinstance(args, str):  # some parsers keep the JSON text
            args = json.loads(args) if args.strip() else {}
        if not isinstance(args, dict):
            raise ValueError("tool call arguments are not an object")
        out.append(ToolCallEvent(new_call_id(), name, json.dumps(args, ensure_ascii=False)))
    return out


class OutputParser:
    """Split generated text into content, reasoning and tool-call events.

    Args:
        tokenizer: The model's mlx-lm ``TokenizerWrapper``.
        tools: The request's tools. Tool calls are only recognised when the
            request has tools and the tokenizer has a tool parser.
        reasoning: Route text between the model's think markers to
            :class:`ReasoningDelta`. When False the markers are ordinary text.
        prompt: The prompt token ids; if the template already opened a think
            block there, generation starts in reasoning.
    """

    def __init__(self, tokenizer: Any, tools: list | None, reasoning: bool,
                 prompt: list[int] | None = None):
        self._tools = tools
        self._parser = getattr(tokenizer, "tool_parser", None)
        self._call_start = getattr(tokenizer, "tool_call_start", None) or ""
        self._call_end = getattr(tokenizer, "tool_call_end", None) or ""
        thinking = bool(reasoning and getattr(tokenizer, "has_thinking", False))
        calling = bool(tools) and getattr(tokenizer, "has_tool_calling", False) \
            and self._parser is not None
        transitions: dict[str, list[tuple[str, str]]] = {"normal": []}
        if thinking:
            transitions["normal"].append((tokenizer.think_start, "reasoning"))
            transitions["reasoning"] = [(tokenizer.think_end, "normal")]
        if calling:
            transitions["normal"].append((self._call_start, "tool"))
            if thinking:  # some models call tools straight from their thoughts
                transitions["reasoning"].append((self._call_start, "tool"))
            transitions["tool"] = [(self._call_end, "normal")] if self._call_end else []
        initial = "reasoning" if thinking and prompt_opens_thinking(tokenizer, prompt) \
            else "normal"
        self._sm = TextStateMachine(transitions)
        self._state = self._sm.make_state(initial)
        self._where = initial
        self._tool_text = ""
        self.tool_calls = 0

    def feed(self, text: str) -> list[Event]:
        """Consume a generated text piece; return the events it completes."""
        if not text:
            return []
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._events(segments)

    def finish(self) -> list[Event]:
        """End of generation: return the events for everything still held back."""
        self._state, rest, where = TextStateMachine.flush(self._state)
        events = self._events([(where, rest)])
        if self._where == "tool":  # the model stopped inside a tool call
            events += self._close_call(terminated=False)
            self._where = "normal"
        return events

    # ------------------------------------------------------------ private
    def _events(self, segments: list[tuple[str | None, str]]) -> list[Event]:
        out: list[Event] = []
        for where, text in segments:
            if self._where == "tool" and where != "tool":
                out += self._close_call(terminated=True)
            self._where = where
            if not text:
                continue
            if where == "tool":
                self._tool_text += text
            elif where == "reasoning":
                out.append(ReasoningDelta(text))
            else:
                out.append(TextDelta(text))
        return _merged(out)

    def _close_call(self, terminated: bool) -> list[Event]:
        text, self._tool_text = self._tool_text, ""
        try:
            calls = _calls_from(self._parser(text, self._tools))
        except Exception as exc:  # never fail a request over a malformed call
            logger.info("generated tool call does not parse (%s: %s); returned as text",
                        type(exc).__name__, exc)
            raw = self._call_start + text + (self._call_end if terminated else "")
            return [TextDelta(raw)]
        self.tool_calls += len(calls)
        return list(calls)


def _merged(events: list[Event]) -> list[Event]:
    """Join consecutive deltas of the same kind."""
    out: list[Event] = []
    for ev in events:
        if out and type(ev) is type(out[-1]) and isinstance(ev, (TextDelta, ReasoningDelta)):
            out[-1] = type(ev)(out[-1].text + ev.text)
        else:
            out.append(ev)
    return out

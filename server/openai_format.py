"""Pure builders of OpenAI response bodies and stream chunks (no I/O, no state)."""

from __future__ import annotations

import json
from typing import Any

from tiercache.chat import ToolCallEvent

__all__ = [
    "ChatAccumulator",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "event_delta",
    "finish_reason",
    "sse",
    "tool_call_delta",
    "tool_call_json",
    "usage_chunk",
]


def sse(data: dict | str) -> str:
    """Return one server-sent event line for ``data`` (a dict is JSON-encoded)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def finish_reason(reason: str) -> str:
    """Map an engine finish reason to OpenAI's (a cancelled job reports ``stop``)."""
    return "stop" if reason == "cancelled" else reason


def tool_call_json(ev: ToolCallEvent) -> dict:
    """Return a tool call as ``message.tool_calls[i]``."""
    return {"id": ev.id, "type": "function",
            "function": {"name": ev.name, "arguments": ev.arguments_json}}


def tool_call_delta(index: int, ev: ToolCallEvent) -> dict:
    """Return a tool call as one complete ``delta.tool_calls[i]`` entry."""
    return {"index": index, **tool_call_json(ev)}


class ChatAccumulator:
    """Collects a job's events into one non-streaming chat message."""

    def __init__(self):
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCallEvent] = []

    def add(self, event: tuple) -> None:
        """Add a ``("text" | "reasoning" | "tool_call", value)`` event."""
        kind, value = event[0], event[1]
        if kind == "text":
            self.content.append(value)
        elif kind == "reasoning":
            self.reasoning.append(value)
        elif kind == "tool_call":
            self.tool_calls.append(value)

    def message(self) -> dict:
        """Return the assistant message: content, reasoning_content, tool_calls."""
        content = "".join(self.content)
        msg: dict[str, Any] = {"role": "assistant",
                               "content": content if content or not self.tool_calls else None}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = [tool_call_json(ev) for ev in self.tool_calls]
        return msg


def chat_response(base: dict, message: dict, finish: str, usage: dict) -> dict:
    """Return a ``chat.completion`` body.

    Args:
        base: ``id``, ``created``, ``model``, ``system_fingerprint``.
        message: The assistant message (:meth:`ChatAccumulator.message`).
        finish: The engine finish reason.
        usage: The usage dict.
    """
    choice = {"index": 0, "message": message, "finish_reason": finish_reason(finish),
              "logprobs": None}
    return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}


def completion_response(base: dict, text: str, finish: str, usage: dict) -> dict:
    """Return a ``text_completion`` body."""
    choice = {"index": 0, "text": text, "finish_reason": finish_reason(finish),
              "logprobs": None}
    return {**base, "object": "text_completion", "choices": [choice], "usage": usage}


def chat_chunk(base: dict, delta: dict, finish: str | None = None,
               include_usage: bool = False) -> dict:
    """Return a ``chat.completion.chunk`` with one choice.

    Args:
        base: ``id``, ``created``, ``model``, ``system_fingerprint``.
        delta: ``role``, ``content``, ``reasoning_content`` and/or ``tool_calls``.
        finish: The engine finish reason of the last chunk, else None.
        include_usage: Add ``"usage": null`` (``stream_options.include_usage``).
    """
    choice = {"index": 0, "delta": delta,
              "finish_reason": finish_reason(finish) if finish else None, "logprobs": None}
    out = {**base, "object": "chat.completion.chunk", "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


def completion_chunk(base: dict, text: str, finish: str | None = None,
                     include_usage: bool = False) -> dict:
    """Return a streaming ``text_completion`` chunk."""
    choice = {"index": 0, "text": text,
              "finish_reason": finish_reason(finish) if finish else None, "logprobs": None}
    out = {**base, "object": "text_completion", "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(base: dict, usage: dict, chat: bool = True) -> dict:
    """Return the final chunk of ``stream_options.include_usage``: no choices, usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {**base, "object": obj, "choices": [], "usage": usage}


def event_delta(event: tuple, tool_index: int) -> dict | None:
    """Return the chat ``delta`` for a job event (None for other events).

    Args:
        event: ``("text", str)``, ``("reasoning", str)`` or ``("tool_call", ev)``.
        tool_index: The index of this tool call in the response.
    """
    kind, value = event[0], event[1]
    if kind == "text":
        return {"content": value}
    if kind == "reasoning":
        return {"reasoning_content": value}
    if kind == "tool_call":
        return {"tool_calls": [tool_call_delta(tool_index, value)]}
    return None

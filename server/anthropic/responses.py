"""Pure builders for Anthropic Messages API responses, stream events and errors.

Nothing here touches the engine: the routes feed engine events in and send
what comes out, so every byte of the wire format is unit-testable.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

# A thinking block's signature normally proves the thinking came from the API.
# Ours proves nothing; clients only need a stable non-empty string to send back.
THINKING_SIGNATURE = "tiercache"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "overloaded_error",  # only a full queue answers 429 here: not a rate limit
    499: "invalid_request_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

# Engine finish reasons -> Anthropic stop reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "cancelled": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


def message_id() -> str:
    """Return a fresh message id (``msg_`` + 24 hex digits)."""
    return "msg_" + uuid.uuid4().hex[:24]


def tool_use_id(call_id: str | None = None) -> str:
    """Return the ``toolu_`` id of a tool call.

    Args:
        call_id: The id the output parser gave the call (``call_...``), if any.

    Returns:
        ``call_id`` if it already starts with ``toolu_``, ``toolu_`` + the rest
        of a ``call_`` id, or a fresh ``toolu_`` + 24 hex digits.
    """
    if call_id and call_id.startswith("toolu_"):
        return call_id
    if call_id:
        return "toolu_" + call_id.removeprefix("call_")
    return "toolu_" + uuid.uuid4().hex[:24]


def error_type(status: int) -> str:
    """Return the Anthropic error type for an HTTP status."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str) -> dict:
    """Return ``{"type": "error", "error": {"type", "message"}}`` for ``status``."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def stop_reason(finish: str, stop_sequence: str | None = None) -> str:
    """Map an engine finish reason to an Anthropic ``stop_reason``.

    Args:
        finish: ``stop``, ``length``, ``tool_calls`` or ``cancelled``.
        stop_sequence: The stop sequence that ended generation, if one did.

    Returns:
        ``end_turn``, ``max_tokens``, ``stop_sequence`` or ``tool_use``.
    """
    if stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(finish, "end_turn")


def usage_body(usage: dict | None) -> dict:
    """Translate the engine's usage into Anthropic's.

    ``input_tokens`` counts the prompt tokens computed for this request and
    ``cache_read_input_tokens`` those served from the cache, so the two add up
    to the prompt's length. Nothing is billed for writing the cache:
    ``cache_creation_input_tokens`` is always 0. ``tiercache`` splits the cache
    reads by tier.

    Args:
        usage: ``{"prompt_tokens", "completion_tokens", "prompt_tokens_details":
            {"cached_tokens", "memory_tokens", "disk_tokens"}}`` or ``None``.

    Returns:
        The ``usage`` object of a message.
    """
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = min(int(details.get("cached_tokens") or 0), prompt)
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "tiercache": {
            "prompt_tokens": prompt,
            "memory_tokens": int(details.get("memory_tokens") or 0),
            "disk_tokens": int(details.get("disk_tokens") or 0),
        },
    }


def parse_tool_input(arguments_json: str) -> dict:
    """Parse a tool call's arguments into the ``input`` object of a ``tool_use`` block.

    Args:
        arguments_json: The arguments as the output parser gave them.

    Returns:
        The object; a value that is not a JSON object is wrapped as
        ``{"value": ...}`` (``input`` must be an object) and unparsable text
        as ``{"raw": text}``, never an exception.
    """
    try:
        value = json.loads(arguments_json) if arguments_json.strip() else {}
    except ValueError:
        return {"raw": arguments_json}
    return value if isinstance(value, dict) else {"value": value}


def message_body(msg_id: str, model: str, content: list[dict], finish: str,
                 stop_sequence: str | None, usage: dict | None) -> dict:
    """Return a complete (non-streaming) Messages API response.

    Args:
        msg_id: The ``msg_`` id.
        model: The model name to report.
        content: Content blocks, in order.
        finish: The engine's finish reason.
        stop_sequence: The stop sequence that ended generation, if any.
        usage: The engine's final usage.

    Returns:
        The ``message`` object.
    """
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish, stop_sequence),
        "stop_sequence": stop_sequence,
        "usage": usage_body(usage),
    }


class _AfterThinking:
    """Drops the newlines a template puts between ``</think>`` and the answer.

    The answer block then starts with its first real character, like the
    API's; chat templates strip those newlines when they re-render a reply.
    """

    def __init__(self):
        self.stripping = False

    def text(self, piece: str) -> str:
        if self.stripping:
            piece = piece.lstrip("\n")
            self.stripping = piece == ""
        return piece

    def thinking(self) -> None:
        self.stripping = True


class ContentCollector:
    """Gather engine output events into the content blocks of one message.

    Consecutive text (or thinking) pieces join one block; a tool call is a
    block of its own.
    """

    def __init__(self):
        self.blocks: list[dict] = []
        self._after = _AfterThinking()

    def text(self, piece: str) -> None:
        """Append generated answer text."""
        self._append("text", "text", self._after.text(piece))

    def thinking(self, piece: str) -> None:
        """Append generated reasoning text."""
        self._after.thinking()
        self._append("thinking", "thinking", piece)

    def tool_use(self, call_id: str | None, name: str, arguments_json: str) -> None:
        """Append a parsed tool call."""
        self.blocks.append({"type": "tool_use", "id": tool_use_id(call_id), "name": name,
                            "input": parse_tool_input(arguments_json)})

    def _append(self, kind: str, key: str, piece: str) -> None:
        if not piece:
            return
        if self.blocks and self.blocks[-1]["type"] == kind:
            self.blocks[-1][key] += piece
            return
        block = {"type": kind, key: piece}
        if kind == "thinking":
            block["signature"] = THINKING_SIGNATURE
        self.blocks.append(block)


def sse(event: str, data: dict) -> str:
    """Format one server-sent event with ``event:`` and ``data:`` lines."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


PING = sse("ping", {"type": "ping"})


@dataclass
class StreamBuilder:
    """Turn engine output into Anthropic stream events, in the API's order.

    ``message_start``; per block ``content_block_start``, deltas,
    ``content_block_stop``; ``message_delta``; ``message_stop``. Each method
    returns the SSE strings to send now (possibly none).

    Attributes:
        msg_id: The message id.
        model: The model name to report.
    """

    msg_id: str
    model: str
    _index: int = -1
    _open: str | None = None
    _after: _AfterThinking = field(default_factory=_AfterThinking)

    def start(self, usage: dict | None) -> list[str]:
        """Return ``message_start`` with an empty content list and the prompt usage."""
        message = message_body(self.msg_id, self.model, [], "stop", None, usage)
        message["stop_reason"] = None
        return [sse("message_start", {"type": "message_start", "message": message})]

    def text(self, piece: str) -> list[str]:
        """Return the events for a piece of answer text."""
        piece = self._after.text(piece)
        if not piece:
            return []
        out = self._ensure("text", {"type": "text", "text": ""})
        out.append(self._delta({"type": "text_delta", "text": piece}))
        return out

    def thinking(self, piece: str) -> list[str]:
        """Return the events for a piece of reasoning text."""
        self._after.thinking()
        if not piece:
            return []
        out = self._ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(self._delta({"type": "thinking_delta", "thinking": piece}))
        return out

    def tool_use(self, call_id: str | None, name: str, arguments_json: str) -> list[str]:
        """Return the events of a whole tool call (one ``input_json_delta``)."""
        out = self._close()
        self._index += 1
        self._open = "tool_use"
        block = {"type": "tool_use", "id": tool_use_id(call_id), "name": name, "input": {}}
        out.append(sse("content_block_start", {"type": "content_block_start",
                                               "index": self._index, "content_block": block}))
        # Send the arguments re-serialized from the parsed object, so that the
        # client's accumulated JSON always parses.
        partial = json.dumps(parse_tool_input(arguments_json), ensure_ascii=False)
        out.append(self._delta({"type": "input_json_delta", "partial_json": partial}))
        out.extend(self._close())
        return out

    def finish(self, finish: str, stop_sequence: str | None, usage: dict | None) -> list[str]:
        """Return the closing events: last ``content_block_stop``, ``message_delta``,
        ``message_stop``."""
        out = self._close()
        body = usage_body(usage)
        out.append(sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(finish, stop_sequence),
                      "stop_sequence": stop_sequence},
            "usage": body,
        }))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return out

    def error(self, status: int, message: str) -> list[str]:
        """Return an ``error`` event (the stream ends after it)."""
        return [sse("error", error_body(status, message))]

    def _ensure(self, kind: str, block: dict) -> list[str]:
        if self._open == kind:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(sse("content_block_start", {"type": "content_block_start",
                                               "index": self._index, "content_block": block}))
        return out

    def _delta(self, delta: dict) -> str:
        return sse("content_block_delta", {"type": "content_block_delta",
                                           "index": self._index, "delta": delta})

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta",
                                    "signature": THINKING_SIGNATURE}))
        out.append(sse("content_block_stop", {"type": "content_block_stop",
                                              "index": self._index}))
        self._open = None
        return out

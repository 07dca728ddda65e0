"""Pydantic request models for the OpenAI-compatible endpoints.

Models are strict (no ``"5"`` -> ``5`` coercion) and ignore unknown fields,
as OpenAI clients send extras we do not use.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 1 << 20
MAX_STOPS = 8


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """One part of a multi-part message content."""

    type: str
    text: str | None = None


class FunctionCall(_Strict):
    """``function`` of an assistant message's tool call: arguments are a JSON string."""

    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Strict):
    """A tool call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """A chat message; content may be a string, a list of text parts or null."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """Return the content as one string.

        Raises:
            ValueError: If a part is not text (images are not supported).
        """
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"unsupported message content part type {part.type!r}")
            out.append(part.text)
        return "".join(out)

    def to_template(self) -> dict:
        """Return the message as a chat-template dict (see ``tiercache.chat.render``).

        ``developer`` becomes ``system``; tool-call arguments (JSON strings in
        OpenAI requests) become dicts, as chat templates expect.

        Raises:
            ValueError: If a content part is not text or arguments are not a
                JSON object.
        """
        role = "system" if self.role == "developer" else self.role
        msg: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            if self.content is None:
                msg["content"] = None
            msg["tool_calls"] = [_template_call(c, i) for i, c in enumerate(self.tool_calls)]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        return msg


def _template_call(call: ToolCall, index: int) -> dict:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ValueError(f"tool_calls[{index}].function.arguments is not valid JSON: "
                             f"{call.function.arguments[:80]!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool_calls[{index}].function.arguments must be a JSON object")
    return {"id": call.id or f"call_{index}", "type": "function",
            "function": {"name": call.function.name, "arguments": args}}


class FunctionDef(_Strict):
    """``function`` of a tool: name, description and a JSON-schema ``parameters``."""

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """A function tool the model may call."""

    type: Literal["function"] = "function"
    function: FunctionDef

    def to_template(self) -> dict:
        """Return the tool as chat templates expect it (OpenAI's shape, nulls dropped)."""
        fn: dict[str, Any] = {"name": self.function.name}
        if self.function.description is not None:
            fn["description"] = self.function.description
        fn["parameters"] = self.function.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": fn}


class NamedFunction(_Strict):
    """``{"name": ...}`` of a named tool choice."""

    name: str


class NamedToolChoice(_Strict):
    """``tool_choice`` naming one function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Strict):
    """``stream_options`` of a streaming request."""

    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, max_length=1024)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value):
        if value is None:
            return value
        for key, bias in value.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    def bias_by_id(self) -> dict[int, float] | None:
        """Return ``logit_bias`` with integer token ids."""
        if not self.logit_bias:
            return None
        return {int(k): float(v) for k, v in self.logit_bias.items()}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        """Return ``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        """Return ``max_completion_tokens`` or ``max_tokens`` if given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``; ``prompt`` is text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], (str, list)):
                if len(value) != 1:
                    raise ValueError("only one prompt per request is supported")
                value = value[0]
        if isinstance(value, str) and value == "":
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value


class CacheResetRequest(_Strict):
    """Body of ``POST /v1/cache/reset``."""

    tier: Literal["memory", "disk"] | None = None

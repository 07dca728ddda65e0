"""Pydantic request models for the OpenAI-compatible endpoints.

Models are strict (no ``"5"`` -> ``5`` coercion) and ignore unknown fields,
as OpenAI clients send extras we do not use.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 1 << 20
MAX_STOPS = 8


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """One part of a multi-part message content."""

    type: str
    text: str | None = None


class ChatMessage(_Strict):
    """A chat message; content may be a string or a list of text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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

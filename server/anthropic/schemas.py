"""Request bodies of the Anthropic Messages API.

Unknown fields are ignored everywhere: Claude Code sends new ones often
(``context_management``, ``output_config``...). Content blocks are parsed by
their ``type``; a type we cannot render lands in :class:`OtherBlock` and
:mod:`.translate` refuses it with a clear message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

MAX_STOP_SEQUENCES = 8


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Lenient):
    """``{"type": "text", "text"}`` (``cache_control`` and citations ignored)."""

    type: Literal["text"]
    text: str


class ImageBlock(_Lenient):
    """An ``image`` or ``document`` block (refused: the model reads no images)."""

    type: Literal["image", "document"]


class ToolUseBlock(_Lenient):
    """A past tool call of the assistant."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


_ResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Lenient):
    """The result of a tool call, sent in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[_ResultPart] | None = None
    is_error: bool = False


class ThinkingBlock(_Lenient):
    """Past reasoning of the assistant (the signature is not checked)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    """Encrypted reasoning from Anthropic's API: nothing a local model can read."""

    type: Literal["redacted_thinking"]
    data: str | None = None


class OtherBlock(_Lenient):
    """Any other block type (server tool results, containers...)."""

    type: str


_KNOWN = {"text", "image", "document", "tool_use", "tool_result", "thinking",
          "redacted_thinking"}


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _KNOWN else "other"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[ImageBlock, Tag("document")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag),
]


class Message(_Lenient):
    """One message of the conversation.

    ``system`` messages in the middle of a conversation are Claude Code's
    ``mid-conversation-system`` beta; they render as system messages.
    """

    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(_Lenient):
    """A tool: a client tool (``name``, ``description``, ``input_schema``) or a
    server tool (``type`` such as ``web_search_20250305``), which is ignored."""

    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    def is_client_tool(self) -> bool:
        """Whether the model is told about this tool (server tools are dropped)."""
        return self.type in (None, "custom")


class ToolChoice(_Lenient):
    """``tool_choice``: ``auto``, ``any``, ``tool`` (with ``name``) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Lenient):
    """``thinking``: ``enabled`` (or ``adaptive``) turns the model's thinking on."""

    type: str
    budget_tokens: int | None = None

    def enabled(self) -> bool:
        """Whether the request asks the model to think."""
        return self.type != "disabled"


class CountTokensRequest(_Lenient):
    """Body of ``POST /v1/messages/count_tokens``."""

    model: str | None = None
    system: str | list[TextBlock] | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    """Body of ``POST /v1/messages``.

    ``seed`` and ``cache_salt`` are tiercache extensions (as on the OpenAI
    routes); Anthropic's API has neither.
    """

    max_tokens: int = Field(ge=1, le=1 << 20)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    cache_salt: str | None = Field(default=None, max_length=1024)

    @field_validator("stop_sequences")
    @classmethod
    def _check_stops(cls, value):
        if value is None:
            return value
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

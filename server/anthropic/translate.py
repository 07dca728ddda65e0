"""Anthropic request -> chat-template messages, tools and template variables.

Pure and deterministic: the same history always becomes the same messages,
so it renders to the same tokens every turn and a prefix cache can reuse it.
The rules (also in README "Anthropic Messages API"):

* ``system`` (a string or text blocks) becomes the first system message; text
  blocks join with a blank line. ``cache_control`` markers never change
  anything. A block starting ``x-anthropic-billing-header:`` (Claude Code puts
  one first; some versions carry a per-request value in it) is dropped unless
  ``keep_billing_header``.
* A user message's text blocks join (blank line) into one user message; each
  ``tool_result`` becomes a ``tool`` message (``tool_call_id`` = the
  ``tool_use_id``), in block order. Its content (a string or text blocks,
  joined by newlines) is prefixed with ``Error: `` when ``is_error``.
* An assistant message becomes one assistant message: its text blocks
  concatenated as ``content``, its ``tool_use`` blocks as ``tool_calls`` with
  the same ids and the ``input`` object as arguments, its ``thinking`` blocks
  as ``reasoning_content``. Whether past reasoning is rendered is the chat
  template's choice (Qwen3 drops it before the last user query; the demo
  template keeps it so replies re-render as generated). ``redacted_thinking``
  is encrypted for Anthropic's models only and is dropped.
* A ``system`` message inside ``messages`` (Claude Code's mid-conversation
  system beta) stays a system message where it is.
* Images and documents are refused (this server's models read no images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schemas import (
    CountTokensRequest,
    ImageBlock,
    Message,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"


class TranslationError(ValueError):
    """The request cannot be rendered for this model (HTTP 400).

    Args:
        message: Explanation for the client.
        param: Where in the request, e.g. ``messages[2].content[0]``.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


@dataclass
class Translated:
    """A Messages request in chat-template terms.

    Attributes:
        messages: Hugging Face chat-template message dicts.
        tools: OpenAI function tools, or None.
        tool_choice: ``auto``, ``required``, ``none`` or a tool name (None: auto).
        parallel_tool_calls: False when ``disable_parallel_tool_use``.
        template_kwargs: ``{"enable_thinking": bool}``.
        dropped_billing_header: Whether a billing-header block was dropped.
        dropped_server_tools: Names of server tools left out.
    """

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    dropped_billing_header: bool = False
    dropped_server_tools: list[str] = field(default_factory=list)


_NO_IMAGES = "images and documents are not supported: this model reads text only"


def is_billing_header(text: str) -> bool:
    """Whether a system text block is Claude Code's billing header."""
    return text.lstrip().startswith(BILLING_HEADER_PREFIX)


def system_text(system: str | list[TextBlock] | None,
                keep_billing_header: bool = False) -> tuple[str | None, bool]:
    """Return the system prompt as one string and whether a billing header was dropped."""
    if system is None:
        return None, False
    if isinstance(system, str):
        if not keep_billing_header and is_billing_header(system):
            return None, True
        return system, False
    texts, dropped = [], False
    for block in system:
        if not keep_billing_header and is_billing_header(block.text):
            dropped = True
            continue
        texts.append(block.text)
    return ("\n\n".join(texts) if texts else None), dropped


def _text_of(blocks, where: str, sep: str) -> str:
    out = []
    for j, block in enumerate(blocks):
        if isinstance(block, ImageBlock):
            raise TranslationError(_NO_IMAGES, f"{where}[{j}]")
        out.append(block.text)
    return sep.join(out)


def _tool_result(block: ToolResultBlock, where: str) -> dict:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = _text_of(content, where + ".content", "\n")
    if block.is_error:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def _user(msg: Message, where: str) -> list[dict]:
    if isinstance(msg.content, str):
        return [{"role": "user", "content": msg.content}]
    out: list[dict] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": "\n\n".join(texts)})
            texts.clear()

    for j, block in enumerate(msg.content):
        at = f"{where}.content[{j}]"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            flush()
            out.append(_tool_result(block, at))
        elif isinstance(block, ImageBlock):
            raise TranslationError(_NO_IMAGES, at)
        else:
            raise TranslationError(f"a {block.type!r} block cannot be in a user message", at)
    flush()
    return out


def _assistant(msg: Message, where: str) -> dict:
    if isinstance(msg.content, str):
        return {"role": "assistant", "content": msg.content}
    texts, calls, thoughts = [], [], []
    for j, block in enumerate(msg.content):
        at = f"{where}.content[{j}]"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlock):
            continue
        elif isinstance(block, ImageBlock):
            raise TranslationError(_NO_IMAGES, at)
        else:
            raise TranslationError(f"a {block.type!r} block cannot be rendered for this "
                                   "model", at)
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        out["tool_calls"] = calls
    if thoughts:
        out["reasoning_content"] = "\n".join(thoughts)
    return out


def _system_message(msg: Message, where: str) -> dict:
    if isinstance(msg.content, str):
        return {"role": "system", "content": msg.content}
    for j, block in enumerate(msg.content):
        if not isinstance(block, TextBlock):
            raise TranslationError("a system message holds text blocks only",
                                   f"{where}.content[{j}]")
    return {"role": "system", "content": "\n\n".join(b.text for b in msg.content)}


def to_messages(messages: list[Message]) -> list[dict]:
    """Translate the conversation (without the top-level system prompt).

    Raises:
        TranslationError: Images, misplaced blocks, or a final assistant
            message (prefill of the reply is not supported).
    """
    out: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role == "user":
            out.extend(_user(msg, where))
        elif msg.role == "assistant":
            out.append(_assistant(msg, where))
        else:
            out.append(_system_message(msg, where))
    if messages[-1].role == "assistant":
        raise TranslationError("the last message must be a user message (continuing a "
                               "partial assistant reply is not supported)",
                               f"messages[{len(messages) - 1}]")
    return out


def to_tools(tools: list[Tool] | None) -> tuple[list[dict] | None, list[str]]:
    """Return the client tools as OpenAI function tools, and the server tools left out.

    Raises:
        TranslationError: A client tool without ``input_schema``.
    """
    if not tools:
        return None, []
    out, dropped = [], []
    for i, tool in enumerate(tools):
        if not tool.is_client_tool():
            dropped.append(tool.name)
            continue
        if tool.input_schema is None:
            raise TranslationError("input_schema is required", f"tools[{i}]")
        out.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description or "",
            "parameters": tool.input_schema}})
    return (out or None), dropped


def to_tool_choice(choice: ToolChoice | None) -> tuple[str | None, bool]:
    """Return ``(tool_choice for the job layer, parallel tool calls allowed)``.

    Raises:
        TranslationError: ``{"type": "tool"}`` without a name.
    """
    if choice is None:
        return None, True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise TranslationError("tool_choice of type \"tool\" needs a name", "tool_choice")
        return choice.name, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def translate(req: CountTokensRequest, keep_billing_header: bool = False) -> Translated:
    """Translate a Messages (or count_tokens) request.

    Args:
        req: The parsed request body.
        keep_billing_header: Render Claude Code's billing-header system block.

    Returns:
        The :class:`Translated` request.

    Raises:
        TranslationError: If the request cannot be rendered for this model.
    """
    system, dropped = system_text(req.system, keep_billing_header)
    messages = to_messages(req.messages)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    tools, server_tools = to_tools(req.tools)
    choice, parallel = to_tool_choice(req.tool_choice)
    thinking = req.thinking is not None and req.thinking.enabled()
    return Translated(messages=messages, tools=tools, tool_choice=choice,
                      parallel_tool_calls=parallel,
                      template_kwargs={"enable_thinking": thinking},
                      dropped_billing_header=dropped, dropped_server_tools=server_tools)

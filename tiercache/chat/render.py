"""Chat prompt rendering: messages (+ tools) -> prompt tokens, checkpoint position.

This is the one place where a chat becomes tokens. The server, ``tiercache
warm`` and the checkpoint code all call :func:`render_chat`, so a warmed or
checkpointed prefix is exactly the prefix a request renders to.

Messages are Hugging Face chat-template dicts::

    {"role": "system" | "user" | "assistant" | "tool",
     "content": str | None,
     "tool_calls": [{"id", "type": "function",
                     "function": {"name", "arguments": dict}}],   # assistant
     "tool_call_id": str,                                         # tool
     "reasoning_content": str}                                    # optional

and ``tools`` are OpenAI function tools
(``[{"type": "function", "function": {"name", "description", "parameters"}}]``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TiercacheError

__all__ = ["RenderError", "RenderedPrompt", "last_turn_start", "render_chat"]

logger = logging.getLogger("tiercache.chat")

#: Two sentinels with different first characters: the common prefix of the real
#: rendering with *both* stops before the message content even if that content
#: happens to start like one of them.
_SENTINELS = ("\u2063tiercache-sentinel-A\u2063", "#tiercache-sentinel-B#")

#: Roles whose message starts a new "turn" of input: the checkpoint position.
_TURN_ROLES = ("user", "tool")


class RenderError(TiercacheError, ValueError):
    """The chat cannot be rendered (template error, tools without a template...)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered chat prompt.

    Attributes:
        tokens: Prompt token ids, ending with the assistant generation prompt.
        user_start: Token position where the content of the last user or
            tool-result message starts (0 if not computed or there is none).
    """

    tokens: list[int]
    user_start: int = 0


def _template_tokens(tokenizer: Any, messages: list[dict], tools: list | None,
                     template_kwargs: dict) -> list[int]:
    """Apply the model's chat template and return token ids."""
    kwargs = {"add_generation_prompt": True, **template_kwargs}
    if tools:
        kwargs["tools"] = tools
    try:
        out = tokenizer.apply_chat_template(messages, **kwargs, tokenize=True)
    except Exception as exc:  # template errors are the request's fault
        raise RenderError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    if hasattr(out, "keys") and "input_ids" in out:  # transformers >= 5 may return a dict
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # an mx.array or numpy array
        out = out.tolist()
    if out and isinstance(out[0], list):  # batched form
        out = out[0]
    return [int(t) for t in out]


def _plain_text(messages: list[dict]) -> str:
    """Render a chat for a model without a template: ``role: content`` lines."""
    lines = []
    for m in messages:
        content = m.get("content") or ""
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {})
            content += f"\n[tool call {fn.get('name')}: {json.dumps(fn.get('arguments'))}]"
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines) + "\nassistant:"


def _tokens(tokenizer: Any, messages: list[dict], tools: list | None,
            template_kwargs: dict) -> list[int]:
    if getattr(tokenizer, "has_chat_template", False):
        return _template_tokens(tokenizer, messages, tools, template_kwargs)
    if tools:
        raise RenderError("this model has no chat template, so it cannot be given tools")
    try:
        return [int(t) for t in tokenizer.encode(_plain_text(messages))]
    except Exception as exc:  # e.g. a lone surrogate
        raise RenderError(f"the messages cannot be tokenized: {exc}") from None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _last_turn_index(messages: list[dict]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in _TURN_ROLES:
            return i
    return None


def last_turn_start(tokenizer: Any, messages: list[dict], tokens: Sequence[int],
                    tools: list | None = None, template_kwargs: dict | None = None) -> int:
    """Return where the content of the last user or tool-result message starts.

    Renders the chat again with that message's content replaced by a sentinel
    string and returns the length of the common token prefix with ``tokens``
    (the minimum over two different sentinels, so content that happens to
    start like a sentinel can't push the position into the content).
    Everything before the position (system prompt, tools, history, the role
    header of that message) is shared by any request that differs only from
    that message on.

    Args:
        tokenizer: An mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer.
        messages: The chat, as rendered into ``tokens``.
        tokens: The real rendering (:attr:`RenderedPrompt.tokens`).
        tools: The tools the real rendering was given.
        template_kwargs: The template arguments the real rendering was given.

    Returns:
        The position, or 0 if there is no user or tool message.

    Raises:
        RenderError: If the template fails on the sentinel rendering.
    """
    last = _last_turn_index(messages)
    if last is None:
        return 0
    best = len(tokens)
    for s in _SENTINELS:
        alt = list(messages)
        alt[last] = {**messages[last], "content": s}
        other = _tokens(tokenizer, alt, tools, template_kwargs or {})
        best = min(best, _common_prefix(tokens, other))
    return best


def render_chat(tokenizer: Any, messages: list[dict], tools: list | None = None,
                template_kwargs: dict | None = None,
                need_user_start: bool = False) -> RenderedPrompt:
    """Render a chat through the model's own chat template and tokenize it.

    Calls ``apply_chat_template(messages, tools=tools, add_generation_prompt=True,
    **template_kwargs)``. A model without a chat template gets ``role: content``
    lines ending with ``assistant:`` (and cannot take tools).

    Args:
        tokenizer: An mlx-lm ``TokenizerWrapper`` (or a Hugging Face tokenizer).
        messages: Hugging Face chat-template message dicts (see the module doc).
        tools: OpenAI function tools, or None.
        template_kwargs: Extra template variables (``enable_thinking``...).
        need_user_start: Also compute :attr:`RenderedPrompt.user_start` (two
            more renderings; models with non-trimmable cache layers need it
            for their checkpoint). 0 if the template refuses the sentinel.

    Returns:
        The prompt tokens and, if asked for, the last user/tool message start.

    Raises:
        RenderError: If the template fails or tools are given to a model
            without a template.
    """
    kwargs = dict(template_kwargs or {})
    tokens = _tokens(tokenizer, messages, tools, kwargs)
    user_start = 0
    if need_user_start and getattr(tokenizer, "has_chat_template", False):
        try:
            user_start = last_turn_start(tokenizer, messages, tokens, tools, kwargs)
        except RenderError as exc:  # a missing checkpoint only costs speed
            logger.debug("no user-start position: %s", exc)
    return RenderedPrompt(tokens=tokens, user_start=user_start)

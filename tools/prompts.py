"""Prompts for ``tiercache warm``: reading the JSONL file, tokenizing like the server."""

from __future__ import annotations

import json
from pathlib import Path


def chat_messages(messages: list, where: str) -> list[dict]:
    """Chat-template dicts exactly as the server renders a request's messages (same
    validation; text parts joined; tool-call arguments parsed), so warmed tokens match."""
    from pydantic import ValidationError

    from tiercache.server.schemas import ChatMessage

    try:
        return [ChatMessage.model_validate(m).to_template() for m in messages]
    except (ValidationError, ValueError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ValueError(f"{where}: bad chat messages: {first}") from None


def chat_tools(tools: list, where: str) -> list[dict]:
    """OpenAI function tools exactly as the server passes them to the template."""
    from pydantic import ValidationError

    from tiercache.server.schemas import Tool

    try:
        return [Tool.model_validate(t).to_template() for t in tools]
    except ValidationError as exc:
        raise ValueError(f"{where}: bad tools: {exc.errors()[0]['msg']}") from None


def read_prompts(path: str) -> list[dict]:
    """Prompts from a JSONL file: ``{"messages": [...]}`` (optionally with ``"tools"``
    and ``"chat_template_kwargs"``, as in a chat request), ``{"text": "..."}``, a JSON
    string, or (for a line that isn't JSON) the line itself as plain text."""
    out = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = line
        if isinstance(obj, str):
            out.append({"text": obj})
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            where = f"{path}:{i}"
            kwargs = obj.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise ValueError(f"{where}: chat_template_kwargs must be an object")
            out.append({"messages": chat_messages(obj["messages"], where),
                        "tools": chat_tools(obj.get("tools") or [], where) or None,
                        "template_kwargs": kwargs})
        elif isinstance(obj, dict) and isinstance(obj.get("text", obj.get("prompt")), str):
            out.append({"text": obj.get("text", obj.get("prompt"))})
        else:
            raise ValueError(f"{path}:{i}: expected {{\"messages\": [...]}}, {{\"text\": \"...\"}} or a string")
    return out


def prompt_tokens(tokenizer, prompt: dict, need_user_start: bool = False):
    """Tokens exactly as the server makes them (:func:`tiercache.chat.render_chat`).

    Returns:
        A :class:`tiercache.chat.RenderedPrompt` (``user_start`` 0 for plain text).

    Raises:
        ValueError: If the chat cannot be rendered.
    """
    from tiercache.chat import RenderedPrompt, render_chat

    if "messages" in prompt:
        return render_chat(tokenizer, prompt["messages"], tools=prompt.get("tools"),
                           template_kwargs=prompt.get("template_kwargs"),
                           need_user_start=need_user_start)
    return RenderedPrompt(list(tokenizer.encode(prompt["text"])), 0)

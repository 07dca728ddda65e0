"""Prompts for ``tiercache warm``: reading the JSONL file, tokenizing like the server."""

from __future__ import annotations

import json
from pathlib import Path


def chat_messages(messages: list, where: str) -> list[dict]:
    """``[{"role", "content"}]`` with string contents, exactly as the server renders a
    request's messages (same validation; text parts joined), so warmed tokens match."""
    from pydantic import ValidationError

    from tiercache.server.schemas import ChatMessage

    try:
        parsed = [ChatMessage.model_validate(m) for m in messages]
        return [{"role": m.role, "content": m.text()} for m in parsed]
    except (ValidationError, ValueError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ValueError(f"{where}: bad chat messages: {first}") from None


def read_prompts(path: str) -> list[dict]:
    """Prompts from a JSONL file: ``{"messages": [...]}``, ``{"text": "..."}``, a JSON
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
            out.append({"messages": chat_messages(obj["messages"], f"{path}:{i}")})
        elif isinstance(obj, dict) and isinstance(obj.get("text", obj.get("prompt")), str):
            out.append({"text": obj.get("text", obj.get("prompt"))})
        else:
            raise ValueError(f"{path}:{i}: expected {{\"messages\": [...]}}, {{\"text\": \"...\"}} or a string")
    return out


def prompt_tokens(tokenizer, prompt: dict) -> list[int]:
    """Tokens exactly as the server makes them (chat template + generation prompt)."""
    if "messages" in prompt:
        msgs = prompt["messages"]
        if getattr(tokenizer, "has_chat_template", False):
            out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return [int(t) for t in out]
        text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:"
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(prompt["text"]))


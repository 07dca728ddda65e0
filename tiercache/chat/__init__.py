"""Chat prompts and model output: rendering (messages + tools -> tokens) and parsing
(generated text -> content, reasoning, tool calls). No server imports."""

from .output import (
    OutputParser,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    new_call_id,
    prompt_opens_thinking,
)
from .render import RenderedPrompt, RenderError, last_turn_start, render_chat

__all__ = [
    "OutputParser",
    "ReasoningDelta",
    "RenderError",
    "RenderedPrompt",
    "TextDelta",
    "ToolCallEvent",
    "last_turn_start",
    "new_call_id",
    "prompt_opens_thinking",
    "render_chat",
]

"""OutputParser on token streams from the demo model's real tokenizer.

Each stream is the text a model would generate, tokenized by the real tokenizer
(``<think>``, ``<tool_call>``... are single special tokens) and detokenized piece
by piece by mlx-lm's streaming detokenizer, exactly as ``stream_generate`` yields
it. The same text is then also fed re-split at every character position, so a
marker cut in the middle (``<tool_`` + ``call>``) is covered.
"""

from __future__ import annotations

import json

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tiercache.server.output_events import OutputEvents

from tiercache.chat import OutputParser, TextDelta, ToolCallEvent

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "n": 2}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok(demo_model_path):
    return load_tokenizer(demo_model_path)


def pieces(tok, text: str) -> list[str]:
    """The text pieces mlx-lm's streaming detokenizer yields for ``text``'s tokens."""
    ids = tok.encode(text, add_special_tokens=False)
    det = tok.detokenizer
    out = []
    for t in ids:
        det.add_token(t)
        out.append(det.last_segment)
    det.finalize()
    out.append(det.last_segment)
    return [p for p in out if p]


def run(tok, stream, tools=TOOLS, reasoning=True, prompt=None) -> list:
    """Feed ``stream`` (a list of pieces) and return normalised events."""
    parser = OutputParser(tok, tools, reasoning, prompt)
    events = []
    for p in stream:
        events += parser.feed(p)
    events += parser.finish()
    return normalise(events)


def normalise(events) -> list:
    out: list = []
    for ev in events:
        if isinstance(ev, ToolCallEvent):
            assert ev.id.startswith("call_") and len(ev.id) > 10
            out.append(("tool", ev.name, json.loads(ev.arguments_json)))
        else:
            kind = "text" if isinstance(ev, TextDelta) else "reasoning"
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + ev.text)
            elif ev.text:
                out.append((kind, ev.text))
    return out


def all_splits(tok, text: str, **kw) -> list:
    """Events for the detokenizer's pieces, one character at a time, and every 2-way split."""
    real = run(tok, pieces(tok, text), **kw)
    assert run(tok, list(text), **kw) == real
    for i in range(1, len(text)):
        assert run(tok, [text[:i], text[i:]], **kw) == real, i
    return real


def test_demo_tokenizer_has_markers(tok):
    assert tok.has_tool_calling and tok.has_thinking
    assert (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")
    assert len(tok.encode("<tool_call>", add_special_tokens=False)) == 1
    # The marker arrives whole, glued to the space the detokenizer held back.
    assert " <tool_call>" in pieces(tok, "a " + CALL)


def test_plain_text(tok):
    text = "The cache keeps what it computed. Nothing else."
    assert all_splits(tok, text) == [("text", text)]


def test_text_then_tool_call(tok):
    events = all_splits(tok, "Let me check.\n" + CALL)
    assert events == [("text", "Let me check.\n"),
                      ("tool", "get_weather", {"city": "Paris"})]


def test_several_tool_calls(tok):
    events = all_splits(tok, CALL + "\n" + CALL2)
    assert events == [("tool", "get_weather", {"city": "Paris"}), ("text", "\n"),
                      ("tool", "get_time", {"zone": "CET", "n": 2})]


def test_malformed_json_is_text(tok):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}\n</tool_call>'
    assert all_splits(tok, "ok " + bad + " done") == [("text", "ok " + bad + " done")]


def test_call_without_name_is_text(tok):
    bad = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    assert run(tok, pieces(tok, bad)) == [("text", bad)]


def test_reasoning_then_tool_call(tok):
    text = "<think>\nThe user wants the weather.\n</think>\n\n" + CALL
    assert all_splits(tok, text) == [("reasoning", "\nThe user wants the weather.\n"),
                                     ("text", "\n\n"),
                                     ("tool", "get_weather", {"city": "Paris"})]


def test_no_reasoning_when_disabled(tok):
    text = "<think>\nhmm\n</think>\nAnswer."
    assert run(tok, pieces(tok, text), reasoning=False) == [("text", text)]


def test_template_opened_think_in_prompt(tok):
    prompt = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    text = "Considering.\n</think>\n\nIt is sunny."
    events = run(tok, pieces(tok, text), prompt=prompt)
    assert events == [("reasoning", "Considering.\n"), ("text", "\n\nIt is sunny.")]
    closed = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n",
                        add_special_tokens=False)
    assert run(tok, pieces(tok, "Hi"), prompt=closed) == [("text", "Hi")]


def test_no_tools_means_no_tool_calls(tok):
    assert run(tok, pieces(tok, CALL), tools=None) == [("text", CALL)]


def test_unterminated_call_at_finish(tok):
    whole = CALL[: -len("\n</tool_call>")]
    assert run(tok, pieces(tok, whole)) == [("tool", "get_weather", {"city": "Paris"})]
    cut = CALL[:30]
    assert run(tok, pieces(tok, cut)) == [("text", cut)]


def test_partial_marker_held_then_flushed(tok):
    parser = OutputParser(tok, TOOLS, True)
    assert normalise(parser.feed("see <tool_")) == [("text", "see ")]
    assert normalise(parser.finish()) == [("text", "<tool_")]


def _engine_events(tok, text, stops=(), parallel=True, chat=True):
    from tiercache.server.engine import GenParams

    p = GenParams(tokens=[1], max_tokens=10, stops=list(stops), chat=chat, tools=TOOLS,
                  reasoning=True, parallel_tool_calls=parallel)
    got: list = []
    out = OutputEvents(p, tok, [1], got.append)
    stopped = False
    for piece in pieces(tok, text):
        if out.feed(piece):
            stopped = True
            break
    if not stopped:
        out.finish()
    return got, out.tool_calls, stopped


def test_engine_events_stop_strings_apply_to_content_only(tok):
    text = "<think>\nSTOP here is fine\n</think>\nAnswer STOP ignored"
    got, calls, stopped = _engine_events(tok, text, stops=["STOP"])
    assert stopped and calls == 0
    kinds = [e[0] for e in got]
    assert "reasoning" in kinds
    assert "".join(e[1] for e in got if e[0] == "reasoning") == "\nSTOP here is fine\n"
    assert "".join(e[1] for e in got if e[0] == "text") == "\nAnswer "


def test_engine_events_keep_order_and_single_call(tok):
    got, calls, stopped = _engine_events(tok, "Sure.\n" + CALL + CALL2, stops=["zzz"])
    assert [e[0] for e in got][-1] == "tool_call" and calls == 2 and not stopped
    assert "".join(e[1] for e in got if e[0] == "text") == "Sure.\n"
    kinds = [e[0] for e in got]
    assert max(i for i, k in enumerate(kinds) if k == "text") < kinds.index("tool_call")
    got, calls, stopped = _engine_events(tok, "Sure.\n" + CALL + CALL2, parallel=False)
    assert calls == 1 and stopped and got[-1][1].name == "get_weather"


def test_plain_completion_is_not_parsed(tok):
    got, calls, _ = _engine_events(tok, "<think>x</think>" + CALL, chat=False)
    assert calls == 0 and "".join(e[1] for e in got) == "<think>x</think>" + CALL

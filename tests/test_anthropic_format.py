"""Unit tests of the Anthropic Messages API translation and response builders (pure)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tiercache.server.anthropic.responses import (
    THINKING_SIGNATURE,
    ContentCollector,
    StreamBuilder,
    error_body,
    message_body,
    parse_tool_input,
    stop_reason,
    usage_body,
)
from tiercache.server.anthropic.schemas import CountTokensRequest, MessagesRequest
from tiercache.server.anthropic.translate import TranslationError, translate
from tiercache.tools.bench.claude_trace import load_trace, shared_form

TRACES = Path(__file__).resolve().parent.parent / "tools/bench/traces"


def _req(**kw) -> MessagesRequest:
    kw.setdefault("max_tokens", 10)
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return MessagesRequest.model_validate(kw)


def _events(chunks: list[str]) -> list[tuple[str, dict]]:
    out = []
    for chunk in chunks:
        head, data = chunk.strip().split("\n")
        assert head.startswith("event: ") and data.startswith("data: ")
        body = json.loads(data[6:])
        assert body["type"] == head[7:]
        out.append((head[7:], body))
    return out


def test_system_blocks_join_and_billing_header_is_dropped_unless_kept():
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abc;"},
              {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Be brief."}]
    t = translate(_req(system=system))
    assert t.dropped_billing_header
    assert t.messages[0] == {"role": "system", "content": "You are an agent.\n\nBe brief."}
    kept = translate(_req(system=system), keep_billing_header=True)
    assert not kept.dropped_billing_header
    assert kept.messages[0]["content"].startswith("x-anthropic-billing-header: cc_version=1")
    other = copy.deepcopy(system)
    other[0]["text"] = "x-anthropic-billing-header: cc_version=1; cch=zzz;"
    assert translate(_req(system=other)).messages == t.messages


def test_cache_control_markers_never_change_the_translation():
    base = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": [{"type": "text", "text": "c"}]}]
    moved = copy.deepcopy(base)
    moved[0]["content"][1]["cache_control"] = {"type": "ephemeral"}
    moved[2]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    assert translate(_req(messages=base)).messages == translate(_req(messages=moved)).messages
    assert translate(_req(messages=base)).messages[0] == {"role": "user", "content": "a\n\nb"}


def test_tool_use_and_tool_results_map_to_tool_calls_and_tool_messages():
    messages = [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should run ls.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Running."},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"file_path": "/a"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no such file"},
                         {"type": "text", "text": "(ENOENT)"}]},
            {"type": "text", "text": "go on"}]},
    ]
    t = translate(_req(messages=messages))
    assert t.messages == [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "Running.", "reasoning_content": "I should run ls.",
         "tool_calls": [
             {"id": "toolu_1", "type": "function",
              "function": {"name": "Bash", "arguments": {"command": "ls"}}},
             {"id": "toolu_2", "type": "function",
              "function": {"name": "Read", "arguments": {"file_path": "/a"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such file\n(ENOENT)"},
        {"role": "user", "content": "go on"},
    ]


def test_tools_choice_and_thinking():
    tools = [{"name": "Bash", "description": "Run", "input_schema": {"type": "object"}},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
    t = translate(_req(tools=tools, tool_choice={"type": "any"},
                       thinking={"type": "enabled", "budget_tokens": 1024}))
    assert t.tools == [{"type": "function", "function": {
        "name": "Bash", "description": "Run", "parameters": {"type": "object"}}}]
    assert t.dropped_server_tools == ["web_search"]
    assert t.tool_choice == "required" and t.template_kwargs == {"enable_thinking": True}
    assert translate(_req(thinking={"type": "adaptive"})).template_kwargs["enable_thinking"]
    assert not translate(_req(thinking={"type": "disabled"})).template_kwargs["enable_thinking"]
    assert not translate(_req()).template_kwargs["enable_thinking"]
    named = translate(_req(tools=tools, tool_choice={"type": "tool", "name": "Bash",
                                                     "disable_parallel_tool_use": True}))
    assert named.tool_choice == "Bash" and named.parallel_tool_calls is False
    assert translate(_req(tool_choice={"type": "none"})).tool_choice == "none"


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                    "content": [{"type": "image", "source": {}}]}]}],
     "messages[0].content[0].content[0]"),
    ([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]},
      {"role": "user", "content": "x"}], "messages[1].content[0]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
     "messages[1]"),
])
def test_untranslatable_content_is_a_clear_error(messages, where):
    with pytest.raises(TranslationError) as exc:
        translate(_req(messages=messages))
    assert exc.value.param == where


def test_unknown_fields_are_ignored_and_mid_conversation_system_kept():
    req = _req(context_management={"edits": []}, output_config={"effort": "high"},
               messages=[{"role": "user", "content": "a", "new_field": 1},
                         {"role": "system", "content": "reminder"},
                         {"role": "user", "content": "b"}])
    assert [m["role"] for m in translate(req).messages] == ["user", "system", "user"]
    assert CountTokensRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})


def test_recorded_claude_code_turns_translate_to_growing_histories():
    for name in ("claude_code.json", "claude_code_all_tools.json"):
        bodies = [r["body"] for r in load_trace(TRACES / name)["requests"]
                  if r["path"] == "/v1/messages"]
        assert len(bodies) >= 3
        previous = None
        for body in bodies:
            t = translate(MessagesRequest.model_validate(body))
            assert t.dropped_billing_header and t.template_kwargs == {"enable_thinking": True}
            assert t.tools and all(tool["function"]["parameters"] for tool in t.tools)
            if previous is not None:
                assert t.messages[:len(previous)] == previous
                assert t.tools == previous_tools
            previous, previous_tools = t.messages, t.tools


def test_trace_shared_form_round_trips(tmp_path):
    requests = [{"path": "/v1/messages", "body": {"system": [{"text": "s"}], "tools": [1],
                                                  "messages": [i]}} for i in range(3)]
    data = {"x": 1, **shared_form(requests)}
    assert len(data["shared"]) == 2
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    assert load_trace(path)["requests"] == requests


def test_usage_adds_up_to_the_prompt():
    u = usage_body({"prompt_tokens": 100, "completion_tokens": 7,
                    "prompt_tokens_details": {"cached_tokens": 90, "memory_tokens": 40,
                                              "disk_tokens": 50}})
    assert u["input_tokens"] + u["cache_read_input_tokens"] == 100
    assert u == {"input_tokens": 10, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 90, "output_tokens": 7,
                 "tiercache": {"prompt_tokens": 100, "memory_tokens": 40, "disk_tokens": 50}}


def test_stop_reasons_and_error_bodies():
    assert stop_reason("stop") == "end_turn"
    assert stop_reason("stop", "END") == "stop_sequence"
    assert stop_reason("length") == "max_tokens"
    assert stop_reason("tool_calls") == "tool_use"
    assert error_body(401, "no")["error"] == {"type": "authentication_error", "message": "no"}
    assert error_body(529, "busy")["error"]["type"] == "overloaded_error"
    assert error_body(429, "queue full")["error"]["type"] == "overloaded_error"
    assert error_body(500, "x") == {"type": "error",
                                    "error": {"type": "api_error", "message": "x"}}
    assert error_body(404, "x")["error"]["type"] == "not_found_error"


def test_tool_input_is_always_an_object():
    assert parse_tool_input('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_tool_input("") == {}
    assert parse_tool_input("[1]") == {"value": [1]}
    assert parse_tool_input("{oops") == {"raw": "{oops"}


def test_collector_and_message_body():
    c = ContentCollector()
    for piece in ("Let me ", "think."):
        c.thinking(piece)
    c.text("Calling.")
    c.tool_use("call_abc", "Bash", '{"command": "ls"}')
    body = message_body("msg_1", "m", c.blocks, "tool_calls", None,
                        {"prompt_tokens": 5, "completion_tokens": 3})
    assert body["content"][0] == {"type": "thinking", "thinking": "Let me think.",
                                  "signature": THINKING_SIGNATURE}
    assert body["content"][1] == {"type": "text", "text": "Calling."}
    tool = body["content"][2]
    assert tool["id"] == "toolu_abc" and tool["input"] == {"command": "ls"}
    assert body["stop_reason"] == "tool_use" and body["stop_sequence"] is None


def test_stream_events_come_in_anthropic_order():
    b = StreamBuilder("msg_1", "m")
    usage = {"prompt_tokens": 9, "completion_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": 4}}
    chunks = b.start(usage) + b.thinking("hm") + b.thinking("m") + b.text("Hi") \
        + b.text(" there") + b.tool_use("call_1", "Read", '{"file_path": "/x"}') \
        + b.text("after") + b.finish("tool_calls", None, dict(usage, completion_tokens=6))
    events = _events(chunks)
    assert [e for e, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5 and start["usage"]["cache_read_input_tokens"] == 4
    deltas = [d["delta"] for e, d in events if e == "content_block_delta"]
    assert [d["type"] for d in deltas] == ["thinking_delta", "thinking_delta", "signature_delta",
                                           "text_delta", "text_delta", "input_json_delta",
                                           "text_delta"]
    assert json.loads(deltas[5]["partial_json"]) == {"file_path": "/x"}
    indexes = [d["index"] for e, d in events if e.startswith("content_block")]
    assert indexes == sorted(indexes) and indexes[-1] == 3
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == 6
    assert _events(b.error(500, "boom"))[0][1]["error"]["type"] == "api_error"


def test_answer_after_thinking_starts_at_its_first_character():
    c = ContentCollector()
    c.thinking("hm")
    for piece in ("\n", "\n", "Hi\n", "there"):
        c.text(piece)
    assert c.blocks[1] == {"type": "text", "text": "Hi\nthere"}
    b = StreamBuilder("msg_1", "m")
    chunks = b.thinking("hm") + b.text("\n\n") + b.text("\nHi") + b.text("\n")
    texts = [d["delta"]["text"] for e, d in _events(chunks) if d.get("delta", {}).get("type")
             == "text_delta"]
    assert texts == ["Hi", "\n"]


def test_empty_stream_has_no_content_blocks():
    b = StreamBuilder("msg_1", "m")
    events = _events(b.start(None) + b.text("") + b.finish("stop", "END", None))
    assert [e for e, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_keep_billing_header_flag_and_env():
    from tiercache.server.config import parse_config

    assert parse_config([]).keep_billing_header is False
    assert parse_config(["--keep-billing-header"]).keep_billing_header is True
    env = {"TIERCACHE_KEEP_BILLING_HEADER": "1"}
    assert parse_config([], env=env).keep_billing_header is True
    assert parse_config([], env={"TIERCACHE_KEEP_BILLING_HEADER": "off"}).keep_billing_header is False
    with pytest.raises(SystemExit):  # the flag takes no value
        parse_config(["--keep-billing-header", "false"])
    with pytest.raises(SystemExit):
        parse_config([], env={"TIERCACHE_KEEP_BILLING_HEADER": "maybe"})

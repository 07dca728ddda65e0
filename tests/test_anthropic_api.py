"""The Anthropic Messages API over real HTTP, with the official ``anthropic`` SDK.

Servers are real ``tiercache-server`` processes on the demo model. Tool-use and
thinking *responses* run on the scripted-sampler server (``tests/scripted_server.py``:
only the token choice is scripted; model, detokenizer, parser, HTTP are real).
The SDK no longer takes ``temperature`` as an argument, so it goes in ``extra_body``.
"""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tiercache.tools.server_process import start_server

from tiercache.chat import render_chat

pytestmark = pytest.mark.slow

KEY = "sekrit-key"
GREEDY = {"temperature": 0}
SYSTEM = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=00001;"},
          {"type": "text", "text": "You are a coding agent. Use tools; answer briefly.",
           "cache_control": {"type": "ephemeral"}}]
TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}]
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
    for t in TOOLS]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPTS = ["Let me look.\n" + CALL,
           "<think>\nThe user wants Paris.\n</think>\n\nIt is sunny in Paris."]


def _client(srv, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)


def _sse(srv, body: dict, key: str = KEY) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", srv.base_url + "/v1/messages?beta=true", json=body,
                      headers={"x-api-key": key}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                events.append((name, data))
    return events


def _order_ok(names: list[str]) -> bool:
    """Anthropic's event grammar (pings may come anywhere after message_start)."""
    seq = " ".join(n for n in names if n != "ping")
    block = r"content_block_start( content_block_delta)+ content_block_stop"
    return re.fullmatch(rf"message_start( {block})* message_delta message_stop", seq) is not None


def _prompt_len(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anthropic-srv")
    srv = start_server(["--model", str(demo_model_path), "--disk-dir", str(tmp / "disk"),
                        "--block-size", "16", "--api-key", KEY], tmp / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def scripted(demo_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anthropic-scripted")
    env = {"TIERCACHE_TEST_SCRIPTS": json.dumps(SCRIPTS),
           "TIERCACHE_TEST_MODEL": str(demo_model_path)}
    srv = start_server(["--model", str(demo_model_path), "--block-size", "16",
                        "--api-key", KEY], tmp / "server.log", env=env,
                       module="tests.scripted_server")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def demo_tok(demo_model_path):
    return load_tokenizer(demo_model_path)


def test_message_usage_and_count_tokens(server):
    c = _client(server)
    kw = {"model": "demo", "system": SYSTEM,
          "messages": [{"role": "user", "content": "Tell me about the weather."}]}
    count = c.messages.count_tokens(**kw).input_tokens
    msg = c.messages.create(max_tokens=12, extra_body=GREEDY, **kw)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert all(b.type == "text" for b in msg.content)
    u = msg.usage
    assert _prompt_len(u) == count and u.cache_creation_input_tokens == 0
    assert 1 <= u.output_tokens <= 12
    split = u.model_extra["tiercache"]
    assert split["prompt_tokens"] == count
    assert split["memory_tokens"] + split["disk_tokens"] == u.cache_read_input_tokens


def test_stream_event_order_and_pings(server):
    body = {"model": "demo", "max_tokens": 10, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a line about rivers."}]}
    events = _sse(server, body)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[1] == "ping"
    assert _order_ok(names), names
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    final = events[-2][1]
    assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert final["usage"]["output_tokens"] >= 1
    assert _prompt_len(anthropic.types.MessageDeltaUsage(**final["usage"])) == \
        start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"]
    # The SDK's own stream accumulator agrees with the raw events.
    with _client(server).messages.stream(model="demo", max_tokens=10, extra_body=GREEDY,
                                         messages=body["messages"]) as s:
        text = "".join(s.text_stream)
        final_msg = s.get_final_message()
    raw_text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == raw_text == "".join(b.text for b in final_msg.content)


def test_second_turn_reads_the_cache(server):
    # Thinking on, as Claude Code asks: with it off the template closes an empty
    # think block in the generation prompt that the history does not re-render.
    c = _client(server)
    think = {"type": "enabled", "budget_tokens": 64}
    history = [{"role": "user", "content": "Name a colour of the sea at noon."}]
    first = c.messages.create(model="demo", max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                              messages=history, thinking=think)
    history += [{"role": "assistant", "content": first.content},
                {"role": "user", "content": "And at night?"}]
    second = c.messages.create(model="demo", max_tokens=8, extra_body=GREEDY, system=SYSTEM,
                               messages=history, thinking=think)
    assert second.usage.cache_read_input_tokens >= _prompt_len(first.usage) - 1
    assert second.usage.model_extra["tiercache"]["memory_tokens"] > 0
    assert _prompt_len(second.usage) == c.messages.count_tokens(
        model="demo", system=SYSTEM, messages=history, thinking=think).input_tokens


def test_billing_header_value_does_not_break_the_cache(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "A question that nobody asked before: why?"}]
    first = c.messages.create(model="demo", max_tokens=4, extra_body=GREEDY, system=SYSTEM,
                              messages=msgs)
    other = [dict(SYSTEM[0], text="x-anthropic-billing-header: cc_version=2.1; cch=99999;"),
             SYSTEM[1]]
    second = c.messages.create(model="demo", max_tokens=4, extra_body=GREEDY, system=other,
                               messages=msgs)
    assert _prompt_len(second.usage) == _prompt_len(first.usage)
    # An exact hit recomputes only the last prompt token.
    assert second.usage.input_tokens == 1
    assert "x-anthropic-billing-header" in server.log()


def test_tool_history_renders_through_the_template(server, demo_tok):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_weather",
             "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny-23C",
             "cache_control": {"type": "ephemeral"}},
            {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True,
             "content": [{"type": "text", "text": "service down"}]}]},
    ]
    c = _client(server)
    for thinking, flag in (({"type": "enabled", "budget_tokens": 64}, True),
                           ({"type": "disabled"}, False)):
        count = c.messages.count_tokens(model="demo", system=SYSTEM[1:], tools=TOOLS,
                                        messages=messages, thinking=thinking).input_tokens
        want = render_chat(demo_tok, [
            {"role": "system", "content": SYSTEM[1]["text"]},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.",
             "tool_calls": [
                 {"id": "toolu_a", "type": "function",
                  "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                 {"id": "toolu_b", "type": "function",
                  "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny-23C"},
            {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: service down"},
        ], tools=OPENAI_TOOLS, template_kwargs={"enable_thinking": flag}).tokens
        assert count == len(want)
        msg = c.messages.create(model="demo", max_tokens=4, extra_body=GREEDY, system=SYSTEM[1:],
                                tools=TOOLS, messages=messages, thinking=thinking)
        assert _prompt_len(msg.usage) == len(want)


def test_stop_sequences_and_max_tokens(server):
    c = _client(server)
    msgs = [{"role": "user", "content": "Describe a long walk through a quiet forest."}]
    full = c.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=msgs)
    text = "".join(b.text for b in full.content)
    assert len(text) >= 8, text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = c.messages.create(model="demo", max_tokens=30, extra_body=GREEDY, messages=msgs,
                            stop_sequences=[stop, "never-in-the-text-zz"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content) == text[:text.index(stop)]
    events = _sse(server, {"model": "demo", "max_tokens": 30, "temperature": 0, "stream": True,
                           "messages": msgs, "stop_sequences": [stop]})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    short = c.messages.create(model="demo", max_tokens=2, extra_body=GREEDY, messages=msgs)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    # A max_tokens beyond the context is an upper bound, not an error (Claude Code
    # always asks for 32000).
    big = c.messages.create(model="demo", max_tokens=1 << 20, extra_body=GREEDY, messages=msgs)
    assert big.stop_reason in ("end_turn", "max_tokens")


def _error(resp: httpx.Response, status: int, kind: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return body["error"]["message"]


def test_errors_come_in_anthropic_shape(server):
    url = server.base_url + "/v1/messages"
    auth = {"x-api-key": KEY}
    ok = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert "max_tokens" in _error(httpx.post(url, headers=auth, json={
        "model": "demo", "messages": ok["messages"]}), 400, "invalid_request_error")
    _error(httpx.post(url, headers=auth, content=b"{not json"), 400, "invalid_request_error")
    _error(httpx.post(url, headers={"x-api-key": "wrong"}, json=ok), 401,
           "authentication_error")
    _error(httpx.post(url, json=ok), 401, "authentication_error")
    assert httpx.post(url, headers={"authorization": f"Bearer {KEY}"},
                      json=ok, timeout=60).status_code == 200
    image = {"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
        {"type": "text", "text": "what is this?"}]}
    assert "image" in _error(httpx.post(url, headers=auth, json=dict(ok, messages=[image])),
                             400, "invalid_request_error")
    _error(httpx.post(url + "/nope", headers=auth, json=ok), 404, "not_found_error")
    _error(httpx.get(url, headers=auth), 405, "invalid_request_error")
    _error(httpx.post(url + "/count_tokens", headers=auth, json={"messages": []}), 400,
           "invalid_request_error")
    # The SDK maps them onto its exception classes.
    with pytest.raises(anthropic.AuthenticationError):
        _client(server, key="wrong").messages.create(**ok)
    with pytest.raises(anthropic.BadRequestError) as exc:
        _client(server).messages.create(model="demo", max_tokens=4, messages=[image])
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    # The OpenAI routes keep their own shape.
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": []},
                   headers={"x-api-key": KEY})
    assert r.status_code == 422 and "error" in r.json() and "type" not in r.json()
    metrics = httpx.get(server.base_url + "/metrics", headers=auth).text
    assert 'endpoint="messages",status="401"' in metrics


def test_tool_use_response_and_tool_loop(scripted):
    c = _client(scripted)
    think = {"type": "enabled", "budget_tokens": 64}  # as Claude Code sends
    history = [{"role": "user", "content": "What is the weather in Paris?"}]
    msg = c.messages.create(model="demo", max_tokens=80, system=SYSTEM, tools=TOOLS,
                            messages=history, extra_body={"seed": 0}, thinking=think)
    assert msg.stop_reason == "tool_use" and msg.stop_sequence is None
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Let me look.\n"
    call = msg.content[1]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert call.input == {"city": "Paris"}
    # Streaming: the same call arrives as one input_json_delta.
    events = _sse(scripted, {"model": "demo", "max_tokens": 80, "stream": True, "seed": 0,
                             "system": SYSTEM, "tools": TOOLS, "messages": history,
                             "thinking": think})
    assert _order_ok([n for n, _ in events])
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    partial = [d["delta"]["partial_json"] for n, d in events
               if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert json.loads("".join(partial)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # Next turn: the call and its result in history; the reply re-renders as
    # generated, so everything of turn 1 is read from the cache.
    history += [{"role": "assistant", "content": msg.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                              "content": "sunny-23C"}]}]
    nxt = c.messages.create(model="demo", max_tokens=80, system=SYSTEM, tools=TOOLS,
                            messages=history, extra_body={"seed": 1}, thinking=think)
    assert nxt.usage.cache_read_input_tokens >= _prompt_len(msg.usage) + msg.usage.output_tokens - 2


def test_thinking_response_blocks(scripted):
    c = _client(scripted)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    msg = c.messages.create(model="demo", max_tokens=80, messages=msgs, extra_body={"seed": 1},
                            thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking.strip() == "The user wants Paris."
    assert msg.content[0].signature
    assert msg.content[1].text == "It is sunny in Paris."
    with c.messages.stream(model="demo", max_tokens=80, messages=msgs, extra_body={"seed": 1},
                           thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature == msg.content[0].signature

"""Tools, tool history, reasoning and tool-call responses over real HTTP (openai SDK).

Servers are real ``tiercache-server`` processes on the demo model (and the tiny
hybrid model for checkpoints). The tool-call *response* path runs on a server
whose sampler picks scripted tokens (``tests/scripted_server.py``): everything
else (model, detokenizer, output parser, HTTP, SDK) is the production path.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from tiercache.chat import render_chat
from tiercache.tools.server_process import start_server

pytestmark = pytest.mark.slow

SYSTEM = ("You are a coding agent. Use the tools to look things up; answer briefly. "
          "Never guess a value a tool can give you.")
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPTS = [
    "Let me look.\n" + CALL,
    "<think>\nThe user wants Paris.\n</think>\n\n" + CALL + "\n" +
    '<tool_call>\n{"name": "read_file", "arguments": {"path": "README.md"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
    "<think>\nCheck again.\n</think>\n\nOne more look.\n" + CALL,
]


def _history(result: str = "sunny-23C") -> list[dict]:
    """A conversation whose last message is a tool result (OpenAI request shape)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": result},
    ]


def _template_history(result: str = "sunny-23C") -> list[dict]:
    """The same conversation as chat-template dicts (arguments parsed)."""
    msgs = _history(result)
    call = msgs[2]["tool_calls"][0]
    msgs[2] = {**msgs[2], "tool_calls": [{**call, "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}
    return msgs


def _cached(usage) -> int:
    d = usage.prompt_tokens_details
    data = d.model_dump() if hasattr(d, "model_dump") else dict(d)
    assert data["memory_tokens"] + data["disk_tokens"] == data["cached_tokens"]
    return data["cached_tokens"]


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def demo_server(demo_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools-srv")
    srv = start_server(["--model", str(demo_model_path), "--block-size", "16",
                        "--max-tokens", "16"], tmp / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def demo_tok(demo_model_path):
    return load_tokenizer(demo_model_path)


def test_tools_and_tool_history_render(demo_server, demo_tok):
    client = _client(demo_server)
    resp = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                          max_tokens=4, temperature=0)
    want = render_chat(demo_tok, _template_history(), tools=TOOLS)
    assert resp.usage.prompt_tokens == len(want.tokens)
    text = demo_tok.decode(want.tokens)
    for needle in ("get_weather", "read_file", "Current weather of a city", "sunny-23C",
                   '"arguments": {"city": "Paris"}', "<tool_response>"):
        assert needle in text, needle
    # Without the tools (tool_choice none) the prompt is shorter: they were rendered.
    none = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                          tool_choice="none", max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == len(render_chat(demo_tok, _template_history()).tokens)
    assert none.usage.prompt_tokens < resp.usage.prompt_tokens


def test_second_turn_reuses_first_turn(demo_server):
    client = _client(demo_server)
    msgs = _history("cloudy-12C")
    first = client.chat.completions.create(model="demo", messages=msgs, tools=TOOLS,
                                           max_tokens=8, temperature=0)
    reply = first.choices[0].message
    assert first.choices[0].finish_reason in ("stop", "length")
    msgs2 = msgs + [
        {"role": "assistant", "content": reply.content or "", "tool_calls": [{
            "id": "call_def", "type": "function",
            "function": {"name": "read_file", "arguments": "{\"path\": \"a.py\"}"}}]},
        {"role": "tool", "tool_call_id": "call_def", "content": "print('hi')"},
    ]
    stream = client.chat.completions.create(model="demo", messages=msgs2, tools=TOOLS,
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage.prompt_tokens > first.usage.prompt_tokens
    # Everything of turn 1's prompt is served from the cache on turn 2.
    assert _cached(usage) >= first.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_enable_thinking_false_changes_prompt(demo_server, demo_tok):
    client = _client(demo_server)
    msgs = [{"role": "user", "content": "Explain prefix caching."}]
    on = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4)
    off = client.chat.completions.create(
        model="demo", messages=msgs, max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    closed = render_chat(demo_tok, msgs, template_kwargs={"enable_thinking": False})
    assert off.usage.prompt_tokens == len(closed.tokens) > on.usage.prompt_tokens
    assert demo_tok.decode(closed.tokens).endswith("<think>\n\n</think>\n\n")


def test_multipart_content_top_k_min_p_and_penalties(demo_server):
    client = _client(demo_server)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                         {"type": "text", "text": "there"}]}]
    resp = client.chat.completions.create(
        model="demo", messages=msgs, max_tokens=6, temperature=0.7, seed=3, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.2,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert resp.usage.completion_tokens >= 1


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 5}},
     "logit_bias"),
])
def test_bad_tool_requests_are_400(demo_server, body, param):
    r = httpx.post(demo_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_tool_choice_required_and_named_are_accepted(demo_server):
    client = _client(demo_server)
    for choice in ("required", {"type": "function", "function": {"name": "read_file"}}):
        resp = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                              tool_choice=choice, max_tokens=2,
                                              parallel_tool_calls=False)
        assert resp.usage.prompt_tokens > 0


# ------------------------------------------------- scripted tool-call responses
@pytest.fixture(scope="module")
def scripted_server(demo_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripted-srv")
    env = {"TIERCACHE_TEST_SCRIPTS": json.dumps(SCRIPTS),
           "TIERCACHE_TEST_MODEL": str(demo_model_path)}
    srv = start_server(["--model", str(demo_model_path), "--block-size", "16",
                        "--max-tokens", "80"], tmp / "server.log", env=env,
                       module="tests.scripted_server")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_tool_call_response_nonstreaming(scripted_server):
    client = _client(scripted_server)
    resp = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                          seed=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.\n"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_reasoning_and_parallel_calls_streaming(scripted_server):
    client = _client(scripted_server)
    stream = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                            seed=1, stream=True)
    reasoning, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        assert not delta.content or "<tool_call>" not in delta.content
        for tc in delta.tool_calls or ():
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "args": ""})
            entry["name"] += tc.function.name or ""
            entry["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "\nThe user wants Paris.\n"
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "read_file"]
    assert json.loads(calls[1]["args"]) == {"path": "README.md"}
    assert calls[0]["id"] != calls[1]["id"]
    # Non-streaming: reasoning_content beside the content; parallel_tool_calls=false
    # keeps only the first call.
    resp = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                          seed=1, parallel_tool_calls=False)
    msg = resp.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content") == "\nThe user wants Paris.\n"
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"]


def test_malformed_tool_call_is_returned_as_text(scripted_server):
    client = _client(scripted_server)
    resp = client.chat.completions.create(model="demo", messages=_history(), tools=TOOLS,
                                          seed=2)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == SCRIPTS[2]


def test_tool_loop_turn_reuses_generated_call(scripted_server):
    """Turn N+1 of an agent loop reuses turn N's prompt and its generated reply."""
    client = _client(scripted_server)
    msgs = _history("rain")
    first = client.chat.completions.create(model="demo", messages=msgs, tools=TOOLS, seed=3)
    reply = first.choices[0].message
    (call,) = reply.tool_calls
    assert reply.model_extra["reasoning_content"] == "\nCheck again.\n"
    # The reply goes back as the SDK returned it (as in the README's snippet).
    msgs += [reply.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "rain again"}]
    second = client.chat.completions.create(model="demo", messages=msgs, tools=TOOLS, seed=2)
    # The reply (thinking, text and tool call) re-renders token for token, so the
    # whole first turn, prompt and reply, comes from the cache.
    done = first.usage.prompt_tokens + first.usage.completion_tokens
    assert _cached(second.usage) == done


# ------------------------------------------------------ hybrid-model checkpoint
def test_hybrid_checkpoint_at_tool_result(tiny_hybrid_path, tmp_path):
    tok = load_tokenizer(tiny_hybrid_path)
    srv = start_server(["--model", str(tiny_hybrid_path), "--block-size", "16",
                        "--max-tokens", "4"], tmp_path / "server.log")
    try:
        client = _client(srv)
        first = client.chat.completions.create(
            model="tiny-hybrid", messages=_history("result one"), tools=TOOLS, max_tokens=4)
        assert _cached(first.usage) == 0
        # Another result for the same call (a retried tool): the prompt diverges
        # inside the tool result, so only the checkpoint at its start can serve it.
        want = render_chat(tok, _template_history("other result"), tools=TOOLS,
                           need_user_start=True)
        assert 16 <= want.user_start < len(want.tokens)
        assert tok.decode(want.tokens[:want.user_start]).endswith("<tool_response>\n")
        second = client.chat.completions.create(
            model="tiny-hybrid", messages=_history("other result"), tools=TOOLS, max_tokens=4)
        assert _cached(second.usage) == want.user_start
    finally:
        assert srv.stop() == 0, srv.log()

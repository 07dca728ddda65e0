"""Pure OpenAI response/chunk builders and request -> ChatSpec conversion (no model, no process)."""

from __future__ import annotations

import json

import pytest
from tiercache.server.errors import APIError
from tiercache.server.openai_format import (
    ChatAccumulator,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    event_delta,
    finish_reason,
    sse,
    usage_chunk,
)
from tiercache.server.routes.openai import chat_spec
from tiercache.server.schemas import ChatCompletionRequest

from tiercache.chat import ToolCallEvent

BASE = {"id": "chatcmpl-x", "created": 1, "model": "m", "system_fingerprint": "tiercache"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
         "prompt_tokens_details": {"cached_tokens": 3, "memory_tokens": 3, "disk_tokens": 0}}
CALL = ToolCallEvent("call_1", "grep", '{"pattern": "x"}')


def test_accumulated_message_with_reasoning_and_calls():
    acc = ChatAccumulator()
    for ev in [("reasoning", "think "), ("reasoning", "more"), ("text", "Hi"),
               ("tool_call", CALL)]:
        acc.add(ev)
    body = chat_response(BASE, acc.message(), "tool_calls", USAGE)
    assert body["object"] == "chat.completion" and body["usage"] == USAGE
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant", "content": "Hi", "reasoning_content": "think more",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "grep", "arguments": '{"pattern": "x"}'}}]}


def test_message_content_null_with_only_tool_calls_and_plain_text():
    acc = ChatAccumulator()
    acc.add(("tool_call", CALL))
    assert acc.message()["content"] is None
    plain = ChatAccumulator()
    assert plain.message() == {"role": "assistant", "content": ""}


def test_chunks():
    first = chat_chunk(BASE, {"role": "assistant", "content": ""}, include_usage=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["finish_reason"] is None
    assert "usage" not in chat_chunk(BASE, {"content": "a"})
    last = chat_chunk(BASE, {}, "cancelled")
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop",
                                  "logprobs": None}
    assert usage_chunk(BASE, USAGE) == {**BASE, "object": "chat.completion.chunk",
                                        "choices": [], "usage": USAGE}
    assert usage_chunk(BASE, USAGE, chat=False)["object"] == "text_completion"
    assert completion_chunk(BASE, "x", "length")["choices"][0]["finish_reason"] == "length"
    body = completion_response(BASE, "done", "stop", USAGE)
    assert body["choices"][0]["text"] == "done" and body["object"] == "text_completion"


def test_event_deltas():
    assert event_delta(("text", "a"), 0) == {"content": "a"}
    assert event_delta(("reasoning", "r"), 0) == {"reasoning_content": "r"}
    assert event_delta(("tool_call", CALL), 2) == {"tool_calls": [{
        "index": 2, "id": "call_1", "type": "function",
        "function": {"name": "grep", "arguments": '{"pattern": "x"}'}}]}
    assert event_delta(("start", {}), 0) is None
    assert finish_reason("length") == "length"


def test_sse_lines():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'
    assert json.loads(sse(chat_chunk(BASE, {"content": "x"}))[6:])["choices"][0]["delta"] \
        == {"content": "x"}


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(kw)


def test_chat_spec_from_request():
    body = _req(model="m", messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be "},
                                          {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_9", "type": "function",
            "function": {"name": "grep", "arguments": "{\"pattern\": \"x\"}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "found"}],
        tools=[{"type": "function", "function": {"name": "grep"}}],
        tool_choice={"type": "function", "function": {"name": "grep"}},
        parallel_tool_calls=False, chat_template_kwargs={"enable_thinking": False},
        top_k=5, min_p=0.1, logit_bias={"7": -100}, stop="END", max_completion_tokens=9)
    spec = chat_spec(body)
    assert spec.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_9", "type": "function",
            "function": {"name": "grep", "arguments": {"pattern": "x"}}}]},
        {"role": "tool", "content": "found", "tool_call_id": "call_9"}]
    assert spec.tools == [{"type": "function", "function": {
        "name": "grep", "parameters": {"type": "object", "properties": {}}}}]
    assert spec.tool_choice == "grep" and spec.parallel_tool_calls is False
    assert spec.template_kwargs == {"enable_thinking": False}
    assert (spec.top_k, spec.min_p, spec.logit_bias) == (5, 0.1, {7: -100.0})
    assert (spec.stops, spec.max_tokens, spec.model) == (["END"], 9, "m")


@pytest.mark.parametrize("arguments", ["{not json", "[1, 2]"])
def test_bad_arguments_are_400(arguments):
    body = _req(messages=[{"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
    with pytest.raises(APIError) as err:
        chat_spec(body)
    assert err.value.status == 400 and "arguments" in str(err.value)


def test_image_part_is_400():
    body = _req(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(APIError) as err:
        chat_spec(body)
    assert err.value.status == 400 and "image_url" in str(err.value)

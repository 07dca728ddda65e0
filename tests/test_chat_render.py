"""render_chat with the demo template (real tokenizers): tools, tool history, think, checkpoints."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from tiercache.chat import RenderError, render_chat
from tiercache.tiers.checkpoints import last_user_message_start

TOOLS = [{"type": "function", "function": {
    "name": "grep", "description": "Search files",
    "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}}}]
SYSTEM = "You are a careful agent working in a repository. Keep answers short."


def _chat(result: str = "src/a.py:3: def f():", *, extra=()) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Where is f defined?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "grep", "arguments": {"pattern": "def f"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        *extra,
    ]


@pytest.fixture(scope="module")
def tok(tiny_hybrid_path):
    return load_tokenizer(tiny_hybrid_path)


def test_renders_tools_calls_and_results(tok):
    out = render_chat(tok, _chat(), tools=TOOLS)
    text = tok.decode(out.tokens)
    assert out.user_start == 0  # not asked for
    assert '"name": "grep"' in text and "Search files" in text
    assert '<tool_call>\n{"name": "grep", "arguments": {"pattern": "def f"}}\n</tool_call>' in text
    assert "<tool_response>\nsrc/a.py:3: def f():\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert out.tokens == tok.apply_chat_template(_chat(), tools=TOOLS, add_generation_prompt=True)
    plain = render_chat(tok, _chat())
    assert len(plain.tokens) < len(out.tokens) and "Search files" not in tok.decode(plain.tokens)


def test_same_history_renders_the_same_tokens(tok):
    a = render_chat(tok, _chat(), tools=TOOLS)
    b = render_chat(tok, _chat(extra=[{"role": "assistant", "content": "In src/a.py."},
                                      {"role": "user", "content": "Thanks"}]), tools=TOOLS)
    # The longer chat's rendering starts with the shorter one's (minus the generation prompt).
    gen_prompt = len(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    assert b.tokens[: len(a.tokens) - gen_prompt] == a.tokens[:-gen_prompt]


def test_user_start_at_a_tool_result(tok):
    a = render_chat(tok, _chat("first result"), tools=TOOLS, need_user_start=True)
    b = render_chat(tok, _chat("#tiercache-sentinel-B# other"), tools=TOOLS, need_user_start=True)
    assert 0 < a.user_start == b.user_start < len(a.tokens)
    assert a.tokens[: a.user_start] == b.tokens[: b.user_start]
    assert tok.decode(a.tokens[: a.user_start]).endswith("<tool_response>\n")
    # Same position through the checkpoint module's wrapper.
    assert last_user_message_start(tok, _chat("first result"), tools=TOOLS) == a.user_start


def test_user_start_after_several_tool_results(tok):
    msgs = _chat("one") + [{"role": "tool", "tool_call_id": "call_2", "content": "two"}]
    out = render_chat(tok, msgs, tools=TOOLS, need_user_start=True)
    head = tok.decode(out.tokens[: out.user_start])
    assert head.endswith("one\n</tool_response>\n<tool_response>\n")


def test_user_start_at_a_user_message(tok):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    out = render_chat(tok, msgs, need_user_start=True)
    assert tok.decode(out.tokens[: out.user_start]).endswith("<|im_start|>user\n")
    assert render_chat(tok, msgs[:1], need_user_start=True).user_start == 0


def test_enable_thinking_false_closes_think_block(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    on = render_chat(tok, msgs)
    off = render_chat(tok, msgs, template_kwargs={"enable_thinking": False})
    assert off.tokens[: len(on.tokens)] == on.tokens
    assert tok.decode(off.tokens[len(on.tokens):]) == "<think>\n\n</think>\n\n"


def test_reasoning_content_in_history(tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "\nBe nice.\n"},
            {"role": "user", "content": "Bye"}]
    text = tok.decode(render_chat(tok, msgs).tokens)
    assert "<|im_start|>assistant\n<think>\nBe nice.\n</think>\n\nHello.<|im_end|>" in text


def test_template_failure_is_render_error(tok):
    with pytest.raises(RenderError, match="chat template failed"):
        render_chat(tok, [{"role": "system", "content": None}, {"role": "user", "content": "x"}],
                    tools=TOOLS)
    assert issubclass(RenderError, ValueError)


def test_no_template_fallback(tiny_llama_path):
    tok = load_tokenizer(tiny_llama_path)
    tok.has_chat_template = False  # a model folder without a chat template
    msgs = [{"role": "user", "content": "Hi"}]
    out = render_chat(tok, msgs, need_user_start=True)
    assert tok.decode(out.tokens) == "user: Hi\nassistant:" and out.user_start == 0
    with pytest.raises(RenderError, match="no chat template"):
        render_chat(tok, msgs, tools=TOOLS)


def test_warm_renders_tools_and_tool_history_like_the_server(tmp_path, tiny_llama_path,
                                                             tiny_llama):
    """``tiercache warm`` prompt lines with tools store exactly the server's prefix."""
    import json

    from click.testing import CliRunner

    from tiercache.server.routes.openai import chat_spec
    from tiercache.server.schemas import ChatCompletionRequest
    from tiercache.store.disk import DiskStore
    from tiercache.store.namespaces import model_namespace
    from tiercache.tools.cli import main as cli

    model, tok = tiny_llama
    line = {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Where is f defined?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "grep", "arguments": "{\"pattern\": \"def f\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "src/a.py:3"}],
        "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    d = tmp_path / "store"
    r = CliRunner().invoke(cli, ["warm", str(d), "--model", str(tiny_llama_path),
                                 "--prompts", str(prompts), "--block-size", "16"])
    assert r.exit_code == 0, r.output
    # What the server renders for the same chat request body.
    spec = chat_spec(ChatCompletionRequest.model_validate(line))
    server = render_chat(tok, spec.messages, tools=spec.tools,
                         template_kwargs=spec.template_kwargs).tokens
    assert "grep" in tok.decode(server) and tok.decode(server).endswith("</think>\n\n")
    with DiskStore(d) as store:
        ns = model_namespace(store, str(tiny_llama_path), model)
        plan = store.longest_prefix(ns, server, limit=len(server) - 1)
        assert plan.n_tokens == len(server) - 1

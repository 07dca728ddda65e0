"""Unit tests of the server's pure-Python parts (no model, no process)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tiercache.server.config import parse_config, parse_size
from tiercache.server.output import _StopText
from tiercache.server.schemas import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("4G", 4 * 10**9), ("512M", 512 * 10**6),
    ("1048576", 1048576), (1024, 1024), ("1.5GB", 1_500_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1", "12XB", ""])
def test_parse_size_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_config_flags_env_and_precedence(tmp_path):
    cfg = parse_config(["--port", "9000", "--prompt-cache-bytes", "512MiB",
                        "--disk-dir", str(tmp_path / "d")],
                       env={"TIERCACHE_PORT": "1234", "TIERCACHE_BLOCK_SIZE": "64",
                            "TIERCACHE_WRITE_POLICY": "back"})
    assert cfg.port == 9000  # the flag wins over the environment
    assert cfg.block_size == 64 and cfg.write_policy == "back"
    assert cfg.prompt_cache_bytes == 512 * 2**20
    assert (tmp_path / "d").is_dir()
    default = parse_config([], env={})
    assert (default.host, default.port, default.block_size) == ("127.0.0.1", 8080, 256)


@pytest.mark.parametrize("argv", [["--block-size", "0"], ["--write-policy", "x"],
                                  ["--log-level", "loud"], ["--max-queue", "-1"]])
def test_config_bad_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, env={})
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_stop_text_holds_back_partial_matches():
    s = _StopText(["END"])
    out = [s.feed(p) for p in ["hello E", "N", "D tail"]]
    assert "".join(o for o, _ in out) == "hello "
    assert out[-1][1] is True
    s = _StopText(["END"])
    assert s.feed("abcdef") == ("abcd", False)
    assert s.flush() == "ef"
    s = _StopText([])
    assert s.feed("xyz") == ("xyz", False)


def test_schemas_are_strict():
    ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "stop": [""]})
    req = CompletionRequest.model_validate({"prompt": [[1, 2, 3]]})
    assert req.prompt == [1, 2, 3]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": ["a", "b"]})
    parts = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].text() == "ab"

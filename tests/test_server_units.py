"""Unit tests of the server's pure-Python parts (no model, no process)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tiercache.server.config import parse_config
from tiercache.server.output import _StopText
from tiercache.server.schemas import ChatCompletionRequest, CompletionRequest


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


def _store(path, block_size=16):
    from tiercache.store.disk import DiskStore

    DiskStore(path, block_size=block_size).close()
    return path


@pytest.mark.parametrize("case", ["block_size", "foreign", "corrupt"])
def test_unusable_disk_dir_is_refused_at_start_with_one_line(tmp_path, capsys, case):
    # README: bad values are refused at start with one line on stderr (exit 2),
    # not by a server that starts, fails to load and exits 1.
    disk = tmp_path / "disk"
    if case == "block_size":
        _store(disk, block_size=16)
        argv = ["--disk-dir", str(disk), "--block-size", "32"]
    elif case == "foreign":
        disk.mkdir()
        (disk / "thesis.txt").write_text("not a cache")
        argv = ["--disk-dir", str(disk)]
    else:
        (disk / "index.lmdb").mkdir(parents=True)
        (disk / "index.lmdb" / "data.mdb").write_bytes(b"\x00garbage" * 2000)
        argv = ["--disk-dir", str(disk)]
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, env={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--disk-dir" in err, err
    # The matching block size (and a fresh folder) are accepted.
    if case == "block_size":
        assert parse_config(argv[:2] + ["--block-size", "16"], env={}).block_size == 16
    assert parse_config(["--disk-dir", str(tmp_path / "new")], env={}).disk_dir


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

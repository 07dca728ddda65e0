"""Review findings for the server and the tools CLI (each test failed before its fix)."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from tiercache.server.app import create_app
from tiercache.server.config import ServerConfig, parse_config
from tiercache.tools.cli import main as cli


@pytest.fixture(scope="module")
def app_client(tiny_llama_path, tmp_path_factory):
    disk = tmp_path_factory.mktemp("review") / "disk"
    cfg = ServerConfig(model=str(tiny_llama_path), disk_dir=str(disk), block_size=16,
                       max_tokens=4)
    app = create_app(cfg)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)
        yield client, cfg


def _ok_after(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_untokenizable_completion_prompt_is_a_400_not_a_500(app_client):
    client, _ = app_client
    # A lone surrogate passes JSON and schema validation but the tokenizer refuses it.
    body = '{"prompt": "hi \\ud800 there", "max_tokens": 2}'
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    _ok_after(client)


@pytest.mark.parametrize("ctype", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_json_body_without_json_content_type_is_read_as_json(app_client, ctype):
    # `curl -d '{...}'` without -H 'content-type: application/json' sends a form type.
    client, _ = app_client
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    r = client.post("/v1/cache/reset", content='{"tier": "memory"}', headers=headers)
    assert r.status_code == 200, r.text
    # A body that is not JSON is still a 400 with the envelope.
    r = client.post("/v1/chat/completions", content="a=b", headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


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


def test_warm_renders_multipart_messages_like_the_server(tmp_path, tiny_llama_path, tiny_llama):
    # The server joins text parts of a message's content before the chat template;
    # warm handed the list to the template as is, so its tokens never matched a request.
    from mlx_lm import load  # noqa: F401  (tiny_llama is loaded through it)

    from tiercache.server.config import ServerConfig as Cfg
    from tiercache.server.engine import Engine
    from tiercache.store.disk import DiskStore
    from tiercache.store.namespaces import model_namespace

    model, tok = tiny_llama
    msgs = [{"role": "system", "content": [{"type": "text", "text": "You are "},
                                           {"type": "text", "text": "terse and kind."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name three rivers."}]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": msgs}) + "\n")
    d = tmp_path / "store"
    r = CliRunner().invoke(cli, ["warm", str(d), "--model", str(tiny_llama_path),
                                 "--prompts", str(prompts), "--block-size", "16"])
    assert r.exit_code == 0, r.output
    engine = Engine(Cfg())
    engine.tokenizer = tok
    server_tokens = engine.chat_tokens(
        [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in msgs])
    with DiskStore(d) as store:
        ns = model_namespace(store, str(tiny_llama_path), model)
        plan = store.longest_prefix(ns, server_tokens, limit=len(server_tokens) - 1)
        assert plan.n_tokens == len(server_tokens) - 1


@pytest.mark.parametrize("line", [
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": ["hi"]},
    {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
])
def test_warm_bad_messages_are_one_line_errors(tmp_path, tiny_llama_path, line):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    r = CliRunner().invoke(cli, ["warm", str(tmp_path / "s"), "--model", str(tiny_llama_path),
                                 "--prompts", str(prompts)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert "p.jsonl:1" in r.output

"""What a new user meets first: a busy port, the demo model, model names, stats."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from tiercache.tools.server_process import ROOT, start_server, subprocess_env

from tiercache.server.app import create_app
from tiercache.server.config import ServerConfig, parse_config
from tiercache.server.engine import Engine


def test_busy_port_is_one_line_and_exit_2_before_any_model_load(tiny_llama_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "tiercache.server.cli", "--host", "127.0.0.1",
             "--port", str(port), "--model", str(tiny_llama_path)],
            cwd=str(ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"port {port}" in lines[0] and "--port" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "loaded model" not in proc.stderr + proc.stdout  # nothing was loaded


def test_start_logs_the_address_it_listens_on(tiny_llama_path, tmp_path):
    # The CLI binds the socket itself, so uvicorn no longer logs the address.
    srv = start_server(["--model", str(tiny_llama_path)], tmp_path / "server.log")
    try:
        assert f"listening on {srv.base_url}" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


def _client(cfg: ServerConfig):
    client = TestClient(create_app(cfg))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.05)
    return client


def _chat(client, model):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", json=body)


def test_any_model_name_is_served_by_default_and_aliases_are_listed(tiny_llama_path, caplog):
    cfg = parse_config(["--model", str(tiny_llama_path),
                        "--served-model-name", "local-coder, claude-sonnet-4-5"], env={})
    client = _client(cfg)
    try:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["local-coder", "claude-sonnet-4-5"]
        with caplog.at_level(logging.INFO, logger="tiercache.server"):
            for name in ("local-coder", "claude-sonnet-4-5", "claude-opus-4-1", "gpt-4o",
                         "claude-opus-4-1", None):
                r = _chat(client, name)
                assert r.status_code == 200, (name, r.text)
                assert r.json()["model"] == "local-coder"
        notes = [m for m in caplog.messages if "are served by local-coder" in m]
        # One line per unknown name, however often it is asked for.
        assert len(notes) == 2 and "'claude-opus-4-1'" in notes[0] and "'gpt-4o'" in notes[1]
        assert client.get("/v1/models/claude-sonnet-4-5").json()["id"] == "claude-sonnet-4-5"
        assert client.get("/v1/models/anything").status_code == 200
        # The --model path still names it, answered with the served id.
        assert client.get(f"/v1/models/{tiny_llama_path}").json()["id"] == "local-coder"
    finally:
        client.__exit__(None, None, None)


def test_strict_model_name_refuses_unknown_names(tiny_llama_path):
    cfg = parse_config(["--model", str(tiny_llama_path), "--served-model-name", "coder,c2",
                        "--strict-model-name"], env={})
    client = _client(cfg)
    try:
        for name in ("coder", "c2", str(tiny_llama_path), tiny_llama_path.name, None):
            assert _chat(client, name).status_code == 200, name
        r = _chat(client, "claude-opus-4-1")
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "'coder', 'c2'" in err["message"]
        assert client.get("/v1/models/claude-opus-4-1").status_code == 404
        assert client.get("/v1/models/c2").json()["id"] == "c2"
    finally:
        client.__exit__(None, None, None)


def test_unlimited_memory_budget_is_null_in_cache_stats(tiny_llama_path, tmp_path):
    client = _client(ServerConfig(model=str(tiny_llama_path), disk_dir=str(tmp_path / "d")))
    try:
        tiers = client.get("/v1/cache/stats").json()["tiers"]
        assert tiers["memory"]["budget_bytes"] is None
        assert tiers["disk"]["budget_bytes"] is None
    finally:
        client.__exit__(None, None, None)
    client = _client(ServerConfig(model=str(tiny_llama_path), prompt_cache_bytes=5 << 20))
    try:
        assert client.get("/v1/cache/stats").json()["tiers"]["memory"]["budget_bytes"] == 5 << 20
    finally:
        client.__exit__(None, None, None)


def test_demo_model_start_line_says_its_text_is_meaningless(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))  # build the demo model here
    engine = Engine(ServerConfig())
    with caplog.at_level(logging.INFO, logger="tiercache.server"):
        engine.load()
    try:
        line = next(m for m in caplog.messages if m.startswith("loaded model"))
        assert "random weights" in line and "meaningless" in line and "without a download" in line
        assert engine.model_id == "tiercache-demo"
    finally:
        engine.close(5)


def test_served_model_name_flag_parsing(capsys):
    cfg = parse_config(["--served-model-name", "a, b,a"], env={})
    assert cfg.served_model_name == ("a", "b") and cfg.strict_model_name is False
    cfg = parse_config([], env={"TIERCACHE_SERVED_MODEL_NAME": "x",
                                "TIERCACHE_STRICT_MODEL_NAME": "yes"})
    assert cfg.served_model_name == ("x",) and cfg.strict_model_name is True
    for argv, env in ((["--served-model-name", " , "], {}),
                      ([], {"TIERCACHE_STRICT_MODEL_NAME": "maybe"})):
        with pytest.raises(SystemExit) as exc:
            parse_config(argv, env=env)
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1

"""End-to-end tests of ``tiercache-server`` (real uvicorn process, openai client)."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import openai
import pytest
from server_helpers import disk_entries, wait_for

from tiercache.tools.server_process import ROOT, ServerProcess, start_server, subprocess_env

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant. Answer briefly and clearly, one short sentence."


def _details(usage) -> dict:
    d = usage.prompt_tokens_details
    data = d.model_dump() if hasattr(d, "model_dump") else dict(d)
    assert data["memory_tokens"] + data["disk_tokens"] == data["cached_tokens"]
    return data


def _client(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0,
                         timeout=120)


def _chat(client, messages, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=messages, **kw)


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    srv = start_server(
        ["--model", str(tiny_llama_path), "--disk-dir", str(tmp / "disk"),
         "--block-size", "16", "--max-tokens", "16"],
        tmp / "server.log",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return _client(server)


def _model_id(server) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


def test_health_models_and_metrics(server):
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok"
    assert "memory" in health["cache"] and "disk" in health["cache"]
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("tiercache_prefix_cache_query_tokens_total",
                 "tiercache_prefix_cache_hit_tokens_total", "tiercache_ttft_seconds",
                 "tiercache_restore_seconds", "tiercache_requests_total",
                 'tiercache_cache_bytes{tier="disk"}', 'tiercache_cache_bytes{tier="memory"}',
                 "tiercache_cache_writer_queue_bytes", "tiercache_cache_dropped_writes_total",
                 "tiercache_cache_evictions_total", "tiercache_cache_promotions_total"):
        assert name in text, name


def test_chat_nonstreaming_and_streaming(server, client):
    model = _model_id(server)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Tell me about the weather today."}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                          temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0
    first = _details(resp.usage)

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert finish in ("stop", "length")
    assert usage is not None and usage.prompt_tokens == resp.usage.prompt_tokens
    second = _details(usage)
    assert second["cached_tokens"] > first["cached_tokens"]
    # Greedy decoding: cold and memory-hit outputs are identical.
    assert "".join(pieces) == resp.choices[0].message.content


def test_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "stream please"}], "max_tokens": 5,
            "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])


def test_cached_tokens_grow_over_conversation(client):
    messages = [{"role": "system", "content": SYSTEM}]
    cached = []
    for turn in ("Hello there, who are you?", "What can you do for me?",
                 "Say something about the sea.", "Thanks, and about mountains?"):
        messages.append({"role": "user", "content": turn})
        resp = _chat(client, messages)
        cached.append(_details(resp.usage)["cached_tokens"])
        messages.append({"role": "assistant", "content": resp.choices[0].message.content})
    assert all(b > a for a, b in zip(cached[1:], cached[2:])), cached
    assert cached[-1] > 0


def test_completions_text_and_token_ids(server, client):
    model = _model_id(server)
    resp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                     temperature=0)
    assert resp.object == "text_completion" and isinstance(resp.choices[0].text, str)
    ids = list(range(10, 60))
    a = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    b = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert a.usage.prompt_tokens == len(ids)
    assert _details(b.usage)["cached_tokens"] >= len(ids) - 1
    assert a.choices[0].text == b.choices[0].text
    stream = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == a.choices[0].text


def test_stop_strings(server, client):
    model = _model_id(server)
    messages = [{"role": "user", "content": "Tell me a story about the sea"}]
    full = _chat(client, messages, max_tokens=24).choices[0].message.content
    windows = [full[i:i + 2] for i in range(len(full) - 1)
               if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip()]
    # The model is deterministic: this output always has printable windows.
    assert windows, f"no usable stop window in {full!r}"
    stop = windows[len(windows) // 2]
    cut = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_cache_salt_isolates(server):
    ids = list(range(100, 160))
    url = server.base_url + "/v1/completions"
    r1 = httpx.post(url, json={"prompt": ids, "max_tokens": 2, "cache_salt": "a"}, timeout=60)
    r2 = httpx.post(url, json={"prompt": ids, "max_tokens": 2, "cache_salt": "b"}, timeout=60)
    r3 = httpx.post(url, json={"prompt": ids, "max_tokens": 2, "cache_salt": "a"}, timeout=60)
    assert r1.status_code == r2.status_code == r3.status_code == 200
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert r3.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def _assert_envelope(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_bad_inputs_get_envelopes_and_server_keeps_serving(server):
    url = server.base_url
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    with httpx.Client(timeout=60) as h:
        _assert_envelope(h.post(chat, content=b"{not json",
                                headers={"content-type": "application/json"}), 400)
        _assert_envelope(h.post(chat, json={"max_tokens": 5}), 422)
        _assert_envelope(h.post(chat, json={"messages": []}), 422)
        _assert_envelope(h.post(chat, json={"messages": msgs, "max_tokens": -1}), 422)
        _assert_envelope(h.post(chat, json={"messages": msgs, "max_tokens": 10**12}), 422)
        _assert_envelope(h.post(chat, json={"messages": "hi"}), 422)
        _assert_envelope(h.post(chat, json={"messages": msgs, "temperature": "hot"}), 422)
        _assert_envelope(h.post(chat, json={"messages": msgs, "max_tokens": "5"}), 422)
        _assert_envelope(h.post(chat, json={"messages": [{"role": "user"}],
                                            "stream": "yes"}), 422)
        err = _assert_envelope(h.post(url + "/v1/completions",
                                      json={"prompt": [5] * 9000, "max_tokens": 4}), 400)
        assert err["code"] == "context_length_exceeded"
        long_text = "hello world " * 5000
        _assert_envelope(h.post(chat, json={"messages": [{"role": "user",
                                                          "content": long_text}]}), 400)
        err = _assert_envelope(h.post(url + "/v1/completions",
                                      json={"prompt": [1, 2, 10**6], "max_tokens": 4}), 400)
        assert err["param"] == "prompt"
        _assert_envelope(h.post(url + "/v1/completions",
                                json={"prompt": [1, -3], "max_tokens": 4}), 400)
        # Any model name is served (one model is loaded); --strict-model-name's 404
        # is tested in test_server_new_user.py.
        assert h.post(chat, json={"messages": msgs, "model": "no-such-model",
                                  "max_tokens": 2}).status_code == 200
        _assert_envelope(h.get(url + "/v1/nope"), 404)
        _assert_envelope(h.post(url + "/v1/completions",
                                content=b"x" * (8 * 1024 * 1024)), 413)
        ok = h.post(chat, json={"messages": msgs, "max_tokens": 3})
        assert ok.status_code == 200, ok.text
    text = httpx.get(url + "/metrics").text
    assert 'status="400"' in text and 'status="200"' in text


def test_disconnect_mid_stream_keeps_computed_prefix(server):
    ids = list(range(200, 260))
    body = {"prompt": ids, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    # The generation stopped (logged as cancelled long before 2000 tokens) ...
    wait_for(lambda: "finish=cancelled" in server.log(), timeout=60)
    # ... its prompt was cached, and the server still serves.
    r = httpx.post(server.base_url + "/v1/completions",
                   json={"prompt": ids, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(ids) - 1
    health = httpx.get(server.base_url + "/health").json()
    assert health["queue"]["running"] in (False, True)


def test_concurrent_clients_while_health_answers(server):
    model = _model_id(server)
    errors, results = [], []

    def worker(i):
        c = _client(server)
        try:
            for j in range(5):
                r = c.chat.completions.create(
                    model=model, max_tokens=6, temperature=0,
                    messages=[{"role": "user", "content": f"client {i} request {j}"}])
                results.append(r.choices[0].finish_reason)
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    health_codes = []
    while any(t.is_alive() for t in threads):
        health_codes.append(httpx.get(server.base_url + "/health", timeout=30).status_code)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40
    assert health_codes and all(c == 200 for c in health_codes)


def test_health_and_metrics_answer_while_worker_is_busy(server):
    """A long prompt + generation occupies the worker; HTTP stays responsive."""
    done = []

    def long_request():
        r = httpx.post(server.base_url + "/v1/completions",
                       json={"prompt": [(i * 7) % 500 + 3 for i in range(6000)],
                             "max_tokens": 300}, timeout=300)
        done.append(r.status_code)

    t = threading.Thread(target=long_request)
    t.start()
    try:
        busy = wait_for(lambda: (not done) and httpx.get(server.base_url + "/health", timeout=30)
                        .json()["queue"]["running"], timeout=120, interval=0.02)
        assert busy
        assert httpx.get(server.base_url + "/metrics", timeout=30).status_code == 200
        assert httpx.get(server.base_url + "/v1/models", timeout=30).status_code == 200
    finally:
        t.join()
    assert done == [200]


def test_cache_stats_and_reset(server):
    stats = httpx.get(server.base_url + "/v1/cache/stats").json()
    assert "memory" in stats["tiers"] and "disk" in stats["tiers"]
    assert stats["namespace"] and any(n["current"] for n in stats["namespaces"])
    r = httpx.post(server.base_url + "/v1/cache/reset", json={"tier": "memory"}, timeout=60)
    assert r.status_code == 200 and r.json()["tier"] == "memory"
    _assert_envelope(httpx.post(server.base_url + "/v1/cache/reset", json={"tier": "x"}), 422)
    r = httpx.post(server.base_url + "/v1/cache/reset", timeout=60)
    assert r.status_code == 200 and r.json()["tier"] == "all"


def _ok_after(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_untokenizable_completion_prompt_is_a_400_not_a_500(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        # A lone surrogate passes JSON and schema validation but the tokenizer refuses it.
        body = '{"prompt": "hi \\ud800 there", "max_tokens": 2}'
        r = client.post("/v1/completions", content=body,
                        headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt"
        _ok_after(client)


@pytest.mark.parametrize("ctype", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_json_body_without_json_content_type_is_read_as_json(server, ctype):
    # `curl -d '{...}'` without -H 'content-type: application/json' sends a form type.
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
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


def test_api_key_queue_limit_and_loading_health(tiny_llama_path, tmp_path):
    srv = ServerProcess(["--model", str(tiny_llama_path), "--api-key", "sekret", "--max-queue", "1",
                         "--max-batch-size", "1"],
                        tmp_path / "key.log")
    try:
        # /health is 503 ("loading") until the model is ready, then 200.
        codes = []

        def healthy():
            try:
                codes.append(httpx.get(srv.base_url + "/health", timeout=5).status_code)
            except httpx.HTTPError:
                return False
            return codes[-1] == 200

        wait_for(healthy, timeout=120)
        assert set(codes) <= {200, 503}

        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").completions.create(model="tiny-llama", prompt="hi",
                                                     max_tokens=2)
        _assert_envelope(httpx.post(srv.base_url + "/v1/cache/reset"), 401)
        _assert_envelope(httpx.get(srv.base_url + "/v1/models"), 401)
        _assert_envelope(httpx.get(srv.base_url + "/metrics"), 401)
        _assert_envelope(httpx.get(srv.base_url + "/v1/models",
                                   headers={"Authorization": "Bearer nope"}), 401)
        resp = _chat(_client(srv, "sekret"), [{"role": "user", "content": "hi"}])
        assert resp.choices[0].message.content is not None
        auth = {"Authorization": "Bearer sekret"}
        r = httpx.post(srv.base_url + "/v1/cache/reset", headers=auth, timeout=60)
        assert r.status_code == 200

        # One running + one queued; the rest are refused with 429 at once.
        statuses, release = [], threading.Event()

        def one():
            with httpx.stream("POST", srv.base_url + "/v1/completions", headers=auth,
                              json={"prompt": "busy", "max_tokens": 4000, "stream": True},
                              timeout=120) as r:
                statuses.append(r.status_code)
                if r.status_code == 429:
                    r.read()
                    assert r.json()["error"]["type"] == "rate_limit_error"
                else:
                    release.wait(120)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        wait_for(lambda: 429 in statuses, timeout=120)
        release.set()
        for t in threads:
            t.join()
        assert len(statuses) == 5 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 1
        resp = _chat(_client(srv, "sekret"), [{"role": "user", "content": "still here?"}])
        assert resp.choices[0].finish_reason in ("stop", "length")
    finally:
        assert srv.stop(signal.SIGINT) == 0, srv.log()


def test_demotion_then_warm_restart_from_disk(tiny_llama_path, tmp_path):
    disk = tmp_path / "disk"
    args = ["--model", str(tiny_llama_path), "--disk-dir", str(disk), "--block-size", "16",
            "--prompt-cache-bytes", "256KiB", "--prompt-cache-size", "2"]
    prompts = [[(7 * k + i) % 500 + 3 for i in range(120)] for k in range(1, 5)]
    srv = start_server(args, tmp_path / "a.log")
    try:
        c = _client(srv)
        first = c.completions.create(model=_model_id(srv), prompt=prompts[0], max_tokens=10,
                                     temperature=0)
        for p in prompts[1:]:
            c.completions.create(model=_model_id(srv), prompt=p, max_tokens=10, temperature=0)
        wait_for(lambda: disk_entries(srv.base_url) > 0)
        again = c.completions.create(model=_model_id(srv), prompt=prompts[0], max_tokens=10,
                                     temperature=0)
        d = _details(again.usage)
        assert d["disk_tokens"] > 0, d
        assert again.choices[0].text == first.choices[0].text
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert 'tiercache_prefix_cache_hit_tokens_total{tier="disk"}' in metrics
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log()

    srv = start_server(args, tmp_path / "b.log")
    try:
        c = _client(srv)
        after = c.completions.create(model=_model_id(srv), prompt=prompts[0], max_tokens=10,
                                     temperature=0)
        d = _details(after.usage)
        assert d["disk_tokens"] > 0 and d["memory_tokens"] == 0, d
        assert after.choices[0].text == first.choices[0].text
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log()


def test_bad_flags_exit_2_with_one_line(tmp_path):
    import subprocess
    import sys

    for args in (["--port", "abc"], ["--prompt-cache-bytes", "12XB"],
                 ["--write-policy", "sideways"], ["--model", str(tmp_path / "missing")]):
        p = subprocess.run([sys.executable, "-m", "tiercache.server.cli", *args], cwd=str(ROOT),
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "tiercache.server.cli"], cwd=str(ROOT),
                       env=subprocess_env({"TIERCACHE_MAX_TOKENS": "-4"}), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "TIERCACHE_MAX_TOKENS" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tiercache.server.cli", "--help"], cwd=str(ROOT),
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    assert "default: 8080" in p.stdout and "TIERCACHE_PROMPT_CACHE_BYTES" in p.stdout


@pytest.mark.parametrize("preset", ["tiny_hybrid_path", "tiny_sliding_path"])
def test_non_trimmable_model_checkpoints_and_determinism(preset, request, tmp_path):
    """Conv/attention and sliding-window layers: checkpoints make later turns hit."""
    model_path = request.getfixturevalue(preset)
    args = ["--model", str(model_path), "--disk-dir", str(tmp_path / "disk"),
            "--block-size", "16"]
    srv = start_server(args, tmp_path / "hybrid.log")
    try:
        c = _client(srv)
        system = {"role": "system", "content": SYSTEM + " " + SYSTEM}
        first = _chat(c, [system, {"role": "user", "content": "Where is the library?"}])
        # A different last user message shares the system-prompt checkpoint.
        other = _chat(c, [system, {"role": "user", "content": "How old is the moon?"}])
        assert _details(other.usage)["cached_tokens"] > 0
        again = _chat(c, [system, {"role": "user", "content": "Where is the library?"}])
        assert _details(again.usage)["cached_tokens"] == again.usage.prompt_tokens - 1
        assert again.choices[0].message.content == first.choices[0].message.content
        wait_for(lambda: disk_entries(srv.base_url) > 0)
        # Checkpointed prefill keeps these models on the sequential path.
        assert "continuous batching off for this model" in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()
    srv = start_server(args, tmp_path / "hybrid2.log")
    try:
        after = _chat(_client(srv), [system, {"role": "user", "content": "Where is the library?"}])
        d = _details(after.usage)
        assert d["disk_tokens"] > 0, d
        assert after.choices[0].message.content == first.choices[0].message.content
    finally:
        assert srv.stop() == 0, srv.log()

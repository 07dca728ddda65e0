"""SIGTERM with requests queued (issue 16, defect 5), against a real server process:
queued requests get a clean 503 at once, the running one finishes or gets a clean
error within --shutdown-timeout, the writer is flushed, and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx

from server_helpers import wait_for
from tiercache.tools.server_process import start_server

LONG = 7000  # completion tokens: far longer than the shutdown timeout at any speed
WAIT_BOUND = 120.0  # generous: shutdown-timeout + flush-timeout + start-up noise


def _post(srv, body: dict, out: dict, key: str) -> None:
    """Send one completion request; record status and body (or stream events)."""
    try:
        with httpx.Client(timeout=WAIT_BOUND) as c:
            with c.stream("POST", srv.base_url + "/v1/completions", json=body) as r:
                text = r.read().decode()
                out[key] = (r.status_code, r.headers.get("content-type", ""), text)
    except httpx.HTTPError as e:
        out[key] = (None, "", repr(e))


def _error_envelope(text: str) -> dict:
    body = json.loads(text)
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


def test_sigterm_with_queued_requests(tmp_path, tiny_llama_path):
    srv = start_server(["--model", str(tiny_llama_path), "--disk-dir", str(tmp_path / "disk"),
                        "--block-size", "16", "--shutdown-timeout", "1", "--flush-timeout", "5",
                        "--max-batch-size", "1"],  # one at a time: the others queue
                       tmp_path / "srv.log")
    model = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
    prompt = [(13 * i) % 500 + 3 for i in range(40)]
    base = {"model": model, "prompt": prompt, "max_tokens": LONG, "temperature": 0}
    out: dict = {}
    threads = [threading.Thread(target=_post, args=(srv, {**base, "stream": True}, out, "running"))]
    threads[0].start()
    wait_for(lambda: httpx.get(srv.base_url + "/health").json()["queue"]["running"])
    for i, stream in enumerate([False, True, False]):
        body = {**base, "prompt": prompt + [i + 3], "stream": stream}
        threads.append(threading.Thread(target=_post, args=(srv, body, out, f"queued{i}")))
        threads[-1].start()
    wait_for(lambda: httpx.get(srv.base_url + "/health").json()["queue"]["waiting"] == 3)

    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(WAIT_BOUND)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise AssertionError("the server did not exit after SIGTERM:\n" + srv.log())
    for t in threads:
        t.join(WAIT_BOUND)
    log = srv.log()
    assert code == 0, log

    # Queued requests: a clean 503 in the API's error shape (no stream had started).
    for i in range(3):
        status, ctype, text = out[f"queued{i}"]
        assert status == 503, (i, status, text)
        err = _error_envelope(text)
        assert "shutting down" in err["message"] and err["type"] == "service_unavailable"
    # The running request was cut at the deadline: its stream ends with an error
    # event in the same shape, then [DONE]; no bare 500.
    _assert_cut(out["running"])
    _assert_clean_exit(log)
    srv.stop()


def _assert_cut(result: tuple) -> None:
    """A streamed request cut by shutdown: an error event in the API's shape, then [DONE]."""
    status, ctype, text = result
    assert status == 200 and ctype.startswith("text/event-stream"), (status, text[-500:])
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = _error_envelope(events[-2])
    assert "shutting down" in err["message"], err
    assert not any("generation_failed" in e for e in events)


def _assert_clean_exit(log: str) -> None:
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "timeout graceful shutdown exceeded" not in log, log
    assert "shutdown complete" in log


def test_sigterm_cuts_every_request_of_the_batch(tmp_path, tiny_llama_path):
    """With continuous batching all running requests get the deadline; a queued one a 503."""
    srv = start_server(["--model", str(tiny_llama_path), "--shutdown-timeout", "1",
                        "--max-batch-size", "2"], tmp_path / "srv.log")
    prompt = [(13 * i) % 500 + 3 for i in range(40)]
    base = {"prompt": prompt, "max_tokens": LONG, "temperature": 0}
    out: dict = {}
    threads = []
    for i in range(2):
        body = {**base, "prompt": prompt + [i + 3], "stream": True}
        threads.append(threading.Thread(target=_post, args=(srv, body, out, f"running{i}")))
        threads[-1].start()
    wait_for(lambda: httpx.get(srv.base_url + "/health").json()["queue"]["batch_size"] == 2)
    threads.append(threading.Thread(target=_post, args=(srv, base, out, "queued")))
    threads[-1].start()
    wait_for(lambda: httpx.get(srv.base_url + "/health").json()["queue"]["waiting"] == 1)

    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(WAIT_BOUND)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise AssertionError("the server did not exit after SIGTERM:\n" + srv.log())
    for t in threads:
        t.join(WAIT_BOUND)
    log = srv.log()
    assert code == 0, log
    status, _, text = out["queued"]
    assert status == 503 and "shutting down" in _error_envelope(text)["message"], (status, text)
    for i in range(2):
        _assert_cut(out[f"running{i}"])
    _assert_clean_exit(log)
    srv.stop()

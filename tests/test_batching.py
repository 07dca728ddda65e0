"""Continuous batching: batched output equals alone, hits equal cold, cancels, queueing.

The HTTP tests run a real ``tiercache-server`` on ``tiny-llama`` (it never
emits end-of-sequence, so a long ``max_tokens`` keeps a request in the batch
for as long as a test needs it) with concurrent real clients. Greedy tokens
of a request batched with others equal the same request alone: the batched
arithmetic differs only in summation order (measured below on the demo model
and in ``tools/bench/batch_logits.py``).
"""

from __future__ import annotations

import re
import signal
import threading

import httpx
import pytest
from server_helpers import wait_for

from tiercache.tools.server_process import start_server

pytestmark = pytest.mark.slow

MAX_LOGPROB_DIFF = 1e-4
"""Tolerance for batched vs alone log-probabilities (measured: ~5e-6, float32)."""


def test_demo_model_batched_greedy_tokens_equal_alone(demo_model_path):
    """Three prompts of different lengths decoded together vs each alone."""
    from mlx_lm import load

    from tiercache.tools.bench.batch_logits import compare, prompts_of_lengths

    model, _ = load(str(demo_model_path))
    rows = compare(model, prompts_of_lengths([7, 130, 400], vocab=2048), steps=24)
    assert [r["agreeing_steps"] for r in rows] == [24, 24, 24], rows
    assert all(r["same_tokens"] for r in rows), rows
    assert max(r["max_logprob_diff"] for r in rows) < MAX_LOGPROB_DIFF, rows


def test_request_output_stop_strings_eos_and_length(demo_model_path):
    """The one per-request output object both generation paths feed."""
    from mlx_lm.utils import load_tokenizer

    from tiercache.server.engine import GenParams
    from tiercache import FetchResult
    from tiercache.server.output import Fetched, RequestOutput

    tok = load_tokenizer(demo_model_path)
    ids = tok.encode("hello world, the end of the story", add_special_tokens=False)
    eos = next(iter(tok.eos_token_ids))

    def run(stops, max_tokens, tokens):
        events = []
        out = RequestOutput(GenParams(tokens=[5, 6, 7], max_tokens=max_tokens, stops=stops),
                            tok, events.append)
        out.start(Fetched(FetchResult(None, [5, 6, 7], 3), 0.0, disk_tier=True))
        done = False
        for t in tokens:
            if out.feed(t):
                done = True
                break
        out.finish()
        text = "".join(e[1] for e in events if e[0] == "text")
        return events, text, out, done

    events, text, out, done = run([], 100, ids + [eos])
    assert done and text == tok.decode(ids) and out.finish_reason == "stop"
    assert events[0][0] == "start" and events[-1][:2] == ("done", "stop")
    assert events[-1][2]["completion_tokens"] == len(ids) + 1 and events[-1][3] is None
    assert events[0][1]["prompt_tokens_details"] == {
        "cached_tokens": 0, "memory_tokens": 0, "disk_tokens": 0, "pending_tokens": 0}
    events, text, out, done = run(["end"], 100, ids)
    assert done and out.finish_reason == "stop" and text == tok.decode(ids).split("end")[0]
    assert events[-1][3] == "end"  # the done event names the stop string
    _, text, out, done = run([], 3, ids)
    assert done and out.finish_reason == "length" and text == tok.decode(ids[:3])


# ---------------------------------------------------------------- over HTTP
P1 = [(i * 13) % 400 + 5 for i in range(5)]
P2 = [(i * 29) % 400 + 7 for i in range(41)]
P3 = [(i * 7) % 400 + 11 for i in range(123)]


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    srv = start_server(
        ["--model", str(tiny_llama_path), "--disk-dir", str(tmp / "disk"), "--block-size", "16",
         "--max-batch-size", "8", "--max-tokens", "64"],
        tmp / "server.log",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


def _complete(srv, prompt, max_tokens=40, salt=None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _concurrently(srv, requests: list[tuple]) -> list[dict]:
    """Send ``(prompt, max_tokens, salt)`` requests at once; answers in order."""
    out: list = [None] * len(requests)

    def one(i, args):
        try:
            out[i] = _complete(srv, *args)
        except BaseException as exc:  # re-raised below, in the test's thread
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return out


class _Holder:
    """A streaming request kept open (and so kept in the batch) until closed."""

    def __init__(self, srv, prompt, max_tokens=3000, salt="holder"):
        self._cm = httpx.stream("POST", srv.base_url + "/v1/completions", timeout=300, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "cache_salt": salt})
        self.response = self._cm.__enter__()
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()
        first = next(line for line in self.lines if line.startswith("data: "))
        self.id = re.search(r'"id": ?"cmpl-(\w+)"', first).group(1)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def _batch_steps(srv) -> tuple[float, float]:
    """(decode steps in all, decode steps with at most 3 requests) so far."""
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text
    total = float(re.search(r"^tiercache_batch_size_count (\S+)$", text, re.M).group(1))
    small = float(re.search(r'^tiercache_batch_size_bucket\{le="3.0"\} (\S+)$', text,
                            re.M).group(1))
    return total, small


def _text(answer: dict) -> str:
    return answer["choices"][0]["text"]


def _cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_health_and_metrics_show_batch_and_queue(server):
    health = httpx.get(server.base_url + "/health").json()
    assert health["queue"]["max_batch_size"] == 8
    assert health["queue"]["batch_size"] == 0 and health["queue"]["waiting"] == 0
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("tiercache_running_requests", "tiercache_queue_depth",
                 "tiercache_batch_size_bucket"):
        assert name in text, name
    assert "continuous batching on: up to 8 requests per batch" in server.log()


def test_batched_text_equals_alone_and_hit_equals_cold(server):
    prompts = [P1, P2, P3]
    alone = [_complete(server, p, salt=f"alone-{i}") for i, p in enumerate(prompts)]
    assert all(a["choices"][0]["finish_reason"] == "length" for a in alone)
    steps_before = _batch_steps(server)
    holder = _Holder(server, P2[:30])
    try:
        # Cold, batched with each other and with the holder.
        cold = _concurrently(server, [(p, 40, "batch") for p in prompts])
        # The same requests again, now cache hits, in one batch with the same
        # requests cold (another salt).
        again = _concurrently(server, [(p, 40, "batch") for p in prompts]
                              + [(p, 40, "batch-cold") for p in prompts])
        health = httpx.get(server.base_url + "/health").json()
        assert health["queue"]["batch_size"] >= 1  # the holder is still running
    finally:
        holder.close()
    for a, c, hit, other in zip(alone, cold, again[:3], again[3:]):
        assert _text(c) == _text(a)
        assert _text(hit) == _text(a)
        assert _text(other) == _text(a)
        assert _cached(c) == 0 and _cached(other) == 0
        assert _cached(hit) == hit["usage"]["prompt_tokens"] - 1
    total, small = _batch_steps(server)
    # Some decode steps ran 4 or more requests together (the holder + 3).
    assert total - steps_before[0] > small - steps_before[1]


def test_cancel_mid_batch_leaves_others_alone_and_inserts_its_cache(server):
    px = [(i * 17) % 400 + 9 for i in range(50)]
    pa, pc = P2[::-1], P3[:60]
    alone = [_complete(server, p, max_tokens=300, salt="cancel-alone") for p in (pa, pc)]
    assert _complete(server, px, max_tokens=1, salt="x-check")["usage"][
        "prompt_tokens_details"]["cached_tokens"] == 0
    holder = _Holder(server, px, salt="x-check")
    out: list = []
    t = threading.Thread(target=lambda: out.extend(
        _concurrently(server, [(pa, 300, "cancel"), (pc, 300, "cancel")])))
    t.start()
    try:
        wait_for(lambda: httpx.get(server.base_url + "/health", timeout=30)
                 .json()["queue"]["batch_size"] >= 3, timeout=120, interval=0.01)
    finally:
        holder.close()
    t.join()
    assert [_text(o) for o in out] == [_text(a) for a in alone]
    assert all(o["choices"][0]["finish_reason"] == "length" for o in out)
    log = wait_for(lambda: (lambda s: s if f"request {holder.id}:" in s else None)(server.log()))
    assert re.search(rf"request {holder.id}: .* finish=cancelled", log)
    # The holder was cancelled while the other two were still generating.
    ids = [o["id"].removeprefix("cmpl-") for o in out]
    assert all(log.index(f"request {holder.id}:") < log.index(f"request {i}:") for i in ids)
    # Its cache (prompt + what it generated) was inserted.
    follow = _complete(server, px, max_tokens=1, salt="x-check")
    assert _cached(follow) == len(px) - 1


def test_seeded_sampling_runs_alone_and_reproduces(server):
    """A seeded random request waits for the batch to drain, then runs alone."""
    seeded = {"prompt": P2, "max_tokens": 30, "temperature": 1.0, "seed": 7}
    texts = []
    for _ in range(2):
        out: list = []
        t = threading.Thread(target=lambda: out.extend(
            _concurrently(server, [(P1, 60, "seeded-side"), (P3, 60, "seeded-side")])))
        t.start()
        r = httpx.post(server.base_url + "/v1/completions", json=seeded, timeout=300)
        t.join()
        assert r.status_code == 200 and len(out) == 2
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1]


def test_queue_beyond_batch_then_429(tiny_llama_path, tmp_path):
    srv = start_server(["--model", str(tiny_llama_path), "--max-batch-size", "2",
                        "--max-queue", "1"], tmp_path / "queue.log")
    holders = []
    try:
        holders = [_Holder(srv, P1, salt=f"q{i}") for i in range(2)]
        health = httpx.get(srv.base_url + "/health").json()["queue"]
        assert health["batch_size"] == 2 and health["waiting"] == 0
        queued: list = []
        t = threading.Thread(target=lambda: queued.append(_complete(srv, P2, max_tokens=3)))
        t.start()
        wait_for(lambda: httpx.get(srv.base_url + "/health").json()["queue"]["waiting"] == 1)
        r = httpx.post(srv.base_url + "/v1/completions", json={"prompt": P3, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        holders.pop().close()  # room in the batch: the queued request runs
        t.join(120)
        assert queued and queued[0]["usage"]["completion_tokens"] == 3
    finally:
        for h in holders:
            h.close()
        assert srv.stop(signal.SIGINT) == 0, srv.log()

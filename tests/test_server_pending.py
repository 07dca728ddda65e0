"""Over HTTP: a memory budget below one snapshot, the same request twice back to
back (no sleep, no flush). The second is a hit with the cold run's greedy output;
with a stalled disk it is served by the pending tier, and /metrics counts it."""

from __future__ import annotations

import signal

import httpx
import pytest
from server_helpers import disk_entries, wait_for

from tiercache.tools.server_process import start_server


def _complete(srv, prompt):
    model = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(srv.base_url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]


@pytest.mark.parametrize("stalled", [False, True], ids=["disk", "stalled-disk"])
def test_back_to_back_request_is_a_hit(tiny_llama_path, tmp_path, stalled):
    gate = tmp_path / "gate"
    args = ["--model", str(tiny_llama_path), "--disk-dir", str(tmp_path / "disk"),
            "--block-size", "16", "--prompt-cache-bytes", "1024"]
    module = "tests.stalled_disk_server" if stalled else "tiercache.server.cli"
    srv = start_server(args, tmp_path / "server.log", module=module,
                       env={"TIERCACHE_TEST_DISK_GATE": str(gate)})
    try:
        prompt = [(11 * i) % 500 + 3 for i in range(150)]
        cold, d1 = _complete(srv, prompt)
        warm, d2 = _complete(srv, prompt)
        assert d1["cached_tokens"] == 0
        assert d2["cached_tokens"] == len(prompt) - 1, d2
        assert warm == cold
        if stalled:
            assert d2["pending_tokens"] == len(prompt) - 1 and d2["disk_tokens"] == 0, d2
            stats = httpx.get(srv.base_url + "/v1/cache/stats").json()["tiers"]
            assert stats["pending"]["hits"] == 1 and stats["pending"]["entries"] >= 1
            metrics = httpx.get(srv.base_url + "/metrics").text
            assert f'tiercache_prefix_cache_hit_tokens_total{{tier="pending"}} {len(prompt) - 1}.0' in metrics
            gate.touch()
        wait_for(lambda: disk_entries(srv.base_url) > 0, timeout=60)
        metrics = httpx.get(srv.base_url + "/metrics").text
        written = [ln for ln in metrics.splitlines()
                   if ln.startswith('tiercache_cache_bytes_written_total{tier="disk"}')]
        assert written and float(written[0].split()[-1]) > 0, written
    finally:
        gate.touch()
        assert srv.stop(signal.SIGTERM) == 0, srv.log()

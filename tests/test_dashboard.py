"""The dashboard: its JSON endpoints over HTTP, and the page in a real headless Chromium.

One server serves a cold request, a memory hit and (after a restart) a disk hit;
the endpoints must report exactly what the responses' usage said, and the page,
rendered by Chromium through the DevTools protocol, must show the same numbers.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
import websocket
from server_helpers import wait_for

from tiercache.tools.server_process import ROOT, free_port, start_server

pytestmark = pytest.mark.slow

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> hello"
OTHER = "A different question about the weather in Lisbon, answered briefly."
ARTIFACTS = Path(os.environ.get("TIERCACHE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _chat(srv, text: str, salt: str | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": text}],
            "max_tokens": 4, "temperature": 0, "cache_salt": salt}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _tiers(usage: dict) -> tuple[int, int]:
    d = usage["prompt_tokens_details"]
    return d["memory_tokens"], d["disk_tokens"]


@pytest.fixture(scope="module")
def served(demo_model_path, tmp_path_factory):
    """A server that has served: cold, memory hit (after a restart), disk hit."""
    tmp = tmp_path_factory.mktemp("dash")
    args = ["--model", str(demo_model_path), "--disk-dir", str(tmp / "disk"),
            "--block-size", "16", "--api-key", KEY]
    first = start_server(args, tmp / "first.log")
    try:
        _chat(first, HOSTILE)
    finally:
        assert first.stop() == 0, first.log()
    srv = start_server(args, tmp / "second.log")
    # A salt of its own keeps the cold request from sharing the template's first tokens.
    usages = {"cold": _chat(srv, OTHER, "other"), "memory": _chat(srv, OTHER, "other"),
              "disk": _chat(srv, HOSTILE)}
    yield srv, usages
    assert srv.stop() == 0, srv.log()


def test_usage_paths_are_what_the_dashboard_should_show(served):
    _, usages = served
    assert _tiers(usages["cold"]) == (0, 0)
    assert _tiers(usages["memory"])[0] > 0
    assert _tiers(usages["disk"])[1] > 0


def test_data_endpoints_require_the_key_and_the_page_does_not(served):
    srv, _ = served
    for path in ("/v1/dashboard/requests", "/v1/dashboard/store", "/v1/cache/stats"):
        r = httpx.get(srv.base_url + path)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    page = httpx.get(srv.base_url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        assert httpx.get(f"{srv.base_url}/dashboard/{name}").status_code == 200
    missing = httpx.get(srv.base_url + "/dashboard/secrets.txt")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_recent_requests_match_the_responses(served):
    srv, usages = served
    r = httpx.get(srv.base_url + "/v1/dashboard/requests", params={"limit": 10}, headers=AUTH)
    assert r.status_code == 200
    rows = r.json()["data"]
    assert [row["seq"] for row in rows] == sorted((row["seq"] for row in rows), reverse=True)
    newest_first = [usages["disk"], usages["memory"], usages["cold"]]
    assert len(rows) == 3
    for row, usage in zip(rows, newest_first):
        memory, disk = _tiers(usage)
        assert row["api"] == "openai.chat"
        assert row["prompt_tokens"] == usage["prompt_tokens"]
        assert row["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert row["cached_by_tier"]["memory"] == memory
        assert row["cached_by_tier"]["disk"] == disk
        assert row["completion_tokens"] == usage["completion_tokens"]
        assert row["ttft_s"] is not None and row["ttft_s"] >= 0
        assert row["prefill_s"] >= 0
    one = httpx.get(srv.base_url + "/v1/dashboard/requests", params={"limit": 1}, headers=AUTH)
    assert len(one.json()["data"]) == 1
    bad = httpx.get(srv.base_url + "/v1/dashboard/requests", params={"limit": 0}, headers=AUTH)
    assert bad.status_code == 422 and "error" in bad.json()


def test_store_summary_lists_namespaces_and_valuable_prefixes(served):
    srv, usages = served
    r = httpx.get(srv.base_url + "/v1/dashboard/store", params={"top": 5}, headers=AUTH)
    assert r.status_code == 200
    data = r.json()
    assert data["enabled"] is True
    (ns,) = data["namespaces"]
    assert ns["bytes"] > 0 and ns["prefixes"] >= 2 and ns["dedup_ratio"] > 0
    top = data["top_prefixes"]
    assert 1 <= len(top) <= 5
    assert top[0]["hits"] >= 1
    assert top[0]["tokens_saved"] == top[0]["hits"] * top[0]["tokens"]
    assert [p["tokens_saved"] for p in top] == sorted((p["tokens_saved"] for p in top), reverse=True)
    assert "<script>" in top[0]["text"]  # served as data; the page must render it as text


# --- the page in a real browser -------------------------------------------------------------


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self) -> None:
        self.ws.close()


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the browser test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    return path


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    proc = subprocess.Popen(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--remote-allow-origins=*", "--window-size=1400,1200",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def page_ws():
        try:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None
        pages = [t for t in targets if t.get("type") == "page"]
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    try:
        tools = DevTools(wait_for(page_ws, timeout=60))
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _table(tools: DevTools, selector: str) -> list[dict]:
    script = f"""JSON.stringify([...document.querySelectorAll('{selector} tbody tr')].map(tr =>
        Object.fromEntries([...tr.cells].map((td, i) => [td.className || String(i), td.textContent]))))"""
    return json.loads(tools.eval(script))


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_page_in_chromium_shows_each_tier_and_renders_markup_as_text(served, browser):
    srv, usages = served
    tools = browser
    tools.call("Page.enable")
    tools.call("Page.navigate", url=srv.base_url + "/dashboard")
    # Without the key the page loads, asks for it, and shows no data.
    wait_for(lambda: tools.eval(
        "location.pathname === '/dashboard' && document.readyState === 'complete' && "
        "document.getElementById('status').textContent.includes('API key')"), timeout=30)
    assert tools.eval("document.getElementById('key-form').hidden") is False
    assert tools.eval("document.querySelectorAll('#requests tbody tr').length") == 0

    tools.eval(f"sessionStorage.setItem('tiercache.apiKey', {json.dumps(KEY)}); location.reload()")
    wait_for(lambda: tools.eval(
        "!!document.body && document.body.dataset.loaded === 'true' && "
        "document.querySelectorAll('#requests tbody tr').length >= 3"), timeout=60)

    rows = _table(tools, "#requests")
    newest_first = [usages["disk"], usages["memory"], usages["cold"]]
    for row, usage in zip(rows, newest_first):
        memory, disk = _tiers(usage)
        assert _number(row["prompt"]) == usage["prompt_tokens"]
        assert _number(row["memory"]) == memory
        assert _number(row["disk"]) == disk
        assert _number(row["computed"]) == usage["prompt_tokens"] - memory - disk

    tiers = json.loads(tools.eval(
        "JSON.stringify([...document.querySelectorAll('.tier')].map(t => t.dataset.tier))"))
    assert {"memory", "disk"} <= set(tiers)
    assert tools.eval("document.querySelectorAll('#hit-chart svg rect').length") >= 3

    prefixes = _table(tools, "#prefixes")
    assert any("<script>" in p["text"] for p in prefixes)
    assert tools.eval("window.__pwned === undefined")
    assert tools.eval("document.querySelectorAll('#prefixes script, #prefixes img').length") == 0

    shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "dashboard.png"
    out.write_bytes(base64.b64decode(shot["data"]))
    assert out.stat().st_size > 10_000

"""A real client: Claude Code (from npm) runs sessions against ``tiercache-server``.

``.ci/run`` installs Claude Code into ``.ci/node_modules``; it is also found on
PATH. Claude Code sends its real system prompt, tool definitions (restricted
to Bash and Read with ``--tools``, so the prompt fits the demo model's context
and a cold prefill stays short on a CPU), thinking, streaming, ``?beta=true``.
"""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
from tiercache.tools.server_process import start_server

from tiercache.tools.bench.claude_trace import claude_env, find_claude

pytestmark = pytest.mark.slow


def _statuses(metrics: str, endpoint: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith("tiercache_requests_total{") and f'endpoint="{endpoint}"' in line:
            status = re.search(r'status="(\d+)"', line).group(1)
            out[status] = float(line.rsplit(" ", 1)[1])
    return out


def _run(claude: str, srv, model: str, prompt: str, tmp) -> subprocess.CompletedProcess:
    home, work = tmp / "home", tmp / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return subprocess.run(
        [claude, "-p", prompt, "--model", model, "--tools", "Bash,Read",
         "--allowedTools", "Bash,Read"],
        cwd=work, env=claude_env(srv.base_url, home), capture_output=True, text=True,
        timeout=900)


def test_claude_code_session(demo_model_path, tmp_path):
    claude = find_claude()
    assert claude, ("Claude Code is not installed: npm install --prefix .ci "
                    "@anthropic-ai/claude-code (.ci/run does this)")
    srv = start_server(["--model", str(demo_model_path), "--disk-dir", str(tmp_path / "disk")],
                       tmp_path / "server.log")
    try:
        model = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        first = _run(claude, srv, model, "say hi", tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr + srv.log()
        assert first.stdout.strip(), first.stderr
        second = _run(claude, srv, model, "say hi again", tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr + srv.log()
        metrics = httpx.get(srv.base_url + "/metrics").text
    finally:
        code = srv.stop()
    log = srv.log()
    assert code == 0, log
    messages = _statuses(metrics, "messages")
    assert messages.get("200", 0) >= 2 and set(messages) == {"200"}, messages
    assert set(_statuses(metrics, "count_tokens")) <= {"200"}
    assert set(_statuses(metrics, "root")) <= {"200"}, metrics  # its HEAD / check
    assert set(_statuses(metrics, "other")) <= {"200"}, metrics
    assert "x-anthropic-billing-header" in log
    # The second session resends Claude Code's system prompt and tools: cached.
    runs = [(int(p), int(c)) for p, c in re.findall(r"prompt=(\d+) cached=(\d+)", log)]
    assert len(runs) >= 2 and runs[0][0] > 1000
    assert runs[-1][1] >= runs[0][0] // 2, runs

"""``tiercache-mlx-lm-server``: mlx_lm.server with the tiered cache survives restarts."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import openai
import pytest

from tiercache.tools.server_process import ROOT, start_server, subprocess_env

pytestmark = pytest.mark.slow

PROMPT = ("The quick brown fox jumps over the lazy dog while the cat watches from the "
          "window and the rain falls softly on the old wooden roof of the quiet house.")


def _complete(srv) -> openai.types.Completion:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)
    return client.completions.create(model="default_model", prompt=PROMPT, max_tokens=8,
                                     temperature=0)


def _cached(resp) -> int:
    details = resp.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def test_dropin_serves_prefix_from_disk_after_restart(tiny_llama_path, tmp_path):
    args = ["--model", str(tiny_llama_path), "--disk-dir", str(tmp_path / "disk"),
            "--block-size", "16"]
    srv = start_server(args, tmp_path / "a.log", module="tiercache.server.mlx_lm_dropin")
    try:
        first = _complete(srv)
        second = _complete(srv)
        assert _cached(second) > 0
        assert second.choices[0].text == first.choices[0].text
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log()
    assert "TieredPromptCache" in srv.log()

    srv = start_server(args, tmp_path / "b.log", module="tiercache.server.mlx_lm_dropin")
    try:
        third = _complete(srv)
        assert _cached(third) > 0, srv.log()
        assert third.choices[0].text == first.choices[0].text
        assert httpx.get(srv.base_url + "/health").status_code == 200
    finally:
        assert srv.stop(signal.SIGINT) == 0, srv.log()


def test_dropin_help_lists_our_flags():
    p = subprocess.run([sys.executable, "-m", "tiercache.server.mlx_lm_dropin", "--help"], cwd=str(ROOT),
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for flag in ("--disk-dir", "--disk-bytes", "--block-size", "--prompt-cache-size"):
        assert flag in p.stdout

"""Three turns of the recorded Claude Code trace against a real server, restarted after two.

Each turn after the first must compute only its new tokens: from memory before
the restart, from disk after it (``tools/bench/agent_replay.py`` is the full run).
"""

from __future__ import annotations

import pytest

from tiercache.tools.bench.agent_replay import DEFAULT_TRACE, replay

pytestmark = pytest.mark.slow


def test_replay_turns_compute_only_new_tokens(demo_model_path, tmp_path):
    rows = replay(str(demo_model_path), DEFAULT_TRACE, turns=3, restart_after=2,
                  disk_dir=str(tmp_path / "disk"), log_path=tmp_path / "server.log",
                  max_tokens=4)
    assert [r["server"] for r in rows] == [1, 1, 2]
    for r in rows:
        assert r["prompt_tokens"] == r["rendered_tokens"]
        assert r["computed_tokens"] + r["cached_tokens"] == r["prompt_tokens"]
        assert r["events"][0] == "message_start" and r["events"][-1] == "message_stop"
    first, second, third = rows
    assert first["computed_tokens"] == first["prompt_tokens"] > 1000
    assert 0 < second["new_tokens"] < 1000
    assert second["computed_tokens"] == second["new_tokens"]
    assert second["memory_tokens"] == second["cached_tokens"]
    assert third["computed_tokens"] == third["new_tokens"]
    assert third["disk_tokens"] == third["cached_tokens"]
    assert third["cached_tokens"] == third["prompt_tokens"] - third["new_tokens"]

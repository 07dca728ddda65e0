"""The disk benchmark runs end to end on a tiny configuration (no timing asserted)."""

from __future__ import annotations

import json

from tiercache.tools.bench import disk_bench


def test_disk_bench_smoke(tmp_path):
    out = tmp_path / "out"
    rc = disk_bench.main([
        "--out", str(out), "--work", str(tmp_path), "--tokens", "64", "--block", "16",
        "--layers", "2", "--heads", "2", "--head-dim", "8", "--repeats", "2",
        "--cold", "fadvise", "--cold-repeats", "1", "--save-repeats", "2",
        "--dedup-repeats", "3", "--index-blocks", "300", "--prompt-tokens", "512",
        "--lookup-repeats", "3",
    ])
    assert rc == 0
    res = json.loads((out / "disk_bench.json").read_text())
    assert res["lookup"]["index_records"] == 300
    assert res["restore"]["files"] == 4 and "cold" in res["restore"]
    md = (out / "disk_bench.md").read_text()
    assert md.startswith("| metric | value |") and "dedup save" in md

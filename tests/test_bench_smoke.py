"""Every benchmark runs end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json


def _load(out, name):
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").read_text().startswith(f"# {name}")
    assert data["machine"]["cpu_count"] >= 1
    assert "blas" in data["machine"]
    return data


def test_trace_is_seeded():
    from tiercache.tools.bench import trace as T

    spec = T.TraceSpec(sessions=2, turns=3, system=(50, 60), tool=(5, 9), generated=(2, 4), seed=3)
    a, b = T.generate(spec), T.generate(spec)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert len(a) == 6
    last = {}
    for t in a:  # each prompt extends the session's previous prompt + generated tokens
        if t.session in last:
            assert t.prompt[: len(last[t.session])] == last[t.session]
        last[t.session] = t.prompt + t.generated


def test_ttft_smoke(tmp_path, tiny_llama_path):
    from tiercache.tools.bench import ttft

    ttft.main(["--out", str(tmp_path), "--preset", "tiny-llama", "--model-dir", str(tiny_llama_path.parent),
               "--sizes", "300", "--reps", "1", "--no-system-drop"])
    data = _load(tmp_path, "ttft")
    r = data["results"][0]
    assert r["memory"]["sources"] == ["memory"]
    assert r["disk_warm"]["sources"] == ["disk"]
    assert r["restart"]["sources"] == ["disk"]
    assert r["memory"]["cached"] == 299


def test_replay_smoke(tmp_path, tiny_llama_path):
    from tiercache.tools.bench import replay

    replay.main(["--out", str(tmp_path), "--quick", "--preset", "tiny-llama",
                 "--model-dir", str(tiny_llama_path.parent), "--sessions", "2", "--turns", "3"])
    data = _load(tmp_path, "replay")
    v = data["variants"]
    assert set(v) == {"none", "lru", "tiercache", "tiercache_restart"}
    assert v["none"]["prefill_tokens"] == data["trace"]["prompt_tokens_total"]
    assert v["tiercache"]["prefill_tokens"] <= v["none"]["prefill_tokens"]
    assert "after_restart" in v["tiercache_restart"]


def test_overheads_smoke(tmp_path):
    from tiercache.tools.bench import overheads

    overheads.main(["--out", str(tmp_path), "--quick", "--reps", "2", "--mem-sizes", "64", "--mem-reps", "1",
                    "--writer-tokens", "64", "--writer-count", "1"])
    data = _load(tmp_path, "overheads")
    assert data["index"][0]["records"] >= 1000
    assert data["writer"]["dropped_writes"] == 0


def test_http_peer_smoke(tmp_path, tiny_llama_path):
    from tiercache.tools.bench import http_peer

    http_peer.main(["--out", str(tmp_path), "--quick", "--preset", "tiny-llama",
                    "--model-dir", str(tiny_llama_path.parent), "--sessions", "1", "--turns", "2"])
    data = _load(tmp_path, "http_peer")
    assert set(data["servers"]) == {"mlx_lm.server", "tiercache-server"}
    assert all(len(v["rows"]) == 2 for v in data["servers"].values())


def test_batch_bench_smoke(tmp_path, tiny_llama_path):
    from tiercache.tools.bench import batch_bench

    batch_bench.main(["--out", str(tmp_path), "--preset", "tiny-llama",
                      "--model-dir", str(tiny_llama_path.parent), "--clients", "2",
                      "--servers", "tiercache batched", "--turns", "2", "--max-tokens", "8",
                      "--system-tokens", "120", "--tool-tokens", "20"])
    data = _load(tmp_path, "batch_bench")
    (cell,) = data["servers"]["tiercache batched"]
    assert cell["clients"] == 2 and cell["requests"] == 4
    assert cell["completion_tokens"] == 4 * 8  # tiny-llama never stops early
    # The warm-up cached the shared system prompt; later turns hit their history.
    assert 0 < cell["computed_prompt_tokens"] < cell["prompt_tokens"]


def test_write_amp_smoke(tmp_path, tiny_llama_path):
    from tiercache.tools.bench import write_amp

    write_amp.main(["--out", str(tmp_path), "--quick", "--preset", "tiny-llama",
                    "--model-dir", str(tiny_llama_path.parent), "--block-size", "16"])
    data = _load(tmp_path, "write_amp-quick")
    rows = data["rows"]
    assert len(rows) == data["trace"]["sessions"] * data["trace"]["turns"]
    assert data["bytes_written_total"] == sum(r["bytes_written"] for r in rows) > 0
    # Every new token's KV reaches the disk at least once; shared prefixes are not rewritten.
    assert data["write_amplification"] >= 1.0
    assert rows[0]["new_tokens"] == rows[0]["snapshot_tokens"]
    assert all(r["new_tokens"] < r["snapshot_tokens"] for r in rows[1:])


def test_scale_bench_smoke(tmp_path):
    from tiercache.tools.bench import scale_bench

    scale_bench.main(["--sizes", "300,600", "--repeats", "3", "--out", str(tmp_path)])
    data = _load(tmp_path, "scale_bench")
    assert [s["evicted_per_call"] for s in data["stages"]] == [5, 5]
    assert data["stages"][1]["records"] > data["stages"][0]["records"]
    assert data["start"]["tokens"] == scale_bench.HIT_TOKENS

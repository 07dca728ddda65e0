"""Load test: N concurrent streaming clients against ``tiercache-server``.

    python -m tiercache.tools.load_test --model PATH --clients 32 --seconds 120

Starts the server on a free 127.0.0.1 port (tiny model, a disk dir, a memory
budget), runs ``--clients`` threads that each send streaming chat/completions
requests back to back for ``--seconds``, and reports: requests served, errors
other than deliberate 429s, p50/p99 latency and time to first token, the server's
peak RSS (``VmHWM`` from /proc, sampled ``VmRSS`` too) against model size +
``--prompt-cache-bytes``, and the largest writer queue seen in /v1/cache/stats.
Prints a JSON summary (also to ``--json-out``); exit status 1 on unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tiercache.settings import parse_size
from tiercache.tools.server_process import ServerProcess



def proc_mem(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes from /proc (0, 0 if unavailable)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        try:
            import psutil

            rss = psutil.Process(pid).memory_info().rss
        except Exception:
            pass
    return rss, hwm


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.r429 = 0
        self.errors: list[str] = []
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.cached_tokens = 0
        self.prompt_tokens = 0


def client(idx: int, url: str, deadline: float, stats: Stats, max_tokens: int, seed: int) -> None:
    rng = random.Random(seed * 1000 + idx)
    # Each client holds a conversation (prefix reuse) and sometimes starts over.
    system = f"You are assistant number {idx % 8}. Answer briefly."
    history = [{"role": "system", "content": system}]
    with httpx.Client(timeout=120) as h:
        while time.monotonic() < deadline:
            if rng.random() < 0.3:
                body = {"prompt": [rng.randrange(3, 500) for _ in range(rng.randrange(8, 200))],
                        "max_tokens": max_tokens, "temperature": 0, "stream": True}
                path = "/v1/completions"
            else:
                if len(history) > 9:
                    history = history[:1]
                history.append({"role": "user", "content": f"question {rng.randrange(10**6)}"})
                body = {"messages": history, "max_tokens": max_tokens,
                        "temperature": rng.choice([0, 0.7]), "stream": True,
                        "stream_options": {"include_usage": True}}
                path = "/v1/chat/completions"
            t0 = time.monotonic()
            first = None
            text, usage, error = [], None, None
            try:
                with h.stream("POST", url + path, json=body) as r:
                    if r.status_code == 429:
                        with stats.lock:
                            stats.r429 += 1
                        r.read()
                        time.sleep(0.2)
                        continue
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                    else:
                        done = False
                        for line in r.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                done = True
                                break
                            ev = json.loads(data)
                            if "error" in ev:
                                error = f"stream error: {ev['error']}"
                                break
                            if first is None and ev.get("choices"):
                                first = time.monotonic()
                            for c in ev.get("choices") or []:
                                text.append((c.get("delta") or {}).get("content") or c.get("text") or "")
                            if ev.get("usage"):
                                usage = ev["usage"]
                        if not done and error is None:
                            error = "stream ended without [DONE]"
            except Exception as e:  # connection errors count as errors
                error = f"{type(e).__name__}: {e}"
            t1 = time.monotonic()
            with stats.lock:
                if error:
                    stats.errors.append(error)
                else:
                    stats.ok += 1
                    stats.latency.append(t1 - t0)
                    if first is not None:
                        stats.ttft.append(first - t0)
                    if usage:
                        stats.prompt_tokens += usage["prompt_tokens"]
                        stats.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            if path.endswith("chat/completions") and not error:
                history.append({"role": "assistant", "content": "".join(text)})


def model_bytes(model: str) -> int:
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


def run(args) -> dict:
    disk = args.disk_dir or tempfile.mkdtemp(prefix="tiercache-load-")
    srv = ServerProcess(
        ["--model", args.model, "--disk-dir", disk, "--prompt-cache-bytes", args.prompt_cache_bytes,
         "--block-size", str(args.block_size), "--max-queue", str(args.max_queue),
         "--log-level", "WARNING"],
        Path(args.log or disk + "-server.log"),
    )
    proc, url = srv.proc, srv.url
    try:
        if not srv.wait_healthy(120):
            raise RuntimeError("server did not start")
        idle_rss, _ = proc_mem(proc.pid)
        stats = Stats()
        samples = {"rss_max": 0, "queue_bytes_max": 0, "queue_pending_max": 0,
                   "memory_bytes_max": 0, "scrapes": 0, "scrape_errors": 0}
        stop = threading.Event()

        def sampler():
            with httpx.Client(timeout=30) as h:
                while not stop.is_set():
                    rss, _ = proc_mem(proc.pid)
                    samples["rss_max"] = max(samples["rss_max"], rss)
                    try:
                        t = h.get(url + "/v1/cache/stats").json()["tiers"]
                        w = t.get("writer") or {}
                        samples["queue_bytes_max"] = max(samples["queue_bytes_max"], w.get("queue_bytes", 0))
                        samples["queue_pending_max"] = max(samples["queue_pending_max"], w.get("pending", 0))
                        samples["memory_bytes_max"] = max(samples["memory_bytes_max"], t["memory"]["bytes"])
                        h.get(url + "/metrics")
                        samples["scrapes"] += 1
                    except Exception:
                        samples["scrape_errors"] += 1
                    stop.wait(0.5)

        st = threading.Thread(target=sampler, daemon=True)
        st.start()
        t0 = time.monotonic()
        end = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(i, url, end, stats, args.max_tokens, args.seed),
                                    daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 300)
        elapsed = time.monotonic() - t0
        stop.set()
        st.join(10)
        final = httpx.get(url + "/v1/cache/stats", timeout=30).json()["tiers"]
        rss, hwm = proc_mem(proc.pid)
        budget = parse_size(args.prompt_cache_bytes)
        mb = model_bytes(args.model)
        peak = max(hwm, samples["rss_max"])
        return {
            "clients": args.clients,
            "seconds": round(elapsed, 1),
            "requests_served": stats.ok,
            "requests_per_second": round(stats.ok / elapsed, 2),
            "deliberate_429": stats.r429,
            "errors": len(stats.errors),
            "error_examples": stats.errors[:5],
            "latency_p50_s": pct(stats.latency, 50),
            "latency_p99_s": pct(stats.latency, 99),
            "ttft_p50_s": pct(stats.ttft, 50),
            "ttft_p99_s": pct(stats.ttft, 99),
            "prompt_tokens": stats.prompt_tokens,
            "cached_tokens": stats.cached_tokens,
            "rss_idle_bytes": idle_rss,
            "rss_peak_bytes": peak,
            "model_bytes": mb,
            "prompt_cache_bytes": budget,
            "rss_over_model_plus_budget_bytes": peak - mb - budget,
            "memory_tier_bytes_max": samples["memory_bytes_max"],
            "writer_queue_bytes_max": samples["queue_bytes_max"],
            "writer_pending_max": samples["queue_pending_max"],
            "writer": final.get("writer"),
            "disk": {k: (final.get("disk") or {}).get(k) for k in
                     ("entries", "bytes", "hits", "hit_tokens", "corrupt_records")},
            "stats_scrapes": samples["scrapes"],
            "stats_scrape_errors": samples["scrape_errors"],
        }
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local mlx-lm model folder (tiny)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-cache-bytes", default="64MiB")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--log", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 512 or not 0 < args.seconds <= 3600:
        ap.error("--clients must be 1..512 and --seconds 0..3600")
    summary = run(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Two servers, one Redis: what the shared remote tier saves, and its restore bandwidth.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.remote_bench --out bench-results [--quick]

Part 1, over HTTP: the seeded agentic trace (tools/bench/trace.py) is replayed as
``/v1/completions`` requests with token-id prompts (``max_tokens=1``) against

* ``single``: one ``tiercache-server`` (memory + disk) serving everything;
* ``two-local``: two servers, each with its own disk dir, no remote tier;
* ``two-remote``: the same two servers sharing one ``redis-server`` on loopback.

Two ways to split the trace across two servers: ``sessions`` (session ``s`` always
goes to server ``s % 2``: sticky sessions; only the shared system prompt can
travel) and ``turns`` (request ``i`` goes to server ``i % 2``: a load balancer
without stickiness; every turn's history was computed by the other server the
turn before). Between requests the bench either waits until every server's
disk writer and remote pusher are idle (``settled``: an agent's turn takes
seconds of generation and tool time) or sends the next at once
(``back-to-back``: pushes race the next request). The number that matters is prompt tokens computed (``prompt -
cached`` from each response's usage), summed over the trace.

Part 2, in-process: restore bandwidth of one long snapshot (synthetic KV of the
model's shape) from Redis into a cache whose disk is empty, vs from the local
disk (page cache warm) once the remote hit has been copied there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import common as C
from . import trace as T

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(url)


class Redis:
    """A ``redis-server`` on a free loopback port, persistence off, allkeys-lru."""

    def __init__(self, work: Path, maxmemory: str):
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work), "--maxmemory", maxmemory,
             "--maxmemory-policy", "allkeys-lru"],
            stdout=open(work / f"redis-{self.port}.log", "ab"), stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def info(self) -> dict:
        import redis

        r = redis.Redis(port=self.port)
        return {"keys": r.dbsize(), "used_memory": r.info("memory")["used_memory"]}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Server:
    def __init__(self, model: Path, store: Path, log: Path, budget: int, block: int, remote: str | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tiercache.server.cli", "--model", str(model), "--port", str(self.port),
               "--prompt-cache-bytes", str(budget), "--disk-dir", str(store), "--block-size", str(block)]
        if remote:
            # The machine is shared and loaded: a 50 ms lookup timeout would time
            # out under load spikes; the bench measures hits, not the timeout.
            cmd += ["--remote-url", remote, "--remote-timeout-ms", "1000"]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env=os.environ.copy())
        _wait(self.url + "/health", self.proc)

    def complete(self, ids: list[int]) -> dict:
        body = json.dumps({"prompt": ids, "max_tokens": 1, "temperature": 0}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/cache/stats", timeout=30) as r:
            return json.loads(r.read())["tiers"]

    def settle(self, timeout: float = 300) -> None:
        """Waits until the worker is idle (the response is sent before the insert),
        then until the disk writer and the remote pusher have nothing pending."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
                queue = json.loads(r.read())["queue"]
            if queue["running"] or queue["waiting"]:
                time.sleep(0.05)
                continue
            st = self.stats()
            if (st.get("writer") or {}).get("pending", 0) == 0 and (st.get("remote") or {}).get("push_pending", 0) == 0:
                return
            time.sleep(0.05)
        raise TimeoutError("server did not settle")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _replay(name, split, gap, n_servers, remote, turns, model, work, budget, block, maxmemory) -> dict:
    run = work / f"{name}-{split}-{gap}"
    run.mkdir()
    redis_srv = Redis(run, maxmemory) if remote else None
    servers = []
    try:
        for i in range(n_servers):
            servers.append(Server(model, run / f"disk{i}", run / f"server{i}.log", budget, block,
                                  redis_srv.url if redis_srv else None))
        rows = []
        for t in turns:
            k = 0 if n_servers == 1 else (t.session if split == "sessions" else t.index) % n_servers
            t0 = time.perf_counter()
            usage = servers[k].complete(t.prompt)["usage"]
            dt = time.perf_counter() - t0
            d = usage["prompt_tokens_details"]
            if gap == "settled":
                for s in servers:
                    s.settle()
            rows.append({"index": t.index, "session": t.session, "turn": t.turn, "server": k, "seconds": dt,
                         "prompt": usage["prompt_tokens"], "cached": d["cached_tokens"],
                         "memory": d["memory_tokens"], "disk": d["disk_tokens"],
                         "remote": d.get("remote_tokens", 0)})
            print(f"  {name:10s} {split:8s} {gap:12s} #{t.index:2d} s{t.session} -> server {k}: prompt {usage['prompt_tokens']} "
                  f"cached {d['cached_tokens']} (remote {d.get('remote_tokens', 0)}) {dt:.2f}s", flush=True)
        remote_stats = [s.stats().get("remote") for s in servers] if remote else None
        redis_info = redis_srv.info() if redis_srv else None
    finally:
        for s in servers:
            s.stop()
        if redis_srv:
            redis_srv.stop()
        shutil.rmtree(run, ignore_errors=True)
    prompt = sum(r["prompt"] for r in rows)
    cached = sum(r["cached"] for r in rows)
    return {"name": name, "split": split, "gap": gap, "servers": n_servers, "rows": rows, "prompt_tokens": prompt,
            "cached_tokens": cached, "computed_tokens": prompt - cached,
            "remote_tokens": sum(r["remote"] for r in rows), "seconds": sum(r["seconds"] for r in rows),
            "remote_stats": remote_stats, "redis": redis_info}


def _bandwidth(model_path: Path, work: Path, n_tokens: int, block: int, rounds: int) -> dict:
    """Restore of one ``n_tokens`` snapshot: from Redis (empty local disk) vs local disk."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from tiercache import TieredPromptCache

    model, _ = C.load_model(model_path)
    key = str(model_path)
    probe = make_prompt_cache(model)
    assert all(type(c) is KVCache for c in probe), "bandwidth part needs an all-KVCache model"
    cfg = json.loads((model_path / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    snap = []
    for _ in probe:
        c = KVCache()
        shape = (1, cfg["num_key_value_heads"], n_tokens, hd)
        c.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
        snap.append(c)
    mx.eval([c.state for c in snap])
    tokens = list(range(3, 3 + n_tokens))
    query = tokens + [1]
    redis_srv = Redis(work, "2gb")
    out = {"tokens": n_tokens, "remote": [], "disk": []}
    try:
        src = TieredPromptCache(disk_dir=work / "bw-src", block_size=block, remote_url=redis_srv.url,
                                remote_timeout_ms=5000)
        src.register_model(key, model_path, model)
        src.insert_cache(key, tokens, snap)
        src.flush(600)
        pushed = src.stats()["remote"]["pushed_bytes"]
        src.close()
        for r in range(rounds):
            dst = TieredPromptCache(disk_dir=work / f"bw-dst{r}", block_size=block, remote_url=redis_srv.url,
                                    remote_timeout_ms=5000, keep_promoted=False)
            dst.register_model(key, model_path, model)
            found = dst.fetch(key, query)
            cache, _ = found.prompt_cache, found.rest
            info, st = found, dst.stats()["remote"]
            assert info.remote_tokens == n_tokens, info
            out["remote"].append({"seconds": info.restore_seconds, "bytes": st["restored_bytes"],
                                  "network_seconds": st["round_trip_seconds"],
                                  "restore_seconds": st["restore_seconds"]})
            del cache
            dst.flush(600)
            dst.close()
            local = TieredPromptCache(disk_dir=work / f"bw-dst{r}", block_size=block, keep_promoted=False)
            local.register_model(key, model_path, model)
            found = local.fetch(key, query)  # first read faults the files into the page cache
            found = local.fetch(key, query)
            cache, _ = found.prompt_cache, found.rest
            assert found.disk_tokens == n_tokens, found
            out["disk"].append({"seconds": found.restore_seconds,
                                "bytes": local.stats()["disk"]["bytes"]})
            del cache
            local.close()
        out["pushed_bytes"] = pushed
    finally:
        redis_srv.stop()
    for kind in ("remote", "disk"):
        xs = sorted(out[kind], key=lambda x: x["seconds"])
        mid = xs[len(xs) // 2]
        out[f"{kind}_median_seconds"] = mid["seconds"]
        out[f"{kind}_gbps"] = mid["bytes"] / mid["seconds"] / 1e9
    return out


def run(args) -> dict:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    info = C.machine_info()
    path = C.model_path(args.preset, args.model_dir)
    shape = C.model_shape(path)
    spec = T.QUICK if args.quick else T.TraceSpec()
    spec = T.TraceSpec(**{**T.asdict(spec), "seed": args.seed})
    if args.sessions:
        spec.sessions = args.sessions
    if args.turns:
        spec.turns = args.turns
    for name in ("system", "tool", "generated"):
        if getattr(args, name):
            setattr(spec, name, tuple(getattr(args, name)))
    turns = T.generate(spec)
    max_snap = max(len(t.prompt) + 1 for t in turns)
    budget = int(args.budget_sessions * ((max_snap + 255) // 256 + 1) * 256 * shape["kv_bytes_per_token"])
    work = Path(tempfile.mkdtemp(prefix="tiercache-remote-bench-"))
    runs = []
    try:
        plan = [("single", "-", "settled", 1, False)]
        for split in args.splits:
            plan.append(("two-local", split, "settled", 2, False))
            plan += [("two-remote", split, gap, 2, True) for gap in args.gaps]
        for name, split, gap, n, remote in plan:
            runs.append(_replay(name, split, gap, n, remote, turns, path, work, budget, args.block_size,
                                args.redis_maxmemory))
        bw = _bandwidth(path, work, args.bw_tokens, args.block_size, args.bw_rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "remote_bench", "command": C.command_line(), "machine": info, "model": args.preset,
            "model_shape": shape, "trace_spec": T.asdict(spec), "trace": T.summary(turns), "budget_bytes": budget,
            "block_size": args.block_size, "redis_maxmemory": args.redis_maxmemory, "runs": runs,
            "bandwidth": bw}


def report(res: dict, out: Path) -> None:
    single = next(r for r in res["runs"] if r["name"] == "single")["computed_tokens"]
    rows = [[r["name"], r["split"], r["gap"], r["prompt_tokens"], r["cached_tokens"], r["remote_tokens"],
             r["computed_tokens"], r["computed_tokens"] / single, r["seconds"]] for r in res["runs"]]
    md = (f"Trace: {res['trace']['sessions']} sessions x {res['trace_spec']['turns']} turns, "
          f"{res['trace']['prompt_tokens_total']} prompt tokens; memory budget per server "
          f"{res['budget_bytes'] / 1e6:.1f} MB; block size {res['block_size']}; Redis maxmemory "
          f"{res['redis_maxmemory']} (allkeys-lru).\n\n")
    md += C.md_table(["setup", "split", "between requests", "prompt tokens", "cached", "of which remote", "computed",
                      "computed vs single", "wall s (sum of requests)"], rows)
    bw = res["bandwidth"]
    md += (f"\n\nRestore of one {bw['tokens']}-token snapshot ({bw['remote'][0]['bytes'] / 1e6:.1f} MB of KV), "
           f"median of {len(bw['remote'])}:\n\n")
    md += C.md_table(["source", "seconds", "GB/s"], [
        ["Redis on loopback (MGET + verify + restore), local disk empty", bw["remote_median_seconds"], bw["remote_gbps"]],
        ["local disk, page cache warm", bw["disk_median_seconds"], bw["disk_gbps"]],
    ])
    C.write_results(out, "remote_bench", res, md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--system", type=int, nargs=2, metavar=("MIN", "MAX"), help="system prompt tokens")
    ap.add_argument("--tool", type=int, nargs=2, metavar=("MIN", "MAX"), help="tool-output tokens per turn")
    ap.add_argument("--generated", type=int, nargs=2, metavar=("MIN", "MAX"), help="generated tokens per turn")
    ap.add_argument("--budget-sessions", type=float, default=2.0)
    ap.add_argument("--block-size", type=int, default=None, help="default 256 (--quick: 64)")
    ap.add_argument("--splits", nargs="+", choices=["sessions", "turns"], default=["sessions", "turns"])
    ap.add_argument("--gaps", nargs="+", choices=["settled", "back-to-back"], default=["settled", "back-to-back"],
                    help="settled: wait for every server's disk writer and remote pusher between requests "
                    "(agents think and run tools between turns); back-to-back: no wait (worst case)")
    ap.add_argument("--redis-maxmemory", default="1gb")
    ap.add_argument("--bw-tokens", type=int, default=None, help="bandwidth snapshot length (default 16384; --quick 2048)")
    ap.add_argument("--bw-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.block_size is None:
        args.block_size = 64 if args.quick else 256
    if args.bw_tokens is None:
        args.bw_tokens = 2048 if args.quick else 16384
    res = run(args)
    report(res, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tiercache verify --fix` in a loop beside a live server, then SIGTERM with a queue.

    python -m tiercache.tools.live_verify --model PATH --seconds 60

Starts the server on a free 127.0.0.1 port with a fresh disk dir, runs
``--clients`` threads sending completions (shared prefixes, new suffixes, so the
server keeps committing blocks), and runs ``tiercache verify DIR --fix`` (in
this process, through the CLI's code) every ``--interval`` seconds meanwhile. Before each run an hour-old orphan file is
planted, so every run repairs; a run that finds anything else (``orphan_file``
for the server's new blocks, ``missing_file``, ``prefix_link``, ``byte_drift``...),
leaves problems behind or doesn't remove the planted file counts as a failure.
Then it queues ``--queued`` long requests behind a running one, sends SIGTERM
and records the answers, the exit status and how long the exit took. Finally
the stopped store is verified with ``--temp-grace 0``. Prints a JSON summary;
exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tiercache.tools.server_process import ServerProcess


def _verify(d: Path, *extra: str) -> dict:
    """``tiercache verify DIR ...``, run in this process (the CLI's own code path)."""
    from click.testing import CliRunner

    from tiercache.tools.cli import main as cli

    res = CliRunner().invoke(cli, ["verify", str(d), *extra])
    try:
        out = json.loads(res.stdout)
    except ValueError:
        out = {"clean": False, "error": (res.stderr or str(res.exception))[-500:]}
    out["exit"] = res.exit_code
    return out


def _plant_orphan(d: Path) -> Path:
    """An hour-old file no record names: a real problem, so every run repairs."""
    h = os.urandom(16).hex()
    p = d / "blocks" / h[:2] / f"{h}.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"junk")
    old = time.time() - 3600
    os.utime(p, (old, old))
    return p


def _client(url: str, model: str, stop: threading.Event, seed: int, stats: dict) -> None:
    """Send completions back to back until ``stop``; count answers by status."""
    rng = random.Random(seed)
    heads = [[(31 * h + i) % 500 + 3 for i in range(48)] for h in range(4)]
    with httpx.Client(timeout=120) as c:
        while not stop.is_set():
            prompt = rng.choice(heads) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
            r = c.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                      "max_tokens": 8, "temperature": 0})
            stats[r.status_code] = stats.get(r.status_code, 0) + 1


def _sigterm_with_queue(srv: ServerProcess, model: str, queued: int) -> dict:
    """Queue long requests behind a running one, SIGTERM, record answers and exit."""
    answers: dict = {}

    def post(key, body):
        try:
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=300)
            answers[key] = r.status_code
        except httpx.HTTPError as e:
            answers[key] = type(e).__name__

    long = {"model": model, "max_tokens": 7000, "temperature": 0}
    threads = [threading.Thread(target=post, args=("running", {**long, "prompt": [5] * 40}))]
    threads[0].start()
    while not httpx.get(srv.url + "/health").json()["queue"]["running"]:
        time.sleep(0.05)
    for i in range(queued):
        threads.append(threading.Thread(target=post, args=(f"queued{i}", {**long, "prompt": [6 + i] * 40})))
        threads[-1].start()
    while httpx.get(srv.url + "/health").json()["queue"]["waiting"] < queued:
        time.sleep(0.05)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(300)
    took = time.monotonic() - t0
    for t in threads:
        t.join(300)
    return {"exit": code, "exit_seconds": round(took, 2), "answers": answers}


def main(argv=None) -> int:
    """Run the live loop and the SIGTERM round; print the summary.

    Returns:
        0 when every run was clean, the shutdown answered as it should and exited
        0, and the final verify was clean; else 1.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--queued", type=int, default=3)
    ap.add_argument("--shutdown-timeout", type=float, default=2.0)
    ap.add_argument("--flush-timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "disk"
        srv = ServerProcess(["--model", args.model, "--disk-dir", str(d), "--block-size", "16",
                             "--shutdown-timeout", str(args.shutdown_timeout),
                             "--flush-timeout", str(args.flush_timeout)], Path(tmp) / "server.log")
        if not srv.wait_healthy():
            print((Path(tmp) / "server.log").read_text(), file=sys.stderr)
            return 1
        model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        stop, stats = threading.Event(), {}
        clients = [threading.Thread(target=_client, args=(srv.url, model, stop, s, stats),
                                    daemon=True) for s in range(args.clients)]
        for t in clients:
            t.start()
        runs, failed, found = 0, [], {}
        deadline = time.monotonic() + args.seconds
        try:
            while time.monotonic() < deadline:
                planted = _plant_orphan(d)
                res = _verify(d, "--fix")
                runs += 1
                for p in res.get("problems", []):
                    found[p["kind"]] = found.get(p["kind"], 0) + 1
                unexpected = [p for p in res.get("problems", []) if p["target"] != str(planted)]
                if res.get("remaining") or res["exit"] != 0 or unexpected or planted.exists():
                    failed.append(res)
                time.sleep(args.interval)
            stop.set()
            for t in clients:
                t.join(120)
            shutdown = _sigterm_with_queue(srv, model, args.queued)
        finally:
            stop.set()
            srv.stop()
        final = _verify(d, "--temp-grace", "0")
        log = (Path(tmp) / "server.log").read_text(errors="replace")
    summary = {
        "verify_fix_runs": runs, "runs_with_problems": len(failed), "problems_found": found,
        "requests": stats, "sigterm": shutdown, "final_verify_clean": final.get("clean"),
        "tracebacks_in_log": log.count("Traceback"),
    }
    print(json.dumps(summary, indent=2))
    queued_ok = all(v == 503 for k, v in shutdown["answers"].items() if k.startswith("queued"))
    ok = (not failed and shutdown["exit"] == 0 and queued_ok and final.get("clean")
          and summary["tracebacks_in_log"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

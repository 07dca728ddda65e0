"""kill -9 crash test for ``tiercache-server`` with a disk tier.

    python -m tiercache.tools.crash_test --rounds 20 --model PATH --disk-dir DIR

1. Cold reference: a server *without* a disk dir answers a fixed set of greedy
   (temperature 0) completions, with the memory tier reset before each one.
2. Each round starts the server on a free 127.0.0.1 port with ``--disk-dir DIR``,
   checks that greedy outputs equal the cold ones (they may now come from disk),
   drives requests that cause disk writes from a few client threads, and
   ``kill -9``s the process at a random moment.
3. With the server dead, the store is verified (``tiercache verify DIR`` when the
   tools CLI is installed and answers, else ``DiskStore(DIR).check()``): anything
   other than orphan/temp files is a failure. Every other round the leftovers are
   repaired (``--fix`` / ``check(fix=True)``) and a second check must come back
   empty; on the other rounds they stay, so the server must also start over them.

A summary JSON is printed on stdout (and written to ``--json-out``). Exit status
is 0 when every round survived.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tiercache.tools.server_process import ServerProcess as Server

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_AFTER_CRASH = {"orphan_file", "temp_file"}


def make_prompts(n: int, seed: int, vocab: int = 512) -> list[list[int]]:
    """Token-id prompts sharing prefixes (so blocks dedup and chains branch)."""
    rng = random.Random(seed)
    base = [rng.randrange(3, vocab) for _ in range(48)]
    out = []
    for i in range(n):
        head = base[: rng.choice((0, 16, 32, 48))]
        out.append(head + [rng.randrange(3, vocab) for _ in range(rng.randrange(20, 90))])
    return out


def complete(url: str, prompt: list[int], max_tokens: int, timeout: float = 60) -> dict:
    r = httpx.post(url + "/v1/completions",
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                   timeout=timeout)
    r.raise_for_status()
    return r.json()


def cold_outputs(model: str, prompts, max_tokens: int, logdir: Path, timeout: float) -> list[str]:
    srv = Server(["--model", model, "--max-tokens", str(max_tokens)], logdir / "cold.log")
    try:
        if not srv.wait_healthy(timeout):
            raise RuntimeError(f"cold server did not start; see {srv.log_path}")
        outs = []
        for p in prompts:
            httpx.post(srv.url + "/v1/cache/reset", timeout=60).raise_for_status()
            outs.append(complete(srv.url, p, max_tokens)["choices"][0]["text"])
        return outs
    finally:
        srv.stop()


def verify_store(disk_dir: Path, fix: bool, use_cli: bool = True) -> tuple[list[dict], list[dict], str]:
    """Returns (problems, problems left after ``fix`` (else []), tool used).

    Uses ``tiercache verify DIR --temp-grace 0 [--fix]`` (JSON on stdout) when the
    tools CLI is installed; falls back to ``DiskStore(DIR).check()``. The server is
    dead, so no writer owns a temp file: no grace period.
    """
    cli = shutil.which("tiercache") or str(Path(sys.executable).parent / "tiercache")
    if use_cli and Path(cli).exists() and (ROOT / "tools" / "cli.py").exists():
        try:
            cmd = [cli, "verify", str(disk_dir), "--temp-grace", "0"]
            p = subprocess.run(cmd + (["--fix"] if fix else []), capture_output=True,
                               text=True, timeout=120)
            data = json.loads(p.stdout)
            if p.returncode in (0, 1) and isinstance(data.get("problems"), list):
                after = data.get("remaining", []) if fix else []
                return data["problems"], after, "tiercache verify"
        except (OSError, ValueError, AttributeError, subprocess.SubprocessError):
            pass  # the CLI is not usable: fall back to the library
    from tiercache.store.disk import DiskStore

    with DiskStore(disk_dir) as store:
        problems = [p.to_dict() for p in store.check(temp_grace=0)]
        after = []
        if fix and problems:
            store.check(fix=True, temp_grace=0)
            after = [p.to_dict() for p in store.check(temp_grace=0)]
    return problems, after, "DiskStore.check"


def drive(url: str, prompts, rng: random.Random, stop: threading.Event, stats: Counter,
          max_tokens: int) -> None:
    """Sends requests until the server dies: fresh prompts (new blocks to write)
    and extensions of the reference prompts (new tails on existing chains)."""
    while not stop.is_set():
        base = rng.choice(prompts)
        if rng.random() < 0.5:
            prompt = base + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        else:
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(16, 120))]
        try:
            complete(url, prompt, max_tokens, timeout=30)
            stats["sent_ok"] += 1
        except Exception:
            stats["sent_failed"] += 1  # expected once the server is killed
            return


def run(args) -> dict:
    rng = random.Random(args.seed)
    disk_dir = Path(args.disk_dir)
    logdir = Path(args.log_dir or (disk_dir.parent / (disk_dir.name + "-crashlogs")))
    logdir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.prompts, args.seed)
    t0 = time.monotonic()
    cold = cold_outputs(args.model, prompts, args.max_tokens, logdir, args.startup_timeout)
    summary = {
        "rounds": args.rounds, "rounds_survived": 0, "failures": [],
        "problems_found": Counter(), "problems_after_fix": 0, "kills": 0,
        "requests_ok": 0, "outputs_compared": 0, "outputs_from_disk": 0,
        "verify_tool": None,
    }
    server_args = ["--model", args.model, "--disk-dir", str(disk_dir), "--block-size",
                   str(args.block_size), "--max-tokens", str(args.max_tokens)]
    for rnd in range(args.rounds):
        ok = True
        srv = Server(server_args, logdir / f"round{rnd}.log")
        if not srv.wait_healthy(args.startup_timeout):
            srv.kill9()
            summary["failures"].append({"round": rnd, "what": "server did not start",
                                        "log": str(srv.log_path)})
            break
        # Restarted over what the last kill left: outputs must equal the cold ones.
        for i in rng.sample(range(len(prompts)), k=min(args.check_prompts, len(prompts))):
            try:
                out = complete(srv.url, prompts[i], args.max_tokens)
            except Exception as e:
                ok = False
                summary["failures"].append({"round": rnd, "what": f"request failed: {e}"})
                break
            summary["outputs_compared"] += 1
            if out["usage"]["prompt_tokens_details"].get("disk_tokens"):
                summary["outputs_from_disk"] += 1
            if out["choices"][0]["text"] != cold[i]:
                ok = False
                summary["failures"].append({"round": rnd, "what": "output differs from cold",
                                            "prompt": i, "got": out["choices"][0]["text"],
                                            "cold": cold[i]})
        stop = threading.Event()
        stats: Counter = Counter()
        threads = [threading.Thread(target=drive, daemon=True,
                                    args=(srv.url, prompts, random.Random(rng.random()), stop,
                                          stats, args.max_tokens))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, args.max_kill_delay))
        srv.kill9()
        summary["kills"] += 1
        stop.set()
        for t in threads:
            t.join(35)
        summary["requests_ok"] += stats["sent_ok"]
        fix = rnd % 2 == 1 or rnd == args.rounds - 1
        problems, after, tool = verify_store(disk_dir, fix=fix)
        summary["verify_tool"] = tool
        for p in problems:
            summary["problems_found"][p["kind"]] += 1
        bad = [p for p in problems if p["kind"] not in ALLOWED_AFTER_CRASH]
        if bad:
            ok = False
            summary["failures"].append({"round": rnd, "what": "store damaged", "problems": bad})
        if after:
            ok = False
            summary["problems_after_fix"] += len(after)
            summary["failures"].append({"round": rnd, "what": "fix left problems",
                                        "problems": after})
        if ok:
            summary["rounds_survived"] += 1
        if args.verbose:
            print(f"round {rnd}: ok={ok} requests={stats['sent_ok']} "
                  f"problems={[p['kind'] for p in problems]}", file=sys.stderr, flush=True)
    # A last clean start: the repaired store must still serve cold-equal outputs.
    srv = Server(server_args, logdir / "final.log")
    try:
        if srv.wait_healthy(args.startup_timeout):
            for i, p in enumerate(prompts):
                out = complete(srv.url, p, args.max_tokens)
                summary["outputs_compared"] += 1
                if out["choices"][0]["text"] != cold[i]:
                    summary["failures"].append({"round": "final", "what": "output differs",
                                                "prompt": i})
        else:
            summary["failures"].append({"round": "final", "what": "server did not start"})
    finally:
        srv.stop()
    summary["problems_found"] = dict(summary["problems_found"])
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["ok"] = not summary["failures"] and summary["rounds_survived"] == args.rounds
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--model", required=True, help="local mlx-lm model folder (tiny)")
    ap.add_argument("--disk-dir", required=True)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--check-prompts", type=int, default=3,
                    help="reference prompts compared after each restart")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--max-kill-delay", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.rounds > 1000:
        ap.error("--rounds must be in 1..1000")
    summary = run(args)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Concurrent agent sessions: continuous batching vs one at a time vs mlx_lm.server.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.batch_bench --out tools/bench/results [--quick]

For every server (``tiercache-server`` batched, ``tiercache-server
--max-batch-size 1`` and ``mlx_lm.server``, all on the same model folder) and
every client count (1, 2, 4, 8) a fresh server is started, warmed up with one
request carrying the shared system prompt (not measured), then N clients run
at once. Each client is an agent session: the shared system prompt, then
``--turns`` turns, each a new user message (a seeded "tool output") answered
by a streamed greedy reply that stays in the conversation.

Reported per cell: aggregate decode throughput (completion tokens of all
clients / wall time from the first request to the last reply), TTFT p50/p95
(request sent to the first streamed text), and computed prompt tokens
(prompt tokens minus the ``cached_tokens`` each server reports).
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
import threading
import time
import urllib.request
from pathlib import Path

from . import common as C

SERVERS = ("tiercache batched", "tiercache --max-batch-size 1", "mlx_lm.server")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(kind: str, model: Path, port: int, store: Path) -> list[str]:
    if kind == "mlx_lm.server":
        return [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)]
    cmd = [sys.executable, "-m", "tiercache.server.cli", "--model", str(model), "--port",
           str(port), "--disk-dir", str(store), "--log-level", "WARNING"]
    if kind.endswith("--max-batch-size 1"):
        cmd += ["--max-batch-size", "1"]
    return cmd


class Server:
    """One server process on a free port, output to ``log``."""

    def __init__(self, kind: str, model: Path, work: Path):
        self.kind = kind
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        store = work / f"store-{self.port}"
        self.log = open(work / f"{kind.replace(' ', '_')}-{self.port}.log", "ab")
        self.proc = subprocess.Popen(_command(kind, model, self.port, store), cwd=str(ROOT),
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env=os.environ.copy())
        route = "/v1/models" if kind == "mlx_lm.server" else "/health"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + route, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{kind} did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """Send one streaming chat request; return its text, usage and timings."""
    import httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            if data.get("usage"):
                usage = data["usage"]
    end = time.perf_counter()
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"text": "".join(text), "ttft": (first or end) - t0, "seconds": end - t0,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": int(usage.get("completion_tokens") or 0)}


class Sessions:
    """Seeded agent sessions over one shared system prompt."""

    def __init__(self, tokenizer, system_tokens: int, tool_tokens: int, seed: int):
        import numpy as np

        self.tok = tokenizer
        self.rng_seed = seed
        self.tool_tokens = tool_tokens
        self.system = self._text(np.random.default_rng(seed), system_tokens)

    def _text(self, rng, n: int) -> str:
        ids = [int(t) for t in rng.integers(3, self.tok.vocab_size, size=n)]
        return self.tok.decode(ids).replace("<|im_end|>", "").replace("<|im_start|>", "")

    def tool_output(self, session: int, turn: int) -> str:
        """The user message of one turn of one session (seeded)."""
        import numpy as np

        rng = np.random.default_rng([self.rng_seed, session, turn])
        return "Tool output:\n" + self._text(rng, self.tool_tokens)


def run_cell(srv: Server, sessions: Sessions, clients: int, turns: int,
             max_tokens: int) -> dict:
    """Run ``clients`` sessions at once against ``srv``; return the cell's numbers."""
    stream_chat(srv.url, [{"role": "system", "content": sessions.system},
                          {"role": "user", "content": "warm-up"}], max_tokens)
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def session(i: int) -> None:
        messages = [{"role": "system", "content": sessions.system}]
        try:
            for t in range(turns):
                messages.append({"role": "user", "content": sessions.tool_output(i, t)})
                r = stream_chat(srv.url, messages, max_tokens)
                messages.append({"role": "assistant", "content": r["text"]})
                with lock:
                    results.append({"session": i, "turn": t, **r})
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    ttfts = [r["ttft"] for r in results]
    completion = sum(r["completion_tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_seconds": wall,
        "completion_tokens": completion,
        "decode_tokens_per_s": completion / wall if wall > 0 else 0.0,
        "ttft_p50": C.pct(ttfts, 0.50),
        "ttft_p95": C.pct(ttfts, 0.95),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
        "computed_prompt_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in results),
        "loadavg_end": C.loadavg(),
        "rows": [{k: v for k, v in r.items() if k != "text"} for r in results],
    }


def run(args) -> dict:
    """Run every server x client-count cell."""
    from transformers import AutoTokenizer

    info = C.machine_info()
    path = C.model_path(args.preset, args.model_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    sessions = Sessions(tok, args.system_tokens, args.tool_tokens, args.seed)
    work = Path(tempfile.mkdtemp(prefix="tiercache-batch-bench-"))
    cells: dict[str, list] = {k: [] for k in args.servers}
    try:
        for clients in args.clients:
            for kind in args.servers:
                srv = Server(kind, path, work)
                try:
                    cell = run_cell(srv, sessions, clients, args.turns, args.max_tokens)
                finally:
                    srv.stop()
                cells[kind].append(cell)
                print(f"  {kind:30s} clients={clients} {cell['decode_tokens_per_s']:7.1f} tok/s "
                      f"TTFT p50 {cell['ttft_p50']:.3f}s p95 {cell['ttft_p95']:.3f}s "
                      f"computed prompt {cell['computed_prompt_tokens']} "
                      f"load {cell['loadavg_end']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "batch_bench", "command": C.command_line(), "machine": info,
            "model": args.preset, "model_shape": C.model_shape(path),
            "settings": {"turns": args.turns, "max_tokens": args.max_tokens,
                         "system_tokens": args.system_tokens, "tool_tokens": args.tool_tokens,
                         "seed": args.seed},
            "servers": cells}


def report(res: dict, out: Path) -> None:
    """Write ``batch_bench.{json,md,png}``."""
    rows = []
    for kind, cells in res["servers"].items():
        for c in cells:
            rows.append([kind, c["clients"], c["requests"], c["completion_tokens"],
                         c["wall_seconds"], c["decode_tokens_per_s"], c["ttft_p50"],
                         c["ttft_p95"], c["prompt_tokens"], c["computed_prompt_tokens"],
                         c["loadavg_end"]])
    s = res["settings"]
    md = (f"{s['turns']} turns per session; shared system prompt of ~{s['system_tokens']} "
          f"tokens, ~{s['tool_tokens']}-token tool outputs, replies of at most "
          f"{s['max_tokens']} tokens (greedy, streamed). Fresh server per cell.\n\n")
    md += C.md_table(["server", "clients", "requests", "completion tokens", "wall s",
                      "decode tok/s (aggregate)", "TTFT p50 s", "TTFT p95 s", "prompt tokens",
                      "computed prompt tokens", "load at end"], rows)
    C.write_results(out, "batch_bench", res, md)
    p = C.plt()
    if p is None:
        return
    fig, axes = p.subplots(1, 3, figsize=(13, 4))
    for kind, cells in res["servers"].items():
        x = [c["clients"] for c in cells]
        axes[0].plot(x, [c["decode_tokens_per_s"] for c in cells], marker="o", label=kind)
        axes[1].plot(x, [c["ttft_p50"] for c in cells], marker="o", label=kind)
        axes[2].plot(x, [c["computed_prompt_tokens"] for c in cells], marker="o", label=kind)
    for ax, title in zip(axes, ("aggregate decode tokens/s", "TTFT p50 (s)",
                                "computed prompt tokens")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Concurrent agent sessions, {res['model']} model (float32), same machine")
    fig.tight_layout()
    fig.savefig(Path(out) / "batch_bench.png", dpi=110)


def main(argv=None) -> int:
    """Parse flags, run the benchmark and write its report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tools/bench/results")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--tool-tokens", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 and 2 clients, 2 turns")
    args = ap.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    args.servers = [s.strip() for s in args.servers.split(",")]
    if args.quick:
        args.clients, args.turns, args.system_tokens = [1, 2], 2, 300
    report(run(args), Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The peer over HTTP: mlx_lm.server vs tiercache-server on the same model and trace.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.http_peer --out bench-results [--quick] [--preset demo]

Each server is started on the same model folder with the same memory budget
(``--prompt-cache-bytes``), fed the seeded agentic trace (tools/bench/trace.py)
as chat conversations (system prompt, then per turn a user message with the tool
output and, from the next turn on, the trace's assistant reply), stopped with
SIGTERM halfway and started again. TTFT per turn = wall time of a non-streaming
``/v1/chat/completions`` request with ``max_tokens=1`` (prefill + one token +
HTTP). tiercache-server also gets ``--disk-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..server_process import free_port
from . import common as C
from . import trace as T


def _post(url: str, body: dict, timeout: float = 3600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # say why (e.g. context_length_exceeded)
        raise RuntimeError(f"HTTP {e.code} from {url}: {e.read()[:500]!r}") from None


def _wait_ready(port: int, proc, route: str, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError("server did not become ready")


class Server:
    def __init__(self, kind: str, model: Path, budget: int, store: Path, log: Path, block_size: int = 256):
        self.kind, self.model, self.budget, self.store, self.log = kind, model, budget, store, log
        self.block_size = block_size
        self.proc = None
        self.port = None

    def start(self) -> float:
        self.port = free_port()
        if self.kind == "mlx_lm.server":
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(self.model), "--port", str(self.port),
                   "--prompt-cache-bytes", str(self.budget)]
        else:
            cmd = [sys.executable, "-m", "tiercache.server.cli", "--model", str(self.model), "--port", str(self.port),
                   "--prompt-cache-bytes", str(self.budget), "--disk-dir", str(self.store),
                   "--block-size", str(self.block_size)]
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     cwd=str(Path(__file__).resolve().parents[2]), env=os.environ.copy())
        # tiercache-server answers /health 503 until its model is loaded
        _wait_ready(self.port, self.proc, "/v1/models" if self.kind == "mlx_lm.server" else "/health")
        return time.time() - t0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def chat(self, messages) -> tuple[float, dict]:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0.0}
        t0 = time.perf_counter()
        out = _post(f"http://127.0.0.1:{self.port}/v1/chat/completions", body)
        return time.perf_counter() - t0, out



def _drive(srv, turns, system, text, kind):
    """Sends the trace to one server (restarted halfway); returns (rows, start times)."""
    rows, starts = [], [srv.start()]
    convo: dict[int, list] = {}
    for t in turns:
        if t.index == len(turns) // 2:
            srv.stop()
            starts.append(srv.start())
        msgs = convo.setdefault(t.session, [{"role": "system", "content": system}])
        msgs.append({"role": "user", "content": text(t.prompt[-t.new_tokens:])})
        dt, resp = srv.chat(msgs)
        usage = resp.get("usage", {})
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        rows.append({"index": t.index, "session": t.session, "turn": t.turn, "ttft": dt,
                     "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached})
        print(f"  {kind:16s} #{t.index:2d} s{t.session} ttft {dt:.3f}s prompt {usage.get('prompt_tokens')} "
              f"cached {cached}", flush=True)
        msgs.append({"role": "assistant", "content": text(t.generated)})
    return rows, starts


def run(args) -> dict:
    info = C.machine_info()
    path = C.model_path(args.preset, args.model_dir)
    shape = C.model_shape(path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    spec = T.QUICK if args.quick else T.TraceSpec()
    spec = T.TraceSpec(**{**T.asdict(spec), "seed": args.seed})
    if args.sessions:
        spec.sessions = args.sessions
    if args.turns:
        spec.turns = args.turns
    turns = T.generate(spec)
    sys_len = len(turns[0].prompt) - turns[0].new_tokens
    max_snap = max(len(t.prompt) + len(t.generated) for t in turns)
    budget = int(args.budget_sessions * ((max_snap + 255) // 256 + 1) * 256 * shape["kv_bytes_per_token"])

    def text(ids):
        return tok.decode(ids).replace("<|im_end|>", "").replace("<|im_start|>", "")

    system = text(turns[0].prompt[:sys_len])
    convo: dict[int, list] = {}
    work = Path(tempfile.mkdtemp(prefix="tiercache-http-"))
    out = {}
    try:
        for kind in args.servers:
            srv = Server(kind, path, budget, work / f"store-{kind}", work / f"{kind}.log", args.block_size)
            try:
                rows, starts = _drive(srv, turns, system, text, kind)
            finally:
                srv.stop()  # never leave a server behind, also on errors
            half = len(turns) // 2
            ttfts = [r["ttft"] for r in rows]
            post = [r["ttft"] for r in rows[half:]]
            first_after = {}
            for r in rows[half:]:
                first_after.setdefault(r["session"], r["cached_tokens"])
            out[kind] = {"rows": rows, "cached_tokens": sum(r["cached_tokens"] or 0 for r in rows),
                         "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
                         "first_turn_after_restart_cached": first_after, "start_seconds": starts, "ttft_mean": C.mean(ttfts), "ttft_p95": C.pct(ttfts, 0.95),
                         "ttft_mean_after_restart": C.mean(post), "loadavg_end": C.loadavg()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "http_peer", "command": C.command_line(), "machine": info, "model": args.preset,
            "model_shape": shape, "trace_spec": T.asdict(spec), "trace": T.summary(turns), "budget_bytes": budget,
            "block_size": args.block_size, "servers": out}


def report(res: dict, out: Path) -> None:
    rows = [[k, v["prompt_tokens"], v["cached_tokens"], v["prompt_tokens"] - v["cached_tokens"],
             v["ttft_mean"], v["ttft_p95"], v["ttft_mean_after_restart"],
             " ".join(f"s{s}:{c}" for s, c in sorted(v["first_turn_after_restart_cached"].items())),
             [round(s, 1) for s in v["start_seconds"]], v["loadavg_end"]] for k, v in res["servers"].items()]
    md = (f"Memory budget {res['budget_bytes'] / 1e6:.1f} MB; restarted halfway; tiercache-server "
          f"block size {res.get('block_size')}.\n\n")
    md += C.md_table(["server", "prompt tokens", "cached (usage)", "prefilled", "TTFT mean s", "TTFT p95 s",
                      "TTFT mean after restart s", "cached at each session's first turn after restart",
                      "start s", "load end"], rows)
    C.write_results(out, "http_peer", res, md)
    p = C.plt()
    if p is None:
        return
    fig, ax = p.subplots(figsize=(9, 4.5))
    for k, v in res["servers"].items():
        ax.plot([r["index"] for r in v["rows"]], [r["ttft"] for r in v["rows"]], marker=".", label=k)
    n = len(next(iter(res["servers"].values()))["rows"])
    ax.axvline(n // 2 - 0.5, color="gray", ls="--", lw=0.8, label="restart")
    ax.set_yscale("log")
    ax.set_xlabel("turn (interleaved trace)")
    ax.set_ylabel("TTFT over HTTP (s, log)")
    ax.legend(fontsize=8)
    ax.set_title(f"mlx_lm.server vs tiercache-server, {res['model']}-shaped model")
    fig.tight_layout()
    fig.savefig(Path(out) / "http_peer.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--budget-sessions", type=float, default=2.0)
    ap.add_argument("--block-size", type=int, default=None,
                    help="tiercache-server disk block size (default 256; --quick 64: its turns add < 256 tokens)")
    ap.add_argument("--servers", nargs="+", default=["mlx_lm.server", "tiercache-server"])
    args = ap.parse_args(argv)
    if args.block_size is None:
        args.block_size = 64 if args.quick else 256
    res = run(args)
    report(res, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

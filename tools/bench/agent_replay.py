"""Replay a recorded Claude Code trace against ``tiercache-server``, restarting halfway.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.agent_replay --out tools/bench/results

Sends the trace's ``/v1/messages`` bodies (``tools/bench/traces/claude_code.json``,
recorded by ``claude_trace``) in order to a real server on the demo model (or
``--model``), streaming, with ``max_tokens`` capped; the server is stopped
(SIGTERM: the disk writer flushes) and started again on the same ``--disk-dir``
after ``--restart-after`` turns. Per turn it reports the prompt tokens, the
tokens the server computed (``input_tokens``), those it served from memory and
from disk (``usage.tiercache``), the *new* tokens of the turn (the prompt minus
its longest common prefix with the previous turn's prompt, both rendered
locally through the server's own translation and chat template) and the TTFT
seen by the client (request sent -> first content delta).

Target: every turn after the first computes only its new tokens, from memory
before the restart and from disk after it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from tiercache.tools.bench.claude_trace import load_trace
from tiercache.tools.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = ROOT / "tools/bench/traces/claude_code.json"


def trace_bodies(path: str | os.PathLike) -> list[dict]:
    """Return the ``/v1/messages`` request bodies of a trace, in order."""
    return [r["body"] for r in load_trace(path)["requests"]
            if r.get("path") == "/v1/messages" and isinstance(r.get("body"), dict)]


def rendered_tokens(model_path: str, bodies: list[dict]) -> list[list[int]]:
    """Render each body to prompt tokens exactly as the server does."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from tiercache.chat import render_chat
    from tiercache.server.anthropic.schemas import MessagesRequest
    from tiercache.server.anthropic.translate import translate

    tok = load_tokenizer(Path(model_path))
    out = []
    for body in bodies:
        t = translate(MessagesRequest.model_validate(body))
        tools = None if t.tool_choice == "none" else t.tools
        out.append(render_chat(tok, t.messages, tools, t.template_kwargs).tokens)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def send(base_url: str, body: dict, max_tokens: int, timeout: float = 3600) -> dict:
    """Stream one Messages request; return its final usage and the client TTFT."""
    body = dict(body, stream=True, max_tokens=min(int(body.get("max_tokens", 1)), max_tokens))
    t0 = time.perf_counter()
    ttft = None
    usage: dict = {}
    events = []
    with httpx.stream("POST", base_url + "/v1/messages?beta=true", json=body,
                      headers={"x-api-key": "any", "anthropic-version": "2023-06-01"},
                      timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')}")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                events.append(event)
            elif line.startswith("data: ") and event in ("content_block_delta", "message_delta"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if event == "message_delta":
                    usage = json.loads(line[6:])["usage"]
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"stream error: {line[6:]}")
    return {"usage": usage, "ttft_s": ttft, "events": events}


def replay(model_path: str | None, trace: str | os.PathLike, turns: int | None,
           restart_after: int | None, disk_dir: str, log_path: Path,
           max_tokens: int = 16, extra_args: list[str] | None = None) -> list[dict]:
    """Replay ``turns`` turns of ``trace``; return one row per turn.

    Args:
        model_path: Model folder (None: the server's demo model).
        trace: The trace file.
        turns: How many turns (None: all).
        restart_after: Restart the server after this many turns (None: never).
        disk_dir: The server's ``--disk-dir``.
        log_path: Where the servers' output goes.
        max_tokens: Cap on each turn's ``max_tokens``.
        extra_args: More server flags.

    Returns:
        Rows with ``turn``, ``server`` (1 or 2), ``prompt_tokens``, ``new_tokens``,
        ``computed_tokens``, ``memory_tokens``, ``disk_tokens``, ``ttft_s``.
    """
    from tiercache.demo_model import default_demo_model_path

    bodies = trace_bodies(trace)[:turns]
    path = model_path or str(default_demo_model_path())
    prompts = rendered_tokens(path, bodies)
    args = ["--model", path, "--disk-dir", disk_dir, *(extra_args or [])]
    model_id = path
    rows: list[dict] = []
    srv, generation = None, 0
    try:
        for i, body in enumerate(bodies):
            if srv is None or (restart_after is not None and i == restart_after):
                if srv is not None:
                    if srv.stop() != 0:
                        raise RuntimeError("the server did not shut down cleanly")
                srv = ServerProcess(args, log_path)
                generation += 1
                if not srv.wait_healthy(300):
                    raise RuntimeError(f"server did not start; see {log_path}")
            result = send(srv.url, dict(body, model=model_id), max_tokens)
            u = result["usage"]
            split = u.get("tiercache") or {}
            new = len(prompts[i]) - (common_prefix(prompts[i - 1], prompts[i]) if i else 0)
            rows.append({
                "turn": i + 1, "server": generation,
                "prompt_tokens": u["input_tokens"] + u["cache_read_input_tokens"],
                "rendered_tokens": len(prompts[i]), "new_tokens": new,
                "computed_tokens": u["input_tokens"],
                "cached_tokens": u["cache_read_input_tokens"],
                "memory_tokens": split.get("memory_tokens", 0),
                "disk_tokens": split.get("disk_tokens", 0),
                "ttft_s": result["ttft_s"], "events": result["events"],
            })
    finally:
        if srv is not None:
            srv.stop()
    return rows


def table(rows: list[dict]) -> str:
    """Return the rows as a Markdown table."""
    lines = ["| turn | server | prompt | new | computed | from memory | from disk | TTFT |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ttft = f"{r['ttft_s']:.2f} s" if r["ttft_s"] is not None else "-"
        lines.append(f"| {r['turn']} | {r['server']} | {r['prompt_tokens']:,} | "
                     f"{r['new_tokens']:,} | {r['computed_tokens']:,} | "
                     f"{r['memory_tokens']:,} | {r['disk_tokens']:,} | {ttft} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the replay and write ``OUT/agent_replay.{json,md}``."""
    from tiercache.tools.bench import common as C

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tools/bench/results"))
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--model", default=None, help="model folder (default: the demo model)")
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--restart-after", type=int, default=None,
                    help="restart after this many turns (default: half the trace)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    n = len(trace_bodies(args.trace)[:args.turns])
    restart = args.restart_after if args.restart_after is not None else max(1, n // 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agent-replay-") as tmp:
        rows = replay(args.model, args.trace, args.turns, restart, str(Path(tmp) / "disk"),
                      Path(tmp) / "server.log", args.max_tokens)
        log = (Path(tmp) / "server.log").read_text(errors="replace")
    env = {**C.machine_info(), "loadavg_end": C.loadavg()}
    result = {"trace": str(args.trace), "restart_after": restart, "env": env,
              "rows": [{k: v for k, v in r.items() if k != "events"} for r in rows],
              "server_log_tail": log.splitlines()[-40:]}
    (out / "agent_replay.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# Claude Code trace replay ({n} turns, restart after turn {restart})\n\n"
          + table(rows) + "\n")
    (out / "agent_replay.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Record Claude Code's real request bodies with a scripted stand-in for the API.

    python -m tiercache.tools.bench.claude_trace --out tools/bench/traces/claude_code.json

Starts a small HTTP server that answers ``POST /v1/messages`` like the
Anthropic API (streaming or not) with scripted replies: while the agent's
conversation holds fewer tool results than the script has tool calls, the
reply is the next scripted ``tool_use`` (Bash or Read on files of a scratch
folder); then a closing text. Requests without tools (Claude Code's small side
requests, e.g. titles) get a short text. Every request is logged, then Claude
Code runs ``claude -p PROMPT --allowedTools Bash,Read`` against it, so the
agent goes through several real turns and the trace holds exactly what it
sent. ``tools/bench/agent_replay.py`` replays the trace against
``tiercache-server``.

The trace stores each distinct ``system`` and ``tools`` value once
(``{"$shared": i}`` points into ``shared``); :func:`load_trace` puts them back.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tiercache.server.anthropic.responses import StreamBuilder, error_body, message_id

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT = ("Look at the files in this folder, run calc.py, and tell me in one "
                  "sentence what the project is.")
FILES = {
    "notes.md": "# Scratch project\n\nA tiny calculator used to record an agent trace.\n"
                "It adds the numbers listed in numbers.txt.\n",
    "numbers.txt": "3\n5\n8\n13\n",
    "calc.py": "from pathlib import Path\n\n"
               "nums = [int(x) for x in Path('numbers.txt').read_text().split()]\n"
               "print('total', sum(nums))\n",
}


def script(workdir: Path) -> list[tuple[str, dict]]:
    """Return the scripted tool calls (name, input) for a scratch folder."""
    return [
        ("Bash", {"command": "ls -la", "description": "List the files"}),
        ("Read", {"file_path": str(workdir / "notes.md")}),
        ("Read", {"file_path": str(workdir / "calc.py")}),
        ("Bash", {"command": "python3 calc.py", "description": "Run the calculator"}),
    ]


DEFAULT_TOOLS = "Bash,Read"
FINAL_TEXT = "It is a tiny calculator that sums numbers.txt (total 29)."
SIDE_TEXT = "Scratch calculator"


def find_claude() -> str | None:
    """Return the ``claude`` executable: ``.ci/node_modules``, PATH or /work/npm-claude."""
    for cand in (ROOT / ".ci" / "node_modules" / ".bin" / "claude",
                 Path("/work/npm-claude/node_modules/.bin/claude")):
        if cand.exists():
            return str(cand)
    return shutil.which("claude")


def claude_env(base_url: str, home: Path) -> dict:
    """Return the environment that points Claude Code at ``base_url``, quietly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update({
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-local-any",
        "HOME": str(home),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CI": "1",
    })
    return env


def _tool_results(body: dict) -> int:
    n = 0
    for m in body.get("messages", []):
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            n += sum(1 for b in m["content"] if b.get("type") == "tool_result")
    return n


def scripted_reply(body: dict, steps: list[tuple[str, dict]]) -> list[dict]:
    """Return the content blocks the stand-in answers ``body`` with."""
    if not body.get("tools"):
        return [{"type": "text", "text": SIDE_TEXT}]
    done = _tool_results(body)
    if done < len(steps):
        name, args = steps[done]
        return [{"type": "text", "text": f"Step {done + 1}."},
                {"type": "tool_use", "id": f"toolu_script{done:02d}", "name": name,
                 "input": args}]
    return [{"type": "text", "text": FINAL_TEXT}]


def reply_events(body: dict, content: list[dict]) -> list[str]:
    """Return the SSE stream of a scripted reply (usage counts are nominal)."""
    b = StreamBuilder(message_id(), body.get("model", "stand-in"))
    usage = {"prompt_tokens": len(json.dumps(body)) // 4, "completion_tokens": 0}
    out = b.start(usage)
    for block in content:
        if block["type"] == "text":
            out += b.text(block["text"])
        else:
            out += b.tool_use(block["id"], block["name"], json.dumps(block["input"]))
    usage["completion_tokens"] = 20
    finish = "tool_calls" if content[-1]["type"] == "tool_use" else "stop"
    return out + b.finish(finish, None, usage)


class StandIn:
    """The scripted Anthropic stand-in; ``requests`` logs every call.

    Args:
        steps: The scripted tool calls.
    """

    def __init__(self, steps: list[tuple[str, dict]]):
        self.steps = steps
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send_json(self, status: int, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                with stand_in.lock:
                    stand_in.requests.append({"method": "GET", "path": self.path})
                self._send_json(404, error_body(404, f"no such endpoint: {self.path}"))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                path, _, query = self.path.partition("?")
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_unparsed": raw.decode(errors="replace")}
                with stand_in.lock:
                    stand_in.requests.append({
                        "method": "POST", "path": path, "query": query,
                        "anthropic_beta": self.headers.get("anthropic-beta"),
                        "time": time.time(), "body": body})
                if path == "/v1/messages/count_tokens":
                    self._send_json(200, {"input_tokens": len(raw) // 4})
                elif path == "/v1/messages":
                    content = scripted_reply(body, stand_in.steps)
                    if body.get("stream"):
                        self.send_response(200)
                        self.send_header("content-type", "text/event-stream")
                        self.end_headers()
                        for ev in reply_events(body, content):
                            self.wfile.write(ev.encode())
                        self.wfile.flush()
                    else:
                        self._send_json(200, {
                            "id": message_id(), "type": "message", "role": "assistant",
                            "model": body.get("model"), "content": content,
                            "stop_reason": "tool_use" if content[-1]["type"] == "tool_use"
                            else "end_turn", "stop_sequence": None,
                            "usage": {"input_tokens": 1, "output_tokens": 1}})
                else:
                    self._send_json(404, error_body(404, f"no such endpoint: {path}"))

        return Handler


def shared_form(requests: list[dict]) -> dict:
    """Store each distinct ``system`` / ``tools`` value once (see the module doc)."""
    shared: list = []
    out = []
    for r in requests:
        r = copy.deepcopy(r)
        body = r.get("body")
        if isinstance(body, dict):
            for key in ("system", "tools"):
                if isinstance(body.get(key), list):
                    if body[key] not in shared:
                        shared.append(body[key])
                    body[key] = {"$shared": shared.index(body[key])}
        out.append(r)
    return {"shared": shared, "requests": out}


def load_trace(path: str | os.PathLike) -> dict:
    """Load a trace written by :func:`main` with ``system``/``tools`` put back."""
    data = json.loads(Path(path).read_text())
    for r in data["requests"]:
        body = r.get("body")
        if isinstance(body, dict):
            for key in ("system", "tools"):
                ref = body.get(key)
                if isinstance(ref, dict) and "$shared" in ref:
                    body[key] = copy.deepcopy(data["shared"][ref["$shared"]])
    return data


def record(claude: str, prompt: str, model: str, timeout: float,
           tools: str | None = DEFAULT_TOOLS) -> tuple[dict, str]:
    """Run Claude Code against the stand-in; return ``(trace, claude's output)``.

    Args:
        claude: The ``claude`` executable.
        prompt: The task given with ``-p``.
        model: The ``--model`` name sent.
        timeout: Seconds Claude Code may run.
        tools: Claude Code's ``--tools`` (the tool definitions it sends);
            None sends its whole default set (about 38K demo-model tokens,
            more than the demo model's context).
    """
    tmp = Path(tempfile.mkdtemp(prefix="claude-trace-"))
    try:
        home, work = tmp / "home", tmp / "project"
        home.mkdir()
        work.mkdir()
        for name, text in FILES.items():
            (work / name).write_text(text)
        with StandIn(script(work)) as stand_in:
            proc = subprocess.run(
                [claude, "-p", prompt, "--model", model, "--allowedTools", "Bash,Read",
                 *(["--tools", tools] if tools else [])],
                cwd=work, env=claude_env(stand_in.url, home), capture_output=True,
                text=True, timeout=timeout)
            requests = list(stand_in.requests)
        version = subprocess.run([claude, "--version"], capture_output=True, text=True,
                                 env=claude_env("http://127.0.0.1:9", home)).stdout.strip()
        # The scratch folder's random name would otherwise differ on every record.
        text = json.dumps(requests).replace(str(work), "/tmp/claude-trace/project")
        text = text.replace(str(home), "/tmp/claude-trace/home")
        trace = {"claude_code_version": version, "model": model, "prompt": prompt,
                 "tools_flag": tools,
                 "exit_code": proc.returncode, **shared_form(json.loads(text))}
        return trace, proc.stdout + proc.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Record a trace (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tools/bench/traces/claude_code.json"))
    ap.add_argument("--claude", default=None, help="claude executable (default: found)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--model", default="tiercache-demo")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--tools", default=DEFAULT_TOOLS,
                    help="Claude Code --tools ('default': its whole tool set)")
    args = ap.parse_args(argv)
    claude = args.claude or find_claude()
    if claude is None:
        ap.error("Claude Code not found: npm install --prefix .ci @anthropic-ai/claude-code")
    tools = None if args.tools == "default" else args.tools
    trace, output = record(claude, args.prompt, args.model, args.timeout, tools)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(trace, indent=1, ensure_ascii=False) + "\n")
    n = sum(1 for r in trace["requests"] if r.get("path") == "/v1/messages")
    print(f"claude exit {trace['exit_code']}; {len(trace['requests'])} requests "
          f"({n} to /v1/messages); wrote {args.out} "
          f"({Path(args.out).stat().st_size // 1024} KB)")
    print(output[-2000:])
    return 0 if trace["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Hostile-input fuzzing of the completion endpoints with hypothesis.

    python -m tiercache.tools.fuzz_test --model PATH --examples 500
    python -m tiercache.tools.fuzz_test --url http://127.0.0.1:8080 --seconds 30

Generates request bodies for ``/v1/chat/completions`` and ``/v1/completions``:
schema-shaped bodies whose fields take plausible *and* hostile values (wrong
types, huge/negative numbers, NaN, unicode, nesting, out-of-vocabulary token
ids, over-long prompts), arbitrary JSON documents, and raw non-JSON bytes.
Fails on any 5xx answer, a non-JSON or non-envelope error body, a stream that
carries an error event or misses ``[DONE]``, or a server that stops answering
``/health``. Prints a JSON summary (cases run, statuses seen).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiercache.tools.server_process import ServerProcess


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
WEIRD_NUM = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1e308, 0.5, -0.0])
TEXT = st.text(max_size=60) | st.sampled_from(["", "\x00", "\ud7ff" * 3, "<|im_end|>", "a" * 3000])


def _maybe(strategy):
    """A field's plausible values, or anything at all."""
    return st.one_of(strategy, strategy, strategy, JSON, WEIRD_NUM)


MESSAGE = st.fixed_dictionaries(
    {"role": _maybe(st.sampled_from(["system", "user", "assistant", "developer", "tool"]))},
    optional={
        "content": _maybe(TEXT | st.lists(st.fixed_dictionaries(
            {"type": _maybe(st.sampled_from(["text", "image_url"]))},
            optional={"text": _maybe(TEXT)}), max_size=3)),
        "name": _maybe(TEXT),
    },
)
COMMON = {
    "model": _maybe(st.sampled_from(["default_model", "", "nope"])),
    "max_tokens": _maybe(st.integers(0, 6)),
    "max_completion_tokens": _maybe(st.integers(0, 6)),
    "temperature": _maybe(st.floats(0, 2)),
    "top_p": _maybe(st.floats(0, 1)),
    "seed": _maybe(st.integers(-5, 2**32)),
    "stop": _maybe(TEXT | st.lists(TEXT, max_size=10)),
    "stream": _maybe(st.booleans()),
    "stream_options": _maybe(st.fixed_dictionaries({}, optional={"include_usage": _maybe(st.booleans())})),
    "cache_salt": _maybe(TEXT),
    "n": _maybe(st.integers(0, 3)),
    "logprobs": _maybe(st.booleans()),
    "user": _maybe(TEXT),
}
CHAT = st.fixed_dictionaries({"messages": _maybe(st.lists(MESSAGE, max_size=4))}, optional=COMMON)
PROMPT = (TEXT | st.lists(st.integers(-3, 600), max_size=40)
          | st.integers(0, 511).map(lambda t: [t] * 9000)  # longer than the context
          | st.lists(TEXT, max_size=3) | st.lists(st.lists(st.integers(0, 600), max_size=5), max_size=3))
COMPLETION = st.fixed_dictionaries({"prompt": _maybe(PROMPT)},
                                   optional={**COMMON, "echo": _maybe(st.booleans())})
RAW = st.binary(max_size=200) | st.sampled_from([b"", b"{", b"[]", b"null", b'{"messages": [}',
                                                 b"\xff\xfe{}", b'{"prompt": "x"' + b" " * 100])
CASE = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), st.just("json"), CHAT),
    st.tuples(st.just("/v1/completions"), st.just("json"), COMPLETION),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.just("json"), JSON),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.just("raw"), RAW),
)


class Failure(AssertionError):
    pass


def check_response(path: str, kind: str, body, url: str, client: httpx.Client, seen: Counter) -> None:
    if kind == "json":
        try:
            content = json.dumps(body, allow_nan=False).encode()
        except ValueError:
            content = json.dumps(body).encode()  # NaN/Infinity: invalid JSON on purpose
    else:
        content = body
    headers = {"content-type": "application/json"}
    with client.stream("POST", url + path, content=content, headers=headers) as r:
        status = r.status_code
        seen[status] += 1
        ctype = r.headers.get("content-type", "")
        if status >= 500:
            raise Failure(f"{status} for {path} {content[:300]!r}: {r.read()[:500]!r}")
        if status == 200 and ctype.startswith("text/event-stream"):
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            if not lines or lines[-1] != "data: [DONE]":
                raise Failure(f"stream without [DONE] for {content[:300]!r}")
            for ln in lines[:-1]:
                ev = json.loads(ln[6:])
                if "error" in ev:
                    raise Failure(f"stream error {ev['error']} for {content[:300]!r}")
            return
        raw = r.read()
    try:
        data = json.loads(raw)
    except ValueError:
        raise Failure(f"non-JSON {status} body for {content[:300]!r}: {raw[:300]!r}") from None
    if status != 200:
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err):
            raise Failure(f"{status} without the error envelope: {raw[:300]!r}")


def run_fuzz(url: str, examples: int, seconds: float, seed: int) -> dict:
    seen: Counter = Counter()
    failures: list[str] = []
    counts = {"cases": 0}
    deadline = time.monotonic() + seconds if seconds else None
    client = httpx.Client(timeout=180)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=True)
    @given(CASE)
    def case(c):
        if deadline is not None and time.monotonic() > deadline:
            return
        counts["cases"] += 1
        path, kind, body = c
        try:
            check_response(path, kind, body, url, client, seen)
        except Failure as e:
            if len(failures) < 50:
                failures.append(str(e)[:800])
            raise

    t0 = time.monotonic()
    warnings.simplefilter("ignore")  # hypothesis repr warnings for huge prompts
    try:
        case()
    except Exception as e:  # hypothesis re-raises the (shrunk) failure
        if not failures:
            failures.append(f"{type(e).__name__}: {e}"[:800])
    healthy = False
    try:
        healthy = client.get(url + "/health").status_code == 200
    finally:
        client.close()
    return {
        "cases_run": counts["cases"],
        "seconds": round(time.monotonic() - t0, 1),
        "statuses": {str(k): v for k, v in sorted(seen.items())},
        "server_errors_5xx": sum(v for k, v in seen.items() if k >= 500),
        "failures": failures,
        "healthy_after": healthy,
        "ok": not failures and healthy,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="start a server on this model folder")
    ap.add_argument("--url", help="fuzz an already running server instead")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = no limit)")
    ap.add_argument("--seed", type=int, default=0, help="0 = deterministic")
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if not args.model and not args.url:
        ap.error("give --model or --url")
    if not 1 <= args.examples <= 100000:
        ap.error("--examples must be 1..100000")
    srv = None
    url = args.url
    if url is None:
        flags = ["--model", args.model, "--max-tokens", "4", "--log-level", "WARNING"]
        if args.disk_dir:
            flags += ["--disk-dir", args.disk_dir, "--block-size", "16"]
        srv = ServerProcess(flags)
        if not srv.wait_healthy(120):
            srv.stop()
            print("server did not start", file=sys.stderr)
            return 2
        url = srv.url
    try:
        summary = run_fuzz(url, args.examples, args.seconds, args.seed)
    finally:
        if srv is not None:
            srv.stop()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

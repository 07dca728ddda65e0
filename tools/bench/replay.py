"""Agentic replay: the seeded trace of tools/bench/trace.py under four caches, side by side.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.replay --out bench-results [--quick] [--preset demo]

Variants (same model, same trace, same memory budget):

* ``none``: no prompt cache, every turn prefills its whole prompt;
* ``lru``: mlx-lm's ``LRUPromptCache(max_bytes=budget)``, with
  ``trim_to(n_bytes=budget)`` after every insert (what mlx_lm.server's batched
  path does with ``--prompt-cache-bytes``); memory only;
* ``tiercache``: ``TieredPromptCache(max_bytes=budget, disk_dir=...)``, write-through;
* ``tiercache_restart``: the same, closed and reopened on the same folder halfway
  through the trace (a server restart).

Per turn: TTFT = fetch + prefill of the remainder + first token (common.ttft);
then the turn's "generated" tokens are run through the model in one forward
pass (teacher forcing: the trace fixes them so every variant sees the same
tokens; that pass is not counted as prefill or TTFT) and the snapshot of
``prompt + generated`` is inserted, as mlx_lm.server inserts after a reply.

The memory budget holds two sessions' largest snapshots (``--budget-sessions``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from . import common as C
from . import trace as T

VARIANTS = ("none", "lru", "tiercache", "tiercache_restart")


def _nbytes_snapshot(n_tokens: int, kv_per_token: int, step: int = 256) -> int:
    # KVCache grows its buffers in steps of 256 tokens; nbytes counts the buffer
    return ((n_tokens + step - 1) // step) * step * kv_per_token


class Runner:
    def __init__(self, name, model, path, budget, store, block_size):
        self.name = name
        self.model = model
        self.path = path
        self.key = str(path)
        self.budget = budget
        self.store = store
        self.block_size = block_size
        self.cache = None
        self.restarts = []
        self._open()

    def _open(self):
        from mlx_lm.models.cache import LRUPromptCache

        from tiercache import TieredPromptCache

        if self.name == "lru":
            self.cache = LRUPromptCache(max_size=1 << 20, max_bytes=self.budget)
        elif self.name.startswith("tiercache"):
            self.cache = TieredPromptCache(
                max_size=1 << 20, max_bytes=self.budget, disk_dir=self.store, block_size=self.block_size
            )
            self.cache.register_model(self.key, self.path, self.model)

    def fetch(self, tokens):
        if self.cache is None:
            return None, tokens
        if self.name.startswith("tiercache"):
            self.last = self.cache.fetch(self.key, tokens)
            return self.last.prompt_cache, self.last.rest
        return self.cache.fetch_nearest_cache(self.key, tokens)

    def source(self, cached):
        if self.name.startswith("tiercache"):
            return self.last.source
        return "memory" if cached else "none"

    def insert(self, tokens, cache):
        if self.cache is None:
            return
        self.cache.insert_cache(self.key, tokens, cache, cache_type="assistant")
        if self.name == "lru":
            self.cache.trim_to(n_bytes=self.budget)

    def restart(self):
        t0 = time.perf_counter()
        ok = self.cache.close(flush_timeout=600)
        t1 = time.perf_counter()
        self._open()
        self.restarts.append({"close_seconds": t1 - t0, "open_seconds": time.perf_counter() - t1, "close_ok": ok})

    def close(self):
        if self.name.startswith("tiercache"):
            st = self.cache.stats()
            self.cache.close(flush_timeout=600)
            return st
        return None


def run_variant(name, model, path, turns, budget, store, block_size, sample_every=1):
    r = Runner(name, model, path, budget, store, block_size)
    rows = []
    half = len(turns) // 2
    after_restart: dict[int, dict] = {}
    snap_len: dict[int, int] = {}
    t_start = time.perf_counter()
    for turn in turns:
        if name == "tiercache_restart" and turn.index == half:
            r.restart()
        if name == "none" and turn.index % sample_every:
            # not timed (the prefill count is exact: the whole prompt)
            rows.append({"index": turn.index, "session": turn.session, "turn": turn.turn, "prompt": len(turn.prompt),
                         "cached": 0, "prefilled": len(turn.prompt), "ttft": None, "source": "none",
                         "session_history": snap_len.get(turn.session, 0)})
            snap_len[turn.session] = len(turn.prompt) + len(turn.generated)
            continue
        m = C.ttft(model, r.fetch, turn.prompt)
        src = r.source(m["cached"])
        cache = m["cache"]
        C.prefill(model, cache, turn.generated)
        r.insert(turn.prompt + turn.generated, cache)
        del cache, m["cache"]
        row = {
            "index": turn.index,
            "session": turn.session,
            "turn": turn.turn,
            "prompt": len(turn.prompt),
            "cached": m["cached"],
            "prefilled": m["prefilled"],
            "ttft": m["ttft"],
            "fetch": m["fetch"],
            "source": src,
            "session_history": snap_len.get(turn.session, 0),
        }
        rows.append(row)
        if name == "tiercache_restart" and turn.index >= half and turn.session not in after_restart:
            after_restart[turn.session] = row
        snap_len[turn.session] = len(turn.prompt) + len(turn.generated)
        print(f"  {name:18s} #{turn.index:2d} s{turn.session} t{turn.turn} prompt {len(turn.prompt):6d} "
              f"cached {m['cached']:6d} ({src:6s}) ttft {m['ttft']:.3f}s", flush=True)
    wall = time.perf_counter() - t_start
    stats = r.close()
    timed = [x["ttft"] for x in rows if x["ttft"] is not None]
    prompt_total = sum(x["prompt"] for x in rows)
    out = {
        "variant": name,
        "rows": rows,
        "prefill_tokens": sum(x["prefilled"] for x in rows),
        "prompt_tokens": prompt_total,
        "cached_tokens": sum(x["cached"] for x in rows),
        "token_hit_ratio": sum(x["cached"] for x in rows) / prompt_total,
        "request_hit_ratio": sum(1 for x in rows if x["cached"] > 0) / len(rows),
        "full_history_hits": sum(1 for x in rows if x["session_history"] and x["cached"] >= x["session_history"] - 1),
        "ttft_mean": C.mean(timed),
        "ttft_p95": C.pct(timed, 0.95),
        "ttft_timed_turns": len(timed),
        "wall_seconds": wall,
        "sources": {s: sum(1 for x in rows if x["source"] == s) for s in ("none", "memory", "disk")},
        "restarts": r.restarts,
        "stats": stats,
        "loadavg_end": C.loadavg(),
    }
    if name == "tiercache_restart":
        # the first turn of every session after the restart must be a disk hit that
        # covers the session's whole history (its last snapshot, written before the restart)
        checks = {
            s: {
                "index": row["index"],
                "source": row["source"],
                "cached": row["cached"],
                "history": row["session_history"],
                "ok": row["source"] == "disk" and row["cached"] >= row["session_history"] - 1,
            }
            for s, row in sorted(after_restart.items())
        }
        out["after_restart"] = checks
        out["after_restart_all_disk_hits"] = all(c["ok"] for c in checks.values())
    return out


def run(args) -> dict:
    info = C.machine_info()
    path = C.model_path(args.preset, args.model_dir)
    model, tok = C.load_model(path)
    shape = C.model_shape(path)
    print(C.machine_line(info))
    print("model:", C.shape_line(shape))
    spec = T.QUICK if args.quick else T.TraceSpec()
    spec = T.TraceSpec(**{**T.asdict(spec), "seed": args.seed})
    if args.sessions:
        spec.sessions = args.sessions
    if args.turns:
        spec.turns = args.turns
    turns = T.generate(spec)
    summ = T.summary(turns)
    print("trace:", summ)
    max_snap = max(len(t.prompt) + len(t.generated) for t in turns)
    budget = int(args.budget_sessions * _nbytes_snapshot(max_snap, shape["kv_bytes_per_token"]))
    print(f"memory budget: {budget / 1e6:.1f} MB ({args.budget_sessions} x largest snapshot of {max_snap} tokens)")
    C.ttft(model, lambda t: (None, t), list(range(3, 67)))  # warm-up
    work = Path(tempfile.mkdtemp(prefix="tiercache-replay-"))
    res = {}
    try:
        for v in args.variants:
            print(f"== {v} (load {C.loadavg()})", flush=True)
            store = work / v
            res[v] = run_variant(v, model, path, turns, budget, store, args.block_size,
                                 sample_every=args.none_sample_every)
            res[v]["loadavg_start"] = info["loadavg_start"]
            if args.out:  # partial results survive a later failure
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"replay.partial-{v}.json").write_text(json.dumps(res[v], default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lru = res.get("lru", {}).get("prefill_tokens")
    ratios = {}
    if lru:
        for v in res:
            ratios[v] = res[v]["prefill_tokens"] / lru
    return {
        "benchmark": "replay",
        "command": C.command_line(),
        "machine": info,
        "model": args.preset,
        "model_shape": shape,
        "trace_spec": T.asdict(spec),
        "trace": summ,
        "budget_bytes": budget,
        "budget_sessions": args.budget_sessions,
        "none_sample_every": args.none_sample_every,
        "variants": res,
        "prefill_vs_lru": ratios,
        "targets": {"prefill_vs_lru_max": 1 / 3, "after_restart_all_disk_hits": True},
    }


def report(res: dict, out: Path) -> None:
    rows = []
    for v, d in res["variants"].items():
        rows.append(
            [
                v,
                d["prefill_tokens"],
                f"{res['prefill_vs_lru'].get(v, float('nan')):.3f}" if res["prefill_vs_lru"] else "-",
                f"{d['token_hit_ratio']:.1%}",
                f"{d['request_hit_ratio']:.0%}",
                f"{d['full_history_hits']}",
                d["ttft_mean"],
                d["ttft_p95"],
                f"{d['sources']['memory']}/{d['sources']['disk']}/{d['sources']['none']}",
                d["wall_seconds"],
                d["loadavg_end"],
            ]
        )
    s = res["trace"]
    md = (
        f"Trace: {s['sessions']} sessions x {res['trace_spec']['turns']} turns, seed {res['trace_spec']['seed']}, "
        f"{s['prompt_tokens_total']} prompt tokens in total (largest prompt {s['max_prompt']}). "
        f"Memory budget {res['budget_bytes'] / 1e6:.1f} MB = {res['budget_sessions']} x the largest snapshot.\n\n"
    )
    md += C.md_table(
        [
            "variant",
            "prefill tokens",
            "vs LRU",
            "token hit ratio",
            "turns with a hit",
            "turns reusing whole history",
            "TTFT mean s",
            "TTFT p95 s",
            "mem/disk/miss",
            "wall s",
            "load end",
        ],
        rows,
    )
    if res["none_sample_every"] > 1 and "none" in res["variants"]:
        md += (f"\n\n`none`: prefill tokens exact (the whole prompt, every turn); TTFT timed on every "
               f"{res['none_sample_every']}th turn only ({res['variants']['none']['ttft_timed_turns']} turns).")
    r = res["variants"].get("tiercache_restart")
    if r:
        md += "\n\nAfter the restart, first turn of each session: " + "; ".join(
            f"session {s}: turn #{c['index']} {c['source']} hit, {c['cached']} cached of a {c['history']}-token history"
            for s, c in r["after_restart"].items()
        )
        md += f" -> all disk hits covering the history: **{r['after_restart_all_disk_hits']}**"
        md += f"\n\nRestart: {r['restarts']}"
    C.write_results(out, "replay", res, md)
    p = C.plt()
    if p is None:
        return
    fig, ax = p.subplots(figsize=(9, 4.5))
    for v, d in res["variants"].items():
        xs = [x["index"] for x in d["rows"] if x["ttft"] is not None]
        ys = [x["ttft"] for x in d["rows"] if x["ttft"] is not None]
        ax.plot(xs, ys, marker=".", label=f"{v} ({d['prefill_tokens']} prefill tokens)")
    n = len(next(iter(res["variants"].values()))["rows"])
    ax.axvline(n // 2 - 0.5, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("turn (interleaved trace)")
    ax.set_ylabel("TTFT (s, log)")
    ax.set_title(f"Agentic replay, {res['model']}-shaped model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "replay.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="3 sessions x 4 turns, 256-512-token system prompt")
    ap.add_argument("--preset", default="demo", help="model shape (demo: 4 layers, d=256; smollm2-135m is ~10x slower)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--budget-sessions", type=float, default=2.0)
    ap.add_argument("--block-size", type=int, default=None, help="disk block size (default 256, quick 64)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--none-sample-every", type=int, default=1,
                    help="time the no-cache variant on every Nth turn only (its prefill count stays exact)")
    args = ap.parse_args(argv)
    if args.block_size is None:
        args.block_size = 64 if args.quick else 256
    res = run(args)
    report(res, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write amplification of the disk tier on the seeded multi-turn agent trace.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.write_amp --out tools/bench/results [--quick]

The trace of tools/bench/trace.py is replayed through ``TieredPromptCache``
(write-through, as the server runs it): per turn, look up the prompt, prefill the
rest, run the turn's generated tokens (teacher forcing), insert the snapshot of
``prompt + generated``. After each turn the writer is flushed, so the bytes it
wrote (``stats()["disk"]["bytes_written"]``: block and checkpoint files, headers
included) are attributed to that turn.

A turn's *new tokens* are the tokens of its snapshot that no earlier snapshot
holds (its length minus the longest common prefix with any earlier snapshot);
their KV bytes are new tokens x KV bytes per token (K and V rows of every layer,
at the cache's dtype). Write amplification = bytes written / new tokens' KV bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import common as C
from . import trace as T


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def kv_bytes_per_token(cache: list) -> int:
    """K and V bytes one token adds to a (KVCache) prompt cache."""
    total = 0
    for layer in cache:
        k, v = layer.keys, layer.values
        total += (k.nbytes // k.shape[2]) + (v.nbytes // v.shape[2])
    return total


def run(model, path: Path, turns: list, block_size: int, store: Path) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    from tiercache import TieredPromptCache

    tc = TieredPromptCache(max_size=8, max_bytes=1 << 30, disk_dir=store, block_size=block_size)
    key = str(path)
    tc.register_model(key, path, model)
    seen: list[list[int]] = []
    rows = []
    per_token = None
    written_before = 0
    t0 = time.perf_counter()
    for turn in turns:
        cache, rest = tc.fetch_nearest_cache(key, turn.prompt)
        if cache is None:
            cache, rest = make_prompt_cache(model), list(turn.prompt)
        C.prefill(model, cache, rest)
        C.prefill(model, cache, turn.generated)
        snap = list(turn.prompt) + list(turn.generated)
        per_token = per_token or kv_bytes_per_token(cache)
        tc.insert_cache(key, snap, cache)
        tc.flush(600)
        st = tc.stats()["disk"]
        written = st["bytes_written"] - written_before
        written_before = st["bytes_written"]
        new = len(snap) - max((_common(snap, s) for s in seen), default=0)
        seen.append(snap)
        rows.append({
            "index": turn.index, "session": turn.session, "turn": turn.turn,
            "snapshot_tokens": len(snap), "new_tokens": new, "bytes_written": written,
            "new_kv_bytes": new * per_token,
            "ratio": round(written / (new * per_token), 4) if new else None,
        })
        print(f"turn {turn.index:3d} s{turn.session} t{turn.turn}: {len(snap):6d} tokens, "
              f"{new:5d} new, {written:10d} B written, ratio {rows[-1]['ratio']}", file=sys.stderr)
    st = tc.stats()
    tc.close()
    total_written = sum(r["bytes_written"] for r in rows)
    total_new = sum(r["new_kv_bytes"] for r in rows)
    return {
        "rows": rows,
        "kv_bytes_per_token": per_token,
        "block_size": block_size,
        "bytes_written_total": total_written,
        "new_tokens_total": sum(r["new_tokens"] for r in rows),
        "new_kv_bytes_total": total_new,
        "write_amplification": round(total_written / total_new, 4),
        "disk_bytes_stored": st["disk"]["bytes"],
        "disk_entries": st["disk"]["entries"],
        "records_written": st["disk"]["records_written"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(res: dict) -> str:
    lines = [
        f"KV bytes per token: {res['kv_bytes_per_token']}; block size {res['block_size']}; "
        f"{len(res['rows'])} turns in {res['seconds']} s.",
        "",
        "| | tokens | bytes |",
        "|---|---:|---:|",
        f"| new tokens' KV (whole trace) | {res['new_tokens_total']:,} | {res['new_kv_bytes_total']:,} |",
        f"| written to the disk tier | | {res['bytes_written_total']:,} |",
        f"| stored at the end | | {res['disk_bytes_stored']:,} |",
        "",
        f"**Write amplification: {res['write_amplification']}x** "
        f"({res['records_written']} records written, {res['disk_entries']} stored at the end).",
        "",
        "| turn | session | snapshot tokens | new tokens | bytes written | new KV bytes | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['index']} | {r['session']} | {r['snapshot_tokens']} | {r['new_tokens']} | "
                     f"{r['bytes_written']:,} | {r['new_kv_bytes']:,} | {r['ratio']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model-dir", default=None, help="folder holding the preset's model folder")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="tools/bench/results")
    args = ap.parse_args(argv)
    spec = T.QUICK if args.quick else T.TraceSpec()
    spec = T.TraceSpec(**{**asdict(spec), "seed": args.seed})
    turns = T.generate(spec)
    path = C.model_path(args.preset, args.model_dir)
    model, _ = C.load_model(path)
    tmp = Path(tempfile.mkdtemp(prefix="tiercache-wa-"))
    try:
        res = run(model, path, turns, args.block_size, tmp / "store")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update(machine=C.machine_info(), model_shape=C.model_shape(path), trace=asdict(spec),
               command="python -m tiercache.tools.bench.write_amp " + " ".join(argv or sys.argv[1:]))
    C.write_results(Path(args.out), "write_amp" + ("-quick" if args.quick else ""), res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

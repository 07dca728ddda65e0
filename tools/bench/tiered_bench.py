"""Benchmark of TieredPromptCache's caller-side costs (no model needed).

    python -m tiercache.tools.bench.tiered_bench --out DIR [--tokens 16000] [--layers 8] ...

Measures, on random-array ``KVCache`` snapshots with llama-like shapes:

1. **Memory-hit fetch** (``fetch_nearest_cache``: lookup + clone, or handover) of a
   ``--tokens`` snapshot vs a plain ``copy.deepcopy`` of it. Target: ratio <= 2.
2. **insert_cache on the caller's thread** beyond evaluating the arrays, with a
   slow disk (``DiskStore.save`` monkeypatched to sleep ``--slow-save`` seconds).
   Target: <= 1 ms whatever the disk speed.
3. **Peak memory of a hit** (``mx.get_peak_memory`` over the fetch plus one decode
   step written into every layer) for handover, clone and deepcopy.

Writes ``tiered_bench.json`` and ``tiered_bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from tiercache import TieredPromptCache
from tiercache.store import layers as L
from tiercache.store.disk import DiskStore

KEY = "bench-model"


def make_snapshot(tokens: int, layers: int, kv_heads: int, head_dim: int, dtype) -> list:
    """A prompt cache as a llama-like model leaves it after prefilling ``tokens``."""
    mx.random.seed(0)
    cache = []
    for _ in range(layers):
        c = KVCache()
        k = mx.random.normal((1, kv_heads, tokens, head_dim)).astype(dtype)
        v = mx.random.normal((1, kv_heads, tokens, head_dim)).astype(dtype)
        c.update_and_fetch(k, v)
        cache.append(c)
    mx.eval([x for c in cache for x in (c.keys, c.values)])
    return cache


def _median_ms(xs):
    return statistics.median(xs) * 1e3


def _bind_namespace(tc: TieredPromptCache, snapshot) -> None:
    """Gives the bench key a disk namespace without a model folder (fake files fingerprint)."""
    ns = tc.disk.register_namespace(b"\x00" * 16, L.describe_cache(snapshot), {"bench": True})
    tc._ns_by_key[KEY] = ns  # what register_model does once it has probed a real model


def bench_fetch(snapshot, tokens, repeats: int) -> dict:
    toks = list(range(tokens))
    query = toks + [1]
    deep = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = copy.deepcopy(snapshot)
        deep.append(time.perf_counter() - t0)
        del c
    out = {"deepcopy_ms": _median_ms(deep)}
    for mode, handover in (("clone", False), ("handover", True)):
        tc = TieredPromptCache(max_size=4, handover=handover)
        tc.insert_cache(KEY, toks, snapshot)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = tc.fetch(KEY, query)
            ts.append(time.perf_counter() - t0)
            cache = found.prompt_cache
            assert cache is not None and len(found.rest) == 1 and found.source == "memory"
            if handover:  # the caller re-inserts (untimed), as the server does
                tc.memory.insert((KEY, b""), toks, cache)  # memory key: (model, salt)
            del cache, found
        out[f"fetch_{mode}_ms"] = _median_ms(ts)
        out[f"ratio_{mode}_vs_deepcopy"] = out[f"fetch_{mode}_ms"] / out["deepcopy_ms"]
        tc.close()
    return out


def bench_insert(snapshot, tokens, repeats: int, slow_save: float, queue_snapshots: float) -> dict:
    real_save = DiskStore.save

    def slow(self, *a, **kw):  # fault injection: a slow disk
        time.sleep(slow_save)
        return real_save(self, *a, **kw)

    nbytes = sum(c.nbytes for c in snapshot)
    DiskStore.save = slow
    try:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as d:
            tc = TieredPromptCache(
                max_size=1000,
                max_bytes=4 * nbytes,
                disk_dir=Path(d) / "store",
                writer_queue_bytes=int(queue_snapshots * nbytes),
            )
            _bind_namespace(tc, snapshot)
            evals, inserts = [], []
            for i in range(repeats):
                toks = [i + 7] + list(range(tokens - 1))  # distinct sequences
                t0 = time.perf_counter()
                mx.eval([x for c in snapshot for x in (c.keys, c.values)])
                t1 = time.perf_counter()
                tc.insert_cache(KEY, toks, snapshot)
                t2 = time.perf_counter()
                evals.append(t1 - t0)
                inserts.append(t2 - t1)
            w = tc.stats()["writer"]
            tc.close(flush_timeout=60.0)  # drains the few jobs left (not timed)
    finally:
        DiskStore.save = real_save
    inserts_sorted = sorted(inserts)
    return {
        "slow_save_seconds": slow_save,
        "inserts": repeats,
        "eval_ms_median": _median_ms(evals),
        "insert_ms_median": _median_ms(inserts),
        "insert_ms_p90": inserts_sorted[int(0.9 * (len(inserts) - 1))] * 1e3,
        "insert_ms_max": inserts_sorted[-1] * 1e3,
        "insert_ms_first": inserts[0] * 1e3,
        "writer_pending_after_inserts": w["pending"],
        "writer_dropped_writes": w["dropped_writes"],
        "writer_written": w["written"],
    }


def _decode_step(cache, kv_heads, head_dim, dtype):
    k = mx.zeros((1, kv_heads, 1, head_dim), dtype=dtype)
    for c in cache:
        c.update_and_fetch(k, k)
    mx.eval([x for c in cache for x in (c.keys, c.values)])


def bench_peak(tokens, layers, kv_heads, head_dim, dtype) -> dict:
    toks = list(range(tokens))
    out = {}
    for mode in ("handover", "clone", "deepcopy"):
        gc.collect()
        snap = make_snapshot(tokens, layers, kv_heads, head_dim, dtype)
        stored = sum(c.nbytes for c in snap)
        tc = TieredPromptCache(max_size=4, handover=(mode == "handover"))
        tc.insert_cache(KEY, toks, snap)
        del snap
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        if mode == "deepcopy":
            entry = tc.memory._lrus["assistant"]
            (e,) = list(entry)
            cache = copy.deepcopy(e.prompt_cache)
        else:
            cache, _ = tc.fetch_nearest_cache(KEY, toks + [1])
        _decode_step(cache, kv_heads, head_dim, dtype)
        peak = mx.get_peak_memory()
        out[mode] = {
            "stored_mib": stored / 2**20,
            "active_before_mib": base / 2**20,
            "peak_mib": peak / 2**20,
            "extra_mib": (peak - base) / 2**20,
        }
        tc.close()
        del cache, tc
    return out


def render_md(res: dict) -> str:
    s, f, i, p = res["setup"], res["fetch"], res["insert"], res["peak"]
    lines = [
        "# tiered_bench",
        "",
        f"Snapshot: {s['tokens']} tokens, {s['layers']} layers, {s['kv_heads']} KV heads, "
        f"head_dim {s['head_dim']}, {s['dtype']} = {s['snapshot_mib']:.1f} MiB "
        f"(mlx {s['mlx']}, {s['device']}, {s['machine']}).",
        "",
        "## Memory-hit fetch vs copy.deepcopy (median of "
        f"{s['repeats']})",
        "",
        "| operation | ms | ratio to deepcopy | target |",
        "|---|---:|---:|---|",
        f"| copy.deepcopy | {f['deepcopy_ms']:.3f} | 1.00 | |",
        f"| fetch (clone) | {f['fetch_clone_ms']:.3f} | {f['ratio_clone_vs_deepcopy']:.2f} | <= 2 |",
        f"| fetch (handover) | {f['fetch_handover_ms']:.3f} | {f['ratio_handover_vs_deepcopy']:.2f} | <= 2 |",
        "",
        f"## insert_cache on the caller's thread, disk slowed to {i['slow_save_seconds']} s/save",
        "",
        "| metric | ms |",
        "|---|---:|",
        f"| mx.eval of the (already evaluated) arrays, median | {i['eval_ms_median']:.3f} |",
        f"| insert_cache median (target <= 1 ms) | {i['insert_ms_median']:.3f} |",
        f"| insert_cache p90 | {i['insert_ms_p90']:.3f} |",
        f"| insert_cache max | {i['insert_ms_max']:.3f} |",
        f"| first insert (registers nothing: namespace bound up front) | {i['insert_ms_first']:.3f} |",
        "",
        f"Writer after {i['inserts']} inserts: {i['writer_pending_after_inserts']} pending, "
        f"{i['writer_written']} written, {i['writer_dropped_writes']} dropped (queue overflow).",
        "",
        "## Peak memory of a hit (fetch + one decode step written into every layer)",
        "",
        "| mode | stored MiB | extra peak MiB |",
        "|---|---:|---:|",
    ]
    for mode, v in p.items():
        lines.append(f"| {mode} | {v['stored_mib']:.1f} | {v['extra_mib']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--slow-save", type=float, default=0.2)
    ap.add_argument("--queue-snapshots", type=float, default=2.5,
                    help="writer queue bound, in snapshots")
    args = ap.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    snap = make_snapshot(args.tokens, args.layers, args.kv_heads, args.head_dim, dtype)
    res = {
        "setup": {
            "tokens": args.tokens,
            "layers": args.layers,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "snapshot_mib": sum(c.nbytes for c in snap) / 2**20,
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "machine": platform.machine(),
        },
    }
    res["fetch"] = bench_fetch(snap, args.tokens, args.repeats)
    res["insert"] = bench_insert(snap, args.tokens, args.repeats, args.slow_save, args.queue_snapshots)
    del snap
    res["peak"] = bench_peak(args.tokens, args.layers, args.kv_heads, args.head_dim, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiered_bench.json").write_text(json.dumps(res, indent=2))
    md = render_md(res)
    (args.out / "tiered_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

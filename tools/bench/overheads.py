"""Overheads: index lookup/insert vs index size, memory-hit copy cost, writer throughput.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.overheads --out bench-results [--quick] [--max-blocks 1000000]

1. **Index**: a store holds a real 32-block chain (an 8K-token snapshot of a
   small KV layout) plus N filler block records written straight into the LMDB
   index (tiercache.store.index.Index, 50K records per transaction). Timed at each N:
   ``DiskStore.longest_prefix`` of the 8K-token query (the lookup a fetch does),
   ``TieredPromptCache.fetch_nearest_cache``-level lookup cost is the same call;
   one index record insert (a write transaction), and ``DiskStore.save`` of a
   snapshot that adds one new block (file write + fsync + index commit).
2. **Memory-hit copy cost** for qwen3-0.6b-shaped KV (28 layers, 8 KV heads,
   head_dim 128, float32) at 1K/4K tokens: fetch, then one decode step's write
   into every layer (where copy-on-write happens), for mlx-lm's
   ``LRUPromptCache`` (deepcopy), tiercache memory-only, and tiercache with a
   disk tier (write-through), also after the writer has moved on to another job.
3. **Writer throughput**: snapshots of that KV shape inserted back to back;
   caller-side ``insert_cache`` time and the writer's MB/s to disk.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from . import common as C

QWEN_KV = {"layers": 28, "kv_heads": 8, "head_dim": 128}


def make_kv(n_tokens: int, layers: int, kv_heads: int, head_dim: int, seed: int = 0):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = [KVCache() for _ in range(layers)]
    for c in cache:
        k = mx.random.normal((1, kv_heads, n_tokens, head_dim))
        v = mx.random.normal((1, kv_heads, n_tokens, head_dim))
        c.update_and_fetch(k, v)
    mx.eval([c.state for c in cache])
    return cache


def decode_write(cache, kv_heads, head_dim) -> None:
    """One decode step's cache write into every layer (no model)."""
    import mlx.core as mx

    k = mx.zeros((1, kv_heads, 1, head_dim))
    outs = [c.update_and_fetch(k, k) for c in cache]
    mx.eval(outs)


# --------------------------------------------------------------------------- index


def bench_index(sizes, work: Path, reps: int) -> list[dict]:
    from tiercache.store.disk import DiskStore
    from tiercache.store.hashing import chain_root
    from tiercache.store.index import KIND_BLOCK, Record
    from tiercache.store.layers import describe_cache

    store = DiskStore(work / "index-store", block_size=256)
    small = make_kv(8192 + 256, 2, 2, 16, seed=1)  # small layout: file writes stay cheap
    ns = store.register_namespace(b"\x01" * 16, describe_cache(small), {"bench": "overheads"})
    rng = random.Random(0)
    query = [rng.randrange(3, 50000) for _ in range(8192 + 256)]
    # the real chain: an 8K-token snapshot
    trimmed = make_kv(8192, 2, 2, 16, seed=2)
    store.save(ns, query[:8192], trimmed)
    root = chain_root(ns)
    have = store.n_records() if hasattr(store, "n_records") else 0
    out = []
    ix = store.index
    tok_block = bytes(1024)
    for n in sizes:
        t0 = time.perf_counter()
        while have < n:
            k = min(50_000, n - have)
            now = time.time()

            def fill(txn, k=k, now=now):
                for _ in range(k):
                    rid = rng.randbytes(16)
                    rec = Record(rid, KIND_BLOCK, ns, rng.randbytes(16), 4096, 0, now, now, 0, 256, tok_block)
                    ix.insert(txn, rec)

            ix.write(fill)
            have += k
        build = time.perf_counter() - t0
        lookups = []
        for _ in range(reps):
            t = time.perf_counter()
            plan = store.longest_prefix(ns, query, limit=len(query) - 1)
            lookups.append(time.perf_counter() - t)
        assert plan.n_tokens == 8192, plan.n_tokens
        miss = []
        other = [rng.randrange(3, 50000) for _ in range(8192)]
        for _ in range(reps):
            t = time.perf_counter()
            store.longest_prefix(ns, other, limit=len(other) - 1)
            miss.append(time.perf_counter() - t)
        ins = []
        for _ in range(reps):
            rec = Record(rng.randbytes(16), KIND_BLOCK, ns, root, 4096, 0, time.time(), time.time(), 0, 256, tok_block)
            t = time.perf_counter()
            ix.write(lambda txn, rec=rec: ix.insert(txn, rec))
            ins.append(time.perf_counter() - t)
            have += 1
        saves = []
        for i in range(min(reps, 5)):
            q = query[:8192] + [rng.randrange(3, 50000) for _ in range(256)]
            kv = make_kv(8192 + 256, 2, 2, 16, seed=10 + i)
            t = time.perf_counter()
            res = store.save(ns, q, kv)
            saves.append(time.perf_counter() - t)
            have += res.records_written
        row = {
            "records": have,
            "build_seconds": build,
            "lookup_hit_ms": statistics.median(lookups) * 1e3,
            "lookup_hit_p95_ms": C.pct(lookups, 0.95) * 1e3,
            "lookup_miss_ms": statistics.median(miss) * 1e3,
            "index_insert_ms": statistics.median(ins) * 1e3,
            "save_one_block_ms": statistics.median(saves) * 1e3,
            "lmdb_bytes": sum(f.stat().st_size for f in (work / "index-store").rglob("*.mdb")),
            "query_tokens": len(query),
            "load": C.loadavg(),
        }
        print(f"  index {have:>8d} records: lookup {row['lookup_hit_ms']:.3f} ms, insert {row['index_insert_ms']:.3f} ms, "
              f"save {row['save_one_block_ms']:.1f} ms (build {build:.1f}s)", flush=True)
        out.append(row)
    store.close()
    return out


# --------------------------------------------------------------------------- memory hit


def bench_memory_hit(sizes, work: Path, reps: int) -> list[dict]:
    import copy

    import mlx.core as mx
    from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

    from tiercache import TieredPromptCache

    L, H, D = QWEN_KV["layers"], QWEN_KV["kv_heads"], QWEN_KV["head_dim"]
    rows = []
    fake_model = work / "fake-model"
    fake_model.mkdir(parents=True, exist_ok=True)
    (fake_model / "config.json").write_text('{"model_type": "fake"}')
    (fake_model / "tokenizer.json").write_text("{}")
    for n in sizes:
        tokens = list(range(3, 3 + n))
        base = make_kv(n, L, H, D, seed=n)
        nbytes = sum(c.nbytes for c in base)

        def timed(fetch, insert):
            fetch_t, write_t = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                cache, rest = fetch()
                t1 = time.perf_counter()
                if not rest:
                    trim_prompt_cache(cache, 1)
                decode_write(cache, H, D)
                t2 = time.perf_counter()
                fetch_t.append(t1 - t0)
                write_t.append(t2 - t1)
                insert(cache)
                del cache
            return {"fetch_ms": statistics.median(fetch_t) * 1e3, "first_write_ms": statistics.median(write_t) * 1e3,
                    "all_write_ms": [round(x * 1e3, 1) for x in write_t]}

        res = {"tokens": n, "snapshot_MB": nbytes / 1e6}
        # a fresh cache (nobody else holds the buffers): the floor
        res["fresh (no sharing)"] = timed(
            lambda: (make_kv(n, L, H, D, seed=n), []), lambda c: None
        )
        res["fresh (no sharing)"]["fetch_ms"] = 0.0
        lru = LRUPromptCache(max_size=10)
        lru.insert_cache("m", tokens, copy.deepcopy(base))
        res["mlx-lm LRUPromptCache (deepcopy)"] = timed(
            lambda: lru.fetch_nearest_cache("m", tokens), lambda c: lru.insert_cache("m", tokens, c)
        )
        del lru
        tc = TieredPromptCache(max_size=10)
        tc.insert_cache("m", tokens, copy.deepcopy(base))
        res["tiercache memory-only (handover)"] = timed(
            lambda: tc.fetch_nearest_cache("m", tokens), lambda c: tc.insert_cache("m", tokens, c)
        )
        tc.close()
        tc = TieredPromptCache(max_size=10, handover=False)
        tc.insert_cache("m", tokens, copy.deepcopy(base))
        res["tiercache memory-only (clone)"] = timed(
            lambda: tc.fetch_nearest_cache("m", tokens), lambda c: tc.insert_cache("m", tokens, c)
        )
        tc.close()
        store = work / f"mh-store-{n}"
        tc = TieredPromptCache(max_size=10, disk_dir=store)

        def ins_flush(c):
            tc.insert_cache(str(fake_model), tokens, c)
            tc.flush()

        ins_flush(copy.deepcopy(base))
        res["tiercache + disk (write-through, flushed)"] = timed(
            lambda: tc.fetch_nearest_cache(str(fake_model), tokens), ins_flush
        )

        # same, but a tiny unrelated snapshot is written after each insert, so the
        # writer thread's last job is no longer the big one
        small_tokens = [7, 8, 9]

        def ins_flush_then_other(c):
            ins_flush(c)
            tc.insert_cache(str(fake_model), small_tokens, _tiny_like(c))
            tc.flush()

        c, _ = tc.fetch_nearest_cache(str(fake_model), tokens)  # (N-1 tokens) + one write = N tokens
        decode_write(c, H, D)
        ins_flush_then_other(c)
        del c
        res["tiercache + disk, writer moved on"] = timed(
            lambda: tc.fetch_nearest_cache(str(fake_model), tokens), ins_flush_then_other
        )
        tc.close()
        shutil.rmtree(store, ignore_errors=True)
        rows.append(res)
        for k, v in res.items():
            if isinstance(v, dict):
                print(f"  memory hit {n}: {k}: fetch {v['fetch_ms']:.2f} ms, first write {v['first_write_ms']:.1f} ms {v['all_write_ms']}", flush=True)
        del base
        mx.clear_cache()
    return rows


def _tiny_like(cache):
    """A 3-token cache with the same layout as ``cache`` (same namespace)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        k = c.keys
        n = KVCache()
        z = mx.zeros((1, k.shape[1], 3, k.shape[3]), dtype=k.dtype)
        n.update_and_fetch(z, z)
        out.append(n)
    mx.eval([c.state for c in out])
    return out


# --------------------------------------------------------------------------- writer


def bench_writer(n_tokens: int, count: int, work: Path) -> dict:
    import mlx.core as mx  # noqa: F401

    from tiercache import TieredPromptCache

    L, H, D = QWEN_KV["layers"], QWEN_KV["kv_heads"], QWEN_KV["head_dim"]
    fake_model = work / "fake-model"
    store = work / "writer-store"
    tc = TieredPromptCache(max_size=count + 1, disk_dir=store, writer_queue_bytes=64 << 30)
    snaps = [make_kv(n_tokens, L, H, D, seed=100 + i) for i in range(count)]
    nbytes = sum(c.nbytes for c in snaps[0])
    rng = random.Random(5)
    ins = []
    t0 = time.perf_counter()
    for s in snaps:
        toks = [rng.randrange(3, 50000) for _ in range(n_tokens)]
        t = time.perf_counter()
        tc.insert_cache(str(fake_model), toks, s)
        ins.append(time.perf_counter() - t)
    t_sub = time.perf_counter()
    tc.flush()
    t_end = time.perf_counter()
    st = tc.stats()
    tc.close()
    disk_bytes = sum(f.stat().st_size for f in store.rglob("*.safetensors"))
    shutil.rmtree(store, ignore_errors=True)
    row = {
        "snapshots": count,
        "tokens_each": n_tokens,
        "snapshot_MB": nbytes / 1e6,
        "insert_cache_ms_median": statistics.median(ins) * 1e3,
        "insert_cache_ms_max": max(ins) * 1e3,
        "written_MB": disk_bytes / 1e6,
        "drain_seconds": t_end - t0,
        "writer_MBps": disk_bytes / 1e6 / (t_end - t0),
        "submit_seconds": t_sub - t0,
        "dropped_writes": st["writer"]["dropped_writes"],
        "load": C.loadavg(),
    }
    print(f"  writer: {row}", flush=True)
    return row


def run(args) -> dict:
    info = C.machine_info()
    print(C.machine_line(info))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tiercache-overheads-"))
    fake = work / "fake-model"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "config.json").write_text('{"model_type": "fake"}')
    (fake / "tokenizer.json").write_text("{}")
    try:
        sizes = [10**e for e in range(3, 7) if 10**e <= args.max_blocks]
        index = bench_index(sizes, work, args.reps)
        mem = bench_memory_hit(args.mem_sizes, work, args.mem_reps)
        writer = bench_writer(args.writer_tokens, args.writer_count, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "overheads",
        "command": C.command_line(),
        "machine": info,
        "kv_shape": QWEN_KV,
        "index": index,
        "memory_hit": mem,
        "writer": writer,
        "targets": {"lookup_ms_at_1e5_max": 1.0},
    }


def report(res: dict, out: Path) -> None:
    md = "## Index: lookup and insert vs index size\n\n8192-token query (32 blocks of 256) that hits a stored chain; filler block records with 256 tokens each.\n\n"
    md += C.md_table(
        ["records", "lookup hit ms (median)", "lookup hit p95 ms", "lookup miss ms", "index insert ms", "save (1 new block) ms", "LMDB MB", "load"],
        [[r["records"], r["lookup_hit_ms"], r["lookup_hit_p95_ms"], r["lookup_miss_ms"], r["index_insert_ms"],
          r["save_one_block_ms"], r["lmdb_bytes"] / 1e6, r["load"]] for r in res["index"]],
    )
    md += "\n\n## Memory hit: fetch + first decode-step write (copy-on-write) for qwen3-0.6b-shaped KV\n\n"
    rows = []
    for r in res["memory_hit"]:
        for k, v in r.items():
            if isinstance(v, dict):
                rows.append([r["tokens"], f"{r['snapshot_MB']:.0f}", k, v["fetch_ms"], v["first_write_ms"]])
    md += C.md_table(["tokens", "snapshot MB", "path", "fetch ms", "first write ms"], rows)
    w = res["writer"]
    md += "\n\n## Writer throughput\n\n"
    md += C.md_table(
        ["snapshots", "tokens each", "snapshot MB", "insert_cache ms (caller, median)", "written MB", "drain s", "writer MB/s", "dropped", "load"],
        [[w["snapshots"], w["tokens_each"], w["snapshot_MB"], w["insert_cache_ms_median"], w["written_MB"],
          w["drain_seconds"], w["writer_MBps"], w["dropped_writes"], w["load"]]],
    )
    C.write_results(out, "overheads", res, md)
    p = C.plt()
    if p is None or len(res["index"]) < 2:
        return
    fig, ax = p.subplots(figsize=(6, 4))
    xs = [r["records"] for r in res["index"]]
    ax.plot(xs, [r["lookup_hit_ms"] for r in res["index"]], marker="o", label="lookup (8K-token hit)")
    ax.plot(xs, [r["lookup_miss_ms"] for r in res["index"]], marker="o", label="lookup (miss)")
    ax.plot(xs, [r["index_insert_ms"] for r in res["index"]], marker="o", label="index insert (1 record)")
    ax.set_xscale("log")
    ax.set_xlabel("records in the index")
    ax.set_ylabel("ms")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title("Index overheads vs size")
    fig.tight_layout()
    fig.savefig(Path(out) / "overheads.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-blocks", type=int, default=None, help="largest index size (default 10^5, quick 10^3)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--mem-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--mem-reps", type=int, default=3)
    ap.add_argument("--writer-tokens", type=int, default=None)
    ap.add_argument("--writer-count", type=int, default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.max_blocks = args.max_blocks or (10**3 if q else 10**5)
    args.reps = args.reps or (5 if q else 50)
    args.mem_sizes = args.mem_sizes or ([256] if q else [1024, 4096])
    args.writer_tokens = args.writer_tokens or (256 if q else 2048)
    args.writer_count = args.writer_count or (2 if q else 4)
    res = run(args)
    report(res, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

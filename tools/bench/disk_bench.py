"""Disk-tier benchmark: restore throughput, lookup latency, dedup save, save throughput.

Usage::

    python -m tiercache.tools.bench.disk_bench --out DIR [--tokens 4096] [--block 256]

Writes ``DIR/disk_bench.json`` and ``DIR/disk_bench.md`` and prints both.

1. Restore: a Qwen3-0.6B-shaped snapshot (28 layers, 8 KV heads, head_dim 128,
   float32) of ``--tokens`` tokens is saved, then ``DiskStore.fetch`` is timed with
   the page cache warm, against (a) a plain sequential read of the same files into
   one reusable buffer and (b) one ``mx.array`` copy of the same number of bytes.
   Cold numbers: ``echo 3 > /proc/sys/vm/drop_caches`` if permitted, otherwise
   ``posix_fadvise(DONTNEED)`` on every file (drops those files' clean pages).
2. Lookup: ``longest_prefix`` of a 32K-token prompt in an index of 100,000 blocks
   (records inserted straight through ``Index.insert``; no files).
3. Dedup save: saving the same snapshot again (every block exists).
4. Save throughput of new blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from tiercache.store.disk import DiskStore
from tiercache.store.hashing import block_hashes, chain_root, pack_tokens
from tiercache.store.index import KIND_BLOCK, Record
from tiercache.store.layers import describe_cache

MB = 1 << 20


def make_snapshot(layers: int, heads: int, head_dim: int, tokens: int, seed: int) -> list:
    """KVCache objects filled with random float32 rows (no model needed)."""
    key = mx.random.key(seed)
    cache = []
    for _ in range(layers):
        key, k1, k2 = mx.random.split(key, 3)
        c = KVCache()
        c.update_and_fetch(
            mx.random.normal((1, heads, tokens, head_dim), key=k1),
            mx.random.normal((1, heads, tokens, head_dim), key=k2),
        )
        cache.append(c)
    mx.eval([x for c in cache for x in (c.keys, c.values)])
    return cache


def _files(store: DiskStore) -> list[Path]:
    return sorted(store.path.rglob("*.safetensors"))


def _drop_cache(files: list[Path], mode: str = "auto") -> str:
    if mode == "off":
        return "off"
    if mode == "auto":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    if not hasattr(os, "posix_fadvise"):
        return "unavailable"
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per file" + (" (drop_caches not permitted)" if mode == "auto" else "")


def _raw_read(files: list[Path], buf: bytearray) -> int:
    mv = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                total += k
    return total


def _timed(fn, repeats: int, before=None) -> list[float]:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_restore_and_save(work: Path, args) -> dict:
    res: dict = {}
    cache = make_snapshot(args.layers, args.heads, args.head_dim, args.tokens, seed=0)
    tokens = list(np.random.default_rng(0).integers(0, 150_000, args.tokens))
    store = DiskStore(work / "store", block_size=args.block)
    ns = store.register_namespace(b"\x01" * 16, describe_cache(cache), {"bench": "qwen3-0.6b-shape"})

    # 4. save throughput of new blocks (fresh tokens each time: nothing dedups)
    save_times = []
    nbytes = 0
    for r in range(args.save_repeats):
        toks = tokens if r == 0 else list(np.random.default_rng(100 + r).integers(0, 150_000, args.tokens))
        t = time.perf_counter()
        sr = store.save(ns, toks, cache)
        save_times.append(time.perf_counter() - t)
        nbytes = sr.bytes_written
        assert sr.records_written == args.tokens // args.block, sr
    kv_bytes = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    res["snapshot_bytes"] = kv_bytes
    res["save_new_s_median"] = statistics.median(save_times)
    res["save_new_MBps"] = nbytes / MB / res["save_new_s_median"]

    # 3. pure dedup save
    dd = _timed(lambda: store.save(ns, tokens, cache), args.dedup_repeats)
    res["dedup_save_ms_median"] = statistics.median(dd) * 1e3

    # Keep only the snapshot we time restores of.
    for r in range(1, args.save_repeats):
        toks = list(np.random.default_rng(100 + r).integers(0, 150_000, args.tokens))
        ids = block_hashes(chain_root(ns), toks, args.block)
        store.remove_records(ids)
    files = _files(store)
    file_bytes = sum(p.stat().st_size for p in files)
    res["files"] = len(files)
    res["file_bytes"] = file_bytes
    del cache

    # 1. restore, warm
    def restore():
        c, n = store.fetch(ns, tokens)
        assert n == args.tokens
        mx.eval([x for layer in c for x in (layer.keys, layer.values)])

    buf = bytearray(max(p.stat().st_size for p in files))
    restore()  # warm the page cache
    _raw_read(files, buf)
    t_restore = _timed(restore, args.repeats)
    t_read = _timed(lambda: _raw_read(files, buf), args.repeats)
    src = np.frombuffer(np.random.default_rng(1).bytes(file_bytes // 4 * 4), dtype=np.float32)

    def copy():
        mx.eval(mx.array(src))  # host bytes -> a fresh MLX buffer, as a restore must

    copy()
    t_copy = _timed(copy, args.repeats)
    warm_restore, warm_read, warm_copy = map(statistics.median, (t_restore, t_read, t_copy))
    res["warm_best"] = {
        "restore_GBps": file_bytes / min(t_restore) / 1e9,
        "raw_read_GBps": file_bytes / min(t_read) / 1e9,
        "mx_copy_GBps": file_bytes / min(t_copy) / 1e9,
    }
    res["warm"] = {
        "restore_GBps": file_bytes / warm_restore / 1e9,
        "raw_read_GBps": file_bytes / warm_read / 1e9,
        "mx_copy_GBps": file_bytes / warm_copy / 1e9,
        "restore_s": warm_restore,
        "raw_read_s": warm_read,
        "mx_copy_s": warm_copy,
    }
    w = res["warm"]
    w["restore_vs_raw_read"] = w["restore_GBps"] / w["raw_read_GBps"]
    w["restore_vs_mx_copy"] = w["restore_GBps"] / w["mx_copy_GBps"]
    w["restore_vs_min"] = w["restore_GBps"] / min(w["raw_read_GBps"], w["mx_copy_GBps"])

    # 1b. restore, cold
    method = _drop_cache(files, args.cold)
    res["cold_method"] = method
    if method not in ("unavailable", "off"):
        drop = lambda: _drop_cache(files, args.cold)  # noqa: E731
        cold_restore = statistics.median(_timed(restore, args.cold_repeats, before=drop))
        cold_read = statistics.median(_timed(lambda: _raw_read(files, buf), args.cold_repeats, before=drop))
        res["cold"] = {
            "restore_GBps": file_bytes / cold_restore / 1e9,
            "raw_read_GBps": file_bytes / cold_read / 1e9,
            "restore_s": cold_restore,
            "raw_read_s": cold_read,
            "restore_vs_raw_read": cold_read / cold_restore,
        }
    store.close()
    return res


def bench_lookup(work: Path, args) -> dict:
    store = DiskStore(work / "lookup", block_size=args.block)
    desc = [{"class": "KVCache", "dtype": "F32"}] * args.layers
    ns = store.register_namespace(b"\x02" * 16, desc, {"bench": "lookup"})
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 150_000, args.prompt_tokens).tolist()
    B = args.block
    root = chain_root(ns)
    hashes = block_hashes(root, prompt, B)
    packed = pack_tokens(prompt)
    now = time.time()
    recs = []
    parent = root
    for i, h in enumerate(hashes):
        recs.append(Record(h, KIND_BLOCK, ns, parent, 1 << 20, 0, now, now, 0, (i + 1) * B,
                           packed[i * 4 * B : (i + 1) * 4 * B]))
        parent = h
    # Filler: other conversations, chains of 64 blocks each, in the same namespace.
    n_fill = args.index_blocks - len(recs)
    chain_len = 64
    t0 = time.perf_counter()
    while n_fill > 0:
        toks = rng.integers(0, 150_000, min(n_fill, chain_len) * B)
        hs = block_hashes(root, toks, B)
        pk = toks.astype("<u4").tobytes()
        parent = root
        for i, h in enumerate(hs):
            recs.append(Record(h, KIND_BLOCK, ns, parent, 1 << 20, 0, now, now, 0, (i + 1) * B,
                               pk[i * 4 * B : (i + 1) * 4 * B]))
            parent = h
        n_fill -= len(hs)
        if len(recs) >= 20_000 or n_fill <= 0:
            batch, recs = recs, []
            store.index.write(lambda txn: [store.index.insert(txn, r) for r in batch])
    build_s = time.perf_counter() - t0
    n = store.n_records()
    q = prompt + [7]
    plan = store.longest_prefix(ns, q, limit=len(q) - 1)
    assert plan.n_tokens == args.prompt_tokens, plan.n_tokens
    times = _timed(lambda: store.longest_prefix(ns, q, limit=len(q) - 1), args.lookup_repeats)
    qa = np.asarray(q, dtype=np.uint32)
    times_np = _timed(lambda: store.longest_prefix(ns, qa, limit=len(q) - 1), args.lookup_repeats)
    miss = _timed(lambda: store.longest_prefix(ns, [9] + q[1:], limit=len(q) - 1), args.lookup_repeats)
    store.close()
    return {
        "index_records": n,
        "index_build_s": build_s,
        "prompt_tokens": len(q),
        "lookup_ms_median": statistics.median(times) * 1e3,
        "lookup_ms_p90": float(np.percentile(times, 90)) * 1e3,
        "lookup_ms_min": min(times) * 1e3,
        "lookup_numpy_prompt_ms_median": statistics.median(times_np) * 1e3,
        "lookup_miss_ms_median": statistics.median(miss) * 1e3,
    }


def to_markdown(r: dict) -> str:
    w = r["restore"]["warm"]
    rows = [
        ("snapshot", f"{r['config']['tokens']} tokens, {r['config']['layers']} layers, "
                     f"{r['restore']['file_bytes'] / MB:.0f} MiB in {r['restore']['files']} files"),
        ("restore (page cache warm)", f"{w['restore_GBps']:.2f} GB/s ({w['restore_s'] * 1e3:.0f} ms)"),
        ("plain sequential read (warm)", f"{w['raw_read_GBps']:.2f} GB/s"),
        ("one mx.array copy", f"{w['mx_copy_GBps']:.2f} GB/s"),
        ("restore / min(read, copy)", f"{w['restore_vs_min'] * 100:.0f}%"),
        ("best of runs: restore / read / copy", " / ".join(
            f"{r['restore']['warm_best'][k]:.2f} GB/s" for k in ("restore_GBps", "raw_read_GBps", "mx_copy_GBps"))),
    ]
    if "cold" in r["restore"]:
        c = r["restore"]["cold"]
        rows += [
            ("restore (cold)", f"{c['restore_GBps']:.2f} GB/s"),
            ("plain sequential read (cold)", f"{c['raw_read_GBps']:.2f} GB/s"),
            ("restore / read (cold)", f"{c['restore_vs_raw_read'] * 100:.0f}%"),
            ("cold method", r["restore"]["cold_method"]),
        ]
    else:
        rows.append(("cold", "not measured: " + r["restore"]["cold_method"]))
    lk = r["lookup"]
    rows += [
        (f"lookup, {lk['prompt_tokens']}-token prompt, {lk['index_records']} blocks",
         f"{lk['lookup_ms_median']:.3f} ms median (min {lk['lookup_ms_min']:.3f}, p90 {lk['lookup_ms_p90']:.3f}; "
         f"numpy prompt {lk['lookup_numpy_prompt_ms_median']:.3f}; miss {lk['lookup_miss_ms_median']:.3f})"),
        ("dedup save (all blocks exist)", f"{r['restore']['dedup_save_ms_median']:.2f} ms median"),
        ("save of new blocks", f"{r['restore']['save_new_MBps']:.0f} MB/s "
                               f"({r['restore']['save_new_s_median'] * 1e3:.0f} ms per snapshot)"),
    ]
    out = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--cold", choices=["auto", "fadvise", "off"], default="auto",
                    help="auto: drop_caches if permitted, else fadvise(DONTNEED) per file")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--save-repeats", type=int, default=3)
    ap.add_argument("--dedup-repeats", type=int, default=50)
    ap.add_argument("--index-blocks", type=int, default=100_000)
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--lookup-repeats", type=int, default=200)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="disk-bench-", dir=args.work))
    try:
        result = {
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
            "platform": {"python": sys.version.split()[0], "mlx": mx.__version__,
                         "device": str(mx.default_device()), "cpus": os.cpu_count()},
        }
        result["restore"] = bench_restore_and_save(work, args)
        result["lookup"] = bench_lookup(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = to_markdown(result)
    (args.out / "disk_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "disk_bench.md").write_text(md)
    print(json.dumps(result, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TTFT by path: cold, memory hit, disk hit (page cache warm / dropped), after a restart.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.ttft --out bench-results [--quick] [--sizes 1024 4096 8192]

For each prompt length N (random token ids, seeded) on the qwen3-0.6b-shaped
float32 model:

* cold: no cache, prefill all N tokens;
* memory: the same prompt again, served by the memory tier (N-1 tokens cached);
* disk (page cache warm): memory tier cleared, restored from the store files that
  were just written (still in the page cache);
* disk (page cache dropped): same after ``echo 3 > /proc/sys/vm/drop_caches``
  (or ``posix_fadvise(DONTNEED)`` on the store files when that is not permitted);
* restart: the cache is closed and a new ``TieredPromptCache`` opened on the same
  folder (what a server restart does); its first request.

TTFT = fetch + prefill of the remainder + the first token (see common.ttft).
Restore bandwidth (bytes restored / restore time) is compared with a plain
sequential read of the same files, page cache warm and dropped.
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

PATHS = ("cold", "memory", "disk_warm", "disk_dropped", "restart")
LABELS = {
    "cold": "cold (no cache)",
    "memory": "memory hit",
    "disk_warm": "disk hit, page cache warm",
    "disk_dropped": "disk hit, page cache dropped",
    "restart": "first request after restart",
}


def raw_read(roots) -> tuple[int, float]:
    """Bytes and seconds to read every file under ``roots`` sequentially."""
    n = 0
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    for dirpath, _, files in (w for root in roots for w in os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    n += k
    return n, time.perf_counter() - t0


def run(args) -> dict:
    from tiercache import TieredPromptCache
    from tiercache.store.disk import BLOCKS_DIR, CHECKPOINTS_DIR

    info = C.machine_info()
    path = C.model_path(args.preset, args.model_dir)
    t0 = time.perf_counter()
    model, tok = C.load_model(path)
    load_s = time.perf_counter() - t0
    shape = C.model_shape(path)
    print(C.machine_line(info))
    print("model:", C.shape_line(shape), f"(loaded in {load_s:.1f}s)")
    vocab = min(tok.vocab_size if hasattr(tok, "vocab_size") else 2048, 2048)
    key = str(path)
    work = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="tiercache-ttft-"))
    # warm up kernels (not timed)
    C.ttft(model, lambda t: (None, t), list(range(3, 3 + 64)))

    results = []
    for n in args.sizes:
        rng = random.Random(1000 + n)
        tokens = [rng.randrange(3, vocab) for _ in range(n)]
        store = work / f"store-{n}"
        files = [store / BLOCKS_DIR, store / CHECKPOINTS_DIR]
        shutil.rmtree(store, ignore_errors=True)
        row: dict = {"tokens": n, "load_start": C.loadavg()}
        # keep_promoted=False: as the server runs it (it re-inserts what it used).
        tc = TieredPromptCache(max_size=100, disk_dir=store, block_size=args.block_size, keep_promoted=False)
        tc.register_model(key, path, model)

        last = {}  # the FetchResult of the latest tiered lookup

        def fetch(t, tc_ref=None):
            last["result"] = (tc if tc_ref is None else tc_ref).fetch(key, t)
            return last["result"].prompt_cache, last["result"].rest

        # cold
        colds = []
        for _ in range(args.cold_reps):
            r = C.ttft(model, lambda t: (None, t), tokens)
            colds.append(r["ttft"])
        row["cold"] = {"ttft": statistics.median(colds), "all": colds, "prefilled": r["prefilled"]}
        print(f"[{n}] cold {row['cold']['ttft']:.2f}s", flush=True)
        t1 = time.perf_counter()
        tc.insert_cache(key, tokens, r["cache"], cache_type="user")
        ins = time.perf_counter() - t1
        t1 = time.perf_counter()
        tc.flush()
        row["insert_seconds"] = ins
        row["write_seconds"] = time.perf_counter() - t1 + ins
        del r

        def measure(name, prep=None, tcx=None, reps=args.reps):
            vals, sources, fetches, restores, cached = [], [], [], [], []
            for _ in range(reps):
                extra = prep() if prep else {}
                r = C.ttft(model, lambda t: fetch(t, tcx), tokens)
                c = tc if tcx is None else tcx  # (a cache with no entries is falsy)
                li = last["result"]
                vals.append(r["ttft"])
                fetches.append(r["fetch"])
                restores.append(li.restore_seconds)
                sources.append(li.source)
                cached.append(r["cached"])
                # the server re-inserts what it used (handover gave it away)
                c.insert_cache(key, tokens, r["cache"], cache_type="user")
                c.flush()
                del r
            d = {
                "ttft": statistics.median(vals),
                "all": vals,
                "fetch": statistics.median(fetches),
                "restore": statistics.median(restores),
                "sources": sources,
                "cached": cached[-1],
                **(extra or {}),
            }
            print(f"[{n}] {name} {d['ttft']:.3f}s (fetch {d['fetch']:.3f}s) sources={sources}", flush=True)
            return d

        row["memory"] = measure("memory")

        def clear_mem():
            tc.clear("memory")
            return {"resident": C.resident_fraction(files)}

        row["disk_warm"] = measure("disk_warm", clear_mem)

        def clear_and_drop():
            tc.clear("memory")
            m = C.drop_page_cache([store], system=not args.no_system_drop)
            return {"drop_method": m, "resident": C.resident_fraction(files)}

        row["disk_dropped"] = measure("disk_dropped", clear_and_drop)

        # restore bandwidth vs raw sequential read of the same files
        nbytes = raw_read(files)[0]  # block/checkpoint files restored
        row["store_bytes"] = nbytes
        C.drop_page_cache([store], system=not args.no_system_drop)
        raw_cold = raw_read(files)
        raw_warm = raw_read(files)
        row["raw_read_dropped_GBps"] = raw_cold[0] / raw_cold[1] / 1e9
        row["raw_read_warm_GBps"] = raw_warm[0] / raw_warm[1] / 1e9
        row["restore_warm_GBps"] = nbytes / row["disk_warm"]["restore"] / 1e9
        row["restore_dropped_GBps"] = nbytes / row["disk_dropped"]["restore"] / 1e9

        # restart: close, reopen the same folder, first request
        tc.close()
        t1 = time.perf_counter()
        tc2 = TieredPromptCache(max_size=100, disk_dir=store, block_size=args.block_size, keep_promoted=False)
        tc2.register_model(key, path, model)
        open_s = time.perf_counter() - t1
        row["restart"] = measure("restart", tcx=tc2, reps=1)
        row["restart"]["open_seconds"] = open_s
        tc2.close()
        cold = row["cold"]["ttft"]
        row["ratios"] = {p: cold / row[p]["ttft"] for p in PATHS[1:]}
        row["load_end"] = C.loadavg()
        results.append(row)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    if not args.store and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "ttft",
        "command": C.command_line(),
        "machine": info,
        "model": args.preset,
        "model_shape": shape,
        "model_load_seconds": load_s,
        "block_size": args.block_size,
        "results": results,
        "targets": {"disk_hit_ratio_min": 10, "memory_hit_ratio_min": 20, "at_tokens": 4096},
    }


def report(res: dict, out: Path) -> None:
    rows = []
    for r in res["results"]:
        for p in PATHS:
            d = r[p]
            rows.append(
                [
                    r["tokens"],
                    LABELS[p],
                    d["ttft"],
                    d.get("fetch", 0.0),
                    d.get("restore", 0.0),
                    d.get("cached", 0),
                    "-" if p == "cold" else f"{r['ratios'][p]:.1f}x",
                    ",".join(sorted(set(d.get("sources", [])))) or "-",
                ]
            )
    md = C.md_table(
        ["tokens", "path", "TTFT s (median)", "fetch s", "restore s", "cached tokens", "cold/this", "source"], rows
    )
    md += "\n\n"
    bw = []
    for r in res["results"]:
        bw.append(
            [
                r["tokens"],
                r["store_bytes"] / 1e6,
                r["restore_warm_GBps"],
                r["raw_read_warm_GBps"],
                f"{r['restore_warm_GBps'] / r['raw_read_warm_GBps']:.0%}",
                r["restore_dropped_GBps"],
                r["raw_read_dropped_GBps"],
                f"{r['restore_dropped_GBps'] / r['raw_read_dropped_GBps']:.0%}",
            ]
        )
    md += "Restore bandwidth vs a plain sequential read of the same files:\n\n"
    md += C.md_table(
        [
            "tokens",
            "store MB",
            "restore GB/s (warm)",
            "raw read GB/s (warm)",
            "ratio",
            "restore GB/s (dropped)",
            "raw read GB/s (dropped)",
            "ratio",
        ],
        bw,
    )
    drop = next((r["disk_dropped"].get("drop_method") for r in res["results"]), None)
    md += f"\n\nPage cache drop: {drop}. Resident fraction before the dropped-cache fetch: " + ", ".join(
        f"{r['tokens']}: {r['disk_dropped'].get('resident')}" for r in res["results"]
    )
    md += "\n\nLoad average per size (start -> end): " + ", ".join(
        f"{r['tokens']}: {r['load_start']} -> {r['load_end']}" for r in res["results"]
    )
    C.write_results(out, "ttft", res, md)
    p = C.plt()
    if p is None:
        return
    fig, ax = p.subplots(figsize=(8, 4.5))
    sizes = [r["tokens"] for r in res["results"]]
    w = 0.8 / len(PATHS)
    for i, path in enumerate(PATHS):
        ax.bar([j + i * w for j in range(len(sizes))], [r[path]["ttft"] for r in res["results"]], w, label=LABELS[path])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(sizes))], [f"{s} tokens" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("TTFT (s, log)")
    ax.set_title(f"TTFT by path, {res['model']} float32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "ttft.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--quick", action="store_true", help="one size (1024), one repetition")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--model-dir", default=None, help="where bench models are built (default ~/.cache/tiercache/bench-models)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--cold-reps", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--store", default=None, help="store folder (default: a temp folder)")
    ap.add_argument("--no-system-drop", action="store_true",
                    help="evict only the store files (posix_fadvise), never the whole page cache")
    ap.add_argument("--keep", action="store_true", help="keep the store folders")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1024] if args.quick else [1024, 4096]
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    res = run(args)
    report(res, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The disk tier at scale: save and eviction latency at 10^3 .. 10^6 records,
store open and first lookup at the largest size.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m tiercache.tools.bench.scale_bench --out tools/bench/results [--sizes 1e3,1e4]

What each number measures (honestly):

* The store is grown in stages to each size. **Filler records** go straight into
  the index through ``Index.insert`` (the same code path a save commits, eviction
  order maintained) in big transactions, with random ids: chains of 16 blocks of
  16 tokens, oldest chain first. Filler records have no files except the oldest
  chains, which get real files of the real block size before each stage, so every
  record an eviction below removes has a real file to unlink.
* **save**: ``DiskStore.save`` of a new 72-token snapshot of a tiny real KVCache
  (1 layer, 1 KV head, head_dim 8, float32): 4 block files + 1 tail file written
  and fsynced, one LMDB commit. No budget, so no eviction.
* **evict**: ``DiskStore.evict_to(total - 5 blocks)``: choosing 5 victims (LRU
  leaves) and removing them in one commit, then unlinking their files.
* **save, index only**: the index work of a 5-record save (existence checks and
  inserts, eviction order maintained) in an aborted write transaction: no file
  writes, no fsyncs.
* **evict, index only**: the same victim choice and removal in a write
  transaction that is aborted: the index work alone, without LMDB's commit fsync
  or the unlinks (the fsyncs dominate the other numbers on this shared VM disk).
* **save over budget**: ``save`` with the budget at the current total, so every
  save evicts about what it adds (the writer thread's real per-save cost).
* **full scan**: one read of every record (decode only): the floor of what the
  previous eviction did on every save once over budget.
* **open + namespace** (largest size, fresh process): ``DiskStore(path)`` (format
  check, layout check) and the namespace lookup a server does at start;
  **first lookup**: chain walk of a 1,024-token stored prompt (64 blocks) plus
  its restore from files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from tiercache.store.disk import DiskStore
from tiercache.store.index import KIND_BLOCK, Record

from . import common as C

B = 16
CHAIN = 16
FILES_FP = b"\x05" * 16
HIT_TOKENS = 1024
HIT = [3 + (i * 31) % 60000 for i in range(HIT_TOKENS)]


def _kv(tokens: list[int]) -> KVCache:
    t = np.asarray(tokens, dtype=np.float32)
    k = mx.array(np.broadcast_to(t[None, None, :, None], (1, 1, len(t), 8)).copy())
    c = KVCache()
    c.update_and_fetch(k, -k)
    mx.eval(c.keys, c.values)
    return c


class Filler:
    """Synthetic chains inserted straight into the index, oldest first."""

    def __init__(self, store: DiskStore, ns: bytes, block_bytes: int):
        self.store, self.ns, self.block_bytes = store, ns, block_bytes
        self.chains: list[list[Record]] = []
        self.files_upto = 0  # chains [0, files_upto) have real files
        self.t0 = time.time() - 10 * 86400  # older than anything saved for real
        self.rng = np.random.default_rng(0)

    def grow(self, n_records: int) -> float:
        t = time.perf_counter()
        ix = self.store.index
        batch: list[Record] = []
        while n_records > 0:
            c = len(self.chains)
            when = self.t0 + c * 1e-3
            parent = self.rng.bytes(16)  # a chain root
            chain = []
            for i in range(min(CHAIN, n_records)):
                toks = self.rng.integers(3, 1 << 16, B, dtype=np.uint32).astype("<u4").tobytes()
                rec = Record(self.rng.bytes(16), KIND_BLOCK, self.ns, parent, self.block_bytes, 0,
                             when, when, 0, (i + 1) * B, toks)
                chain.append(rec)
                parent = rec.id
            self.chains.append(chain)
            batch.extend(chain)
            n_records -= len(chain)
            if len(batch) >= 50_000 or n_records <= 0:
                todo, batch = batch, []
                ix.write(lambda txn: [ix.insert(txn, r) for r in todo])
        return time.perf_counter() - t

    def make_files(self, n_chains: int) -> None:
        """Real files for the next oldest chains (the ones eviction will take)."""
        blob = b"\0" * self.block_bytes
        end = min(len(self.chains), self.files_upto + n_chains)
        for chain in self.chains[self.files_upto:end]:
            for rec in chain:
                p = self.store.file_path(rec)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(blob)
        self.files_upto = end


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _ms(xs: list[float]) -> dict:
    return {"median_ms": round(statistics.median(xs) * 1e3, 3),
            "p90_ms": round(float(np.percentile(xs, 90)) * 1e3, 3)}


def stage(store: DiskStore, ns: bytes, filler: Filler, repeats: int, seq: list[int]) -> dict:
    def new_snapshot():
        seq[0] += 1
        toks = [3 + (seq[0] * 7919 + i) % 60000 for i in range(72)]
        return toks, [_kv(toks)]

    store.disk_bytes = None
    snaps = [new_snapshot() for _ in range(repeats)]
    it = iter(snaps)
    save = _timed(lambda: store.save(ns, *next(it)), repeats)
    filler.make_files(repeats * 5 // CHAIN + 4)
    S = filler.block_bytes
    evicted = []
    evict = _timed(lambda: evicted.append(len(store.evict_to(store.total_bytes() - 5 * S))), repeats)
    ix = store.index
    rng = np.random.default_rng(seq[0])

    def index_save():
        now, parent, recs = time.time(), rng.bytes(16), []
        for i in range(5):
            toks = rng.integers(3, 1 << 16, B, dtype=np.uint32).astype("<u4").tobytes()
            recs.append(Record(rng.bytes(16), KIND_BLOCK, ns, parent, S, 0, now, now, 0, (i + 1) * B, toks))
            parent = recs[-1].id

        def fn(txn):
            for r in recs:  # the save's "stored already?" checks, then its commit's inserts
                ix.get(txn, r.id)
            for r in recs:
                ix.insert(txn, r)

        ix.dry_run(fn)

    save_ix = _timed(index_save, repeats)
    choose = _timed(lambda: ix.dry_run(lambda txn: ix.evict_lru(txn, ix.total_bytes(txn) - 5 * S)), repeats)
    filler.make_files(repeats * 6 // CHAIN + 4)
    store.disk_bytes = store.total_bytes()
    snaps = [new_snapshot() for _ in range(repeats)]
    it = iter(snaps)
    over = _timed(lambda: store.save(ns, *next(it)), repeats)
    store.disk_bytes = None
    with store.index.read() as txn:
        t = time.perf_counter()
        n = sum(1 for _ in store.index.scan(txn))
        scan = time.perf_counter() - t
    return {"records": n, "save": _ms(save), "evict": _ms(evict), "evicted_per_call": statistics.median(evicted),
            "evict_index_only": _ms(choose), "save_index_only": _ms(save_ix),
            "save_over_budget": _ms(over), "full_scan_ms": round(scan * 1e3, 1)}


def paired(work: Path, sizes: list[int], repeats: int) -> list[dict]:
    """One store per size, then the same operations interleaved round by round, so
    every size sees the same machine load (this VM's disk is shared: fsync times
    swing by 10x within minutes, which a size-by-size run would blame on size)."""
    stores = []
    for n in sizes:
        store, ns, filler = _new_store(work / f"paired-{n}")
        filler.grow(n - store.n_records())
        filler.make_files(repeats * 11 // CHAIN + 4)
        stores.append((n, store, ns, filler))
        print(f"paired: built {n} records", file=sys.stderr)
    times = {n: {"save": [], "evict": [], "save_over_budget": []} for n in sizes}
    counter = [10**9]
    for r in range(repeats):
        for n, store, ns, filler in stores[r % len(stores):] + stores[: r % len(stores)]:
            store.disk_bytes = None
            toks, cache = _snapshot(counter)
            t0 = time.perf_counter()
            store.save(ns, toks, cache)
            times[n]["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.evict_to(store.total_bytes() - 5 * filler.block_bytes)
            times[n]["evict"].append(time.perf_counter() - t0)
            store.disk_bytes = store.total_bytes()
            toks, cache = _snapshot(counter)
            t0 = time.perf_counter()
            store.save(ns, toks, cache)
            times[n]["save_over_budget"].append(time.perf_counter() - t0)
    out = []
    for n, store, ns, filler in stores:
        out.append({"records": store.n_records(), **{k: _ms(v) for k, v in times[n].items()}})
        store.close()
    return out


def _snapshot(counter: list[int]):
    counter[0] += 1
    toks = [3 + (counter[0] * 7919 + i) % 60000 for i in range(72)]
    return toks, [_kv(toks)]


def _new_store(path: Path):
    store = DiskStore(path, block_size=B)
    ns = store.register_namespace(FILES_FP, [{"class": "KVCache", "dtype": "F32"}], {"bench": "scale"})
    probe = [3 + i for i in range(B)]
    store.save(ns, probe, [_kv(probe)])
    block_bytes = store.total_bytes()
    store.clear()
    store.save(ns, HIT, [_kv(HIT)])  # the chain the start-up lookup will hit
    return store, ns, Filler(store, ns, block_bytes)


_START = r"""
import json, sys, time
t0 = time.perf_counter()
from tiercache.store.disk import DiskStore
t1 = time.perf_counter()
store = DiskStore(sys.argv[1])
(ns,) = store.namespaces_for_files(bytes.fromhex(sys.argv[2]))
store.layer_desc(ns)
t2 = time.perf_counter()
q = json.loads(sys.argv[3])
plan = store.longest_prefix(ns, q, limit=len(q) - 1)
cache, n = store.fetch(ns, q, limit=len(q) - 1, plan=plan)
t3 = time.perf_counter()
assert n == len(q) - 1, n
print(json.dumps({"import_s": t1 - t0, "open_and_namespace_s": t2 - t1, "first_lookup_s": t3 - t2,
                  "records": store.n_records(), "tokens": n}))
"""


def start_and_first_lookup(path: Path, prompt: list[int]) -> dict:
    q = prompt + [1]
    out = subprocess.run([sys.executable, "-c", _START, str(path), FILES_FP.hex(), json.dumps(q)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    lines = [
        "| records | save median (p90) ms | save, index only, median (p90) ms | evict 5 median (p90) ms "
        "| evict 5, index only, median (p90) ms "
        "| save over budget median (p90) ms | full scan ms (old eviction floor) | build s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["stages"]:
        lines.append(
            f"| {r['records']:,} | {r['save']['median_ms']} ({r['save']['p90_ms']}) | "
            f"{r['save_index_only']['median_ms']} ({r['save_index_only']['p90_ms']}) | "
            f"{r['evict']['median_ms']} ({r['evict']['p90_ms']}) | "
            f"{r['evict_index_only']['median_ms']} ({r['evict_index_only']['p90_ms']}) | "
            f"{r['save_over_budget']['median_ms']} ({r['save_over_budget']['p90_ms']}) | "
            f"{r['full_scan_ms']:,} | {r['build_s']:.1f} |")
    if res.get("paired"):
        lines += ["", "Paired run: one store per size, operations interleaved round by round (same load for all):",
                  "", "| records | save median (p90) ms | evict 5 median (p90) ms | save over budget median (p90) ms |",
                  "|---:|---:|---:|---:|"]
        for r in res["paired"]:
            lines.append(f"| {r['records']:,} | {r['save']['median_ms']} ({r['save']['p90_ms']}) | "
                         f"{r['evict']['median_ms']} ({r['evict']['p90_ms']}) | "
                         f"{r['save_over_budget']['median_ms']} ({r['save_over_budget']['p90_ms']}) |")
    s = res.get("start")
    if s:
        lines += ["", f"At {s['records']:,} records, fresh process: store open + namespace lookup "
                  f"{s['open_and_namespace_s'] * 1e3:.1f} ms, first lookup ({s['tokens']} tokens: chain walk "
                  f"+ restore) {s['first_lookup_s'] * 1e3:.1f} ms, total "
                  f"{(s['open_and_namespace_s'] + s['first_lookup_s']) * 1e3:.1f} ms "
                  f"(importing tiercache: {s['import_s'] * 1e3:.0f} ms)."]
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    plt = C.plt()
    if plt is None:
        return
    panels = [("sequential: one store grown through the sizes", res["stages"], True)]
    if res.get("paired"):
        panels.append(("paired: one store per size, interleaved", res["paired"], False))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.4), squeeze=False)
    for ax, (title, rows, extra) in zip(axes[0], panels):
        if not rows:
            continue
        xs = [r["records"] for r in rows]
        series = [("save", "save (no eviction)"), ("evict", "evict 5 records"),
                  ("save_over_budget", "save over budget (save + evict)")]
        if extra:
            series += [("save_index_only", "save, index only (aborted txn)"),
                       ("evict_index_only", "evict 5, index only (aborted txn)")]
        for key, label in series:
            ax.plot(xs, [r[key]["median_ms"] for r in rows], marker="o", label=label)
        if extra:
            ax.plot(xs, [r["full_scan_ms"] for r in rows], marker="x", linestyle="--",
                    label="full index scan (previous eviction's floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("records in the store")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Disk tier at scale")
    fig.tight_layout()
    fig.savefig(out / "scale_bench.png", dpi=120)


def sequential(path: Path, sizes: list[int], repeats: int) -> dict:
    """Grow one store through the sizes, measuring at each (then start-up at the last)."""
    store, ns, filler = _new_store(path)
    seq = [0]
    res = {"block_bytes": filler.block_bytes, "stages": []}
    for n in sizes:
        build = filler.grow(n - store.n_records())
        st = stage(store, ns, filler, repeats, seq)
        st["build_s"] = build
        res["stages"].append(st)
        print(json.dumps(st), file=sys.stderr)
    store.close()
    res["start"] = start_and_first_lookup(path, HIT)
    res["index_mb"] = round(sum(p.stat().st_size for p in (path / "index.lmdb").iterdir()) / 1e6, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default="tools/bench/results")
    ap.add_argument("--work", default=None, help="folder for the store (default: a temp dir)")
    ap.add_argument("--paired", action="store_true",
                    help="also build one store per size and time them interleaved (same load for every size)")
    ap.add_argument("--paired-only", action="store_true",
                    help="only the paired run (start-up measured on its largest store)")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="tiercache-scale-"))
    path = work / "store"
    try:
        if args.paired_only:
            res = {"stages": [], "paired": paired(work, sizes, args.repeats)}
            res["start"] = start_and_first_lookup(work / f"paired-{sizes[-1]}", HIT)
        else:
            res = sequential(path, sizes, args.repeats)
            if args.paired:
                shutil.rmtree(path, ignore_errors=True)
                res["paired"] = paired(work, sizes, args.repeats)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res.update(machine=C.machine_info(),
               command="python -m tiercache.tools.bench.scale_bench " + " ".join(argv or sys.argv[1:]))
    out = Path(args.out)
    C.write_results(out, "scale_bench", res, markdown(res))
    plot(res, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

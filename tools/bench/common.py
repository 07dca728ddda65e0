"""Shared helpers for the tiercache benchmarks.

Every benchmark prints and records the same environment block: the machine
(platform, CPU count, RAM), the BLAS that MLX's CPU backend actually uses
(OpenBLAS preloaded or the bundled reference BLAS), the model shape and the load
average (the machine may be shared). Results go to ``OUT/<name>.json`` and
``OUT/<name>.md`` (plus ``OUT/<name>.png`` where a plot reads better).

TTFT everywhere is measured the same way (:func:`ttft`): fetch from the cache,
prefill the remainder in chunks (only the cache state is evaluated, like
mlx-lm's ``generate_step``), then one forward pass on the last token and the
argmax of its logits = the first generated token.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MODELS_HOME = Path(os.environ.get("TIERCACHE_BENCH_MODELS", "~/.cache/tiercache/bench-models")).expanduser()
PREFILL_STEP = 2048


# --------------------------------------------------------------------------- env


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def blas_in_use() -> str:
    """Which BLAS the process has mapped (call after importing mlx)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if "blas" in p.lower() and p.startswith("/"):
                    libs.add(p)
    except OSError:
        pass
    # numpy's own OpenBLAS (numpy.libs/scipy_openblas) is not what MLX calls
    open_ = sorted(p for p in libs if "libopenblas" in p.lower() and "numpy" not in p and "scipy" not in p)
    if open_:
        return f"OpenBLAS ({open_[0]}, via LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})"
    if libs:
        return f"reference BLAS bundled with mlx ({sorted(libs)[0]}) - SLOW; preload {OPENBLAS}"
    return "unknown"


def machine_info() -> dict:
    import mlx.core as mx  # noqa: F401  (maps the BLAS)

    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("mlx", "mlx-lm", "tiercache")}
    except Exception:
        versions = {}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "blas": blas_in_use(),
        "versions": versions,
        "loadavg_start": loadavg(),
    }


def machine_line(info: dict) -> str:
    return (
        f"{info['platform']} | {info['cpu']} x{info['cpu_count']} | RAM {info['ram_gb']} GB | "
        f"BLAS: {info['blas']} | load {info['loadavg_start']}"
    )


# --------------------------------------------------------------------------- models


def model_path(preset: str, model_dir: str | os.PathLike | None = None) -> Path:
    """Builds (once) and returns the folder of a demo-model preset."""
    from tiercache.demo_model import build_model

    base = Path(model_dir).expanduser() if model_dir else MODELS_HOME
    return build_model(base / preset, preset=preset, seed=0)


def load_model(path: Path):
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    return model, tok


def model_shape(path: Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "torch_dtype",
    )
    shape = {k: cfg.get(k) for k in keys if k in cfg}
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    shape["kv_bytes_per_token"] = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd * 4
    return shape


def shape_line(shape: dict) -> str:
    return (
        f"{shape.get('model_type')} L={shape.get('num_hidden_layers')} d={shape.get('hidden_size')} "
        f"heads={shape.get('num_attention_heads')}/{shape.get('num_key_value_heads')} "
        f"head_dim={shape.get('head_dim')} vocab={shape.get('vocab_size')} {shape.get('torch_dtype')} "
        f"KV={shape['kv_bytes_per_token'] / 1024:.0f} KiB/token"
    )


# --------------------------------------------------------------------------- timing


def prefill(model, cache: list, tokens: Sequence[int], step: int = PREFILL_STEP) -> int:
    """Runs ``tokens`` through the model into ``cache``; returns the argmax of the
    last position's logits (the first generated token). Earlier chunks only
    evaluate the cache state, so the LM head runs once."""
    import mlx.core as mx

    y = mx.array(list(tokens), dtype=mx.uint32)
    while y.size > 1:
        n = min(step, y.size - 1)
        model(y[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        y = y[n:]
    logits = model(y[None], cache=cache)
    first = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(first, [c.state for c in cache])
    return int(first.item())


def ttft(model, fetch: Callable[[Sequence[int]], tuple], tokens: Sequence[int]) -> dict:
    """Times fetch + prefill of the remainder + first token.

    ``fetch(tokens) -> (cache or None, remaining)``. An empty remainder (mlx-lm's
    ``LRUPromptCache`` on an exact hit) is handled by trimming one token off the
    cache and recomputing it, so every path produces a logit for the last token.
    Returns ``{"ttft", "fetch", "prefill", "cached", "prefilled", "cache"}``.
    """
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    tokens = list(tokens)
    t0 = time.perf_counter()
    cache, rest = fetch(tokens)
    rest = list(rest)
    if cache is None:
        cache = make_prompt_cache(model)
        rest = tokens
    elif not rest:
        trim_prompt_cache(cache, 1)
        rest = tokens[-1:]
    t1 = time.perf_counter()
    first = prefill(model, cache, rest)
    t2 = time.perf_counter()
    return {
        "ttft": t2 - t0,
        "fetch": t1 - t0,
        "prefill": t2 - t1,
        "cached": len(tokens) - len(rest),
        "prefilled": len(rest),
        "first_token": first,
        "cache": cache,
    }


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


# --------------------------------------------------------------------------- page cache


def drop_page_cache(paths: Sequence[Path], system: bool = True) -> str:
    """Evicts files from the OS page cache. Tries ``echo 3 > drop_caches`` (needs
    root outside a container), else ``posix_fadvise(DONTNEED)`` per file (evicts
    clean pages of those files without privileges). Returns the method used."""
    os.sync()
    why = "drop_caches not tried"
    if system:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "echo 3 > /proc/sys/vm/drop_caches"
        except OSError as e:
            why = f"drop_caches not permitted ({e.strerror})"
    n = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
    return f"{why}; posix_fadvise(DONTNEED) on {n} store files"


def resident_fraction(paths: Sequence[Path]) -> float | None:
    """Fraction of the files' pages that are in the page cache (mincore), or None."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    page = mmap.PAGESIZE
    tot = res = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                size = os.path.getsize(p)
                if size == 0:
                    continue
                with open(p, "rb") as f:
                    m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                cbuf = ctypes.c_char.from_buffer(m)
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(cbuf)), ctypes.c_size_t(size), vec)
                del cbuf
                m.close()
                if rc != 0:
                    return None
                tot += npages
                res += sum(v & 1 for v in bytes(vec))
    return res / tot if tot else None


# --------------------------------------------------------------------------- output


def fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "-"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("loadavg_end", loadavg())
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    env = result.get("machine")
    head = f"# {name}\n\n"
    if env:
        head += f"Machine: {machine_line(env)}; load at end {result['loadavg_end']}\n\n"
    if result.get("model_shape"):
        head += f"Model: {shape_line(result['model_shape'])}\n\n"
    if result.get("command"):
        head += f"Command: `{result['command']}`\n\n"
    (out / f"{name}.md").write_text(head + markdown + "\n")
    print(head + markdown)


def plt():
    """matplotlib.pyplot with the Agg backend, or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as p

        return p
    except ImportError:
        print("matplotlib not installed (pip install tiercache[bench]): no PNG")
        return None


def command_line() -> str:
    import sys

    pre = "LD_PRELOAD=" + os.environ["LD_PRELOAD"] + " " if os.environ.get("LD_PRELOAD") else ""
    return pre + "python -m " + Path(sys.argv[0]).with_suffix("").as_posix().split("/work/main/")[-1].replace("/", ".") + " " + " ".join(sys.argv[1:])

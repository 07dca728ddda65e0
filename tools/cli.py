"""``tiercache``: inspect, verify, manage and pre-warm a tiercache disk store.

Every command takes the store folder first. Output is JSON by default (one document
on stdout); ``--table`` prints an aligned table for people. Read-only commands open
the store read-only: LMDB readers never block (or get blocked by) a server writing
to the same folder. Write commands use ordinary LMDB write transactions, which are
safe beside a running server.

Exit codes: 0 success; 1 ``verify`` found problems that remain (or a declined
confirmation); 2 a usage error or an unusable store (missing folder, not a store,
newer format, corrupt index, bad ID, bad size...), reported as one line on stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from tiercache.errors import TiercacheError
from tiercache.tools.options import SIZE, CliError, setting_option
from tiercache.tools.prompts import prompt_tokens, read_prompts
from tiercache.tools.render import console, emit, human_size, human_time, iso, print_table, short

EXIT_PROBLEMS = 1


def _known_errors() -> tuple[type[BaseException], ...]:
    """Return the errors a command reports as one line: ours, bad arguments, I/O."""
    import lmdb

    return (TiercacheError, ValueError, lmdb.Error, OSError, KeyError)


class _Group(click.Group):
    """Turns library errors into one clean line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the command boundary
            if os.environ.get("TIERCACHE_DEBUG"):
                raise
            known = _known_errors()
            if isinstance(e, known):
                msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                raise CliError(msg or type(e).__name__) from None
            raise CliError(f"internal error: {type(e).__name__}: {e}") from None


# --- parsing --------------------------------------------------------------------------------


_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``30s``, ``30m``, ``12h``, ``7d``, ``2w`` (a bare number is seconds)."""
    total, rest = 0.0, str(text).strip()
    if not re.fullmatch(r"(\d+(?:\.\d+)?\s*[a-zA-Z]*\s*)+", rest):
        raise CliError(f"bad duration {text!r}: use e.g. 30m, 12h or 7d")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", rest)
    for n, unit in parts:
        unit = unit.lower() or "s"
        if unit not in _UNIT:
            raise CliError(f"bad duration {text!r}: unknown unit {unit!r} (s, m, h, d, w)")
        total += float(n) * _UNIT[unit]
    return total


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        return parse_duration(value)


DURATION = DurationType()


# --- store access -------------------------------------------------------------------------


def open_store(path: str, *, write: bool = False, create: bool = False, block_size: int | None = None,
               disk_bytes: int | None = None):
    """Opens a store for a command, refusing anything that isn't a tiercache store."""
    from tiercache.store.disk import BLOCKS_DIR, CHECKPOINTS_DIR, INDEX_DIR, DiskStore

    p = Path(path)
    if not create:
        if not p.exists():
            raise CliError(f"{p}: no such directory")
        if not p.is_dir():
            raise CliError(f"{p}: not a directory")
        if not (p / INDEX_DIR).exists():
            raise CliError(f"{p} is not a tiercache store (no {INDEX_DIR})")
    for sub in (INDEX_DIR, BLOCKS_DIR, CHECKPOINTS_DIR):
        if (p / sub).is_symlink():
            raise CliError(f"{p / sub} is a symlink: refusing to follow it out of the store")
    return DiskStore(p, readonly=not write, create=create, block_size=block_size, disk_bytes=disk_bytes)


def table_option(f):
    return click.option(
        "--table", "table", is_flag=True, default=False,
        help="Print an aligned table with human-readable sizes and times instead of JSON.",
    )(f)


def _want_table(ctx: click.Context, table: bool) -> bool:
    return table or bool((ctx.find_root().obj or {}).get("table"))


def _view_and_ns(store, namespace: str | None):
    from tiercache.admin import inspect as I

    view = I.load_view(store)
    ns = I.resolve_namespace(view, namespace) if namespace else None
    return view, ns


# --- the group ----------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--table", is_flag=True, default=False, help="Tables instead of JSON for every command.")
@click.version_option(package_name="tiercache", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, table: bool) -> None:
    """Inspect, verify, manage and pre-warm a tiercache disk store (DIR).

    Output is JSON unless --table is given. Read-only commands (stats, ls, show,
    verify without --fix, export) never disturb a server using the same DIR.
    """
    ctx.ensure_object(dict)
    ctx.obj["table"] = table


@main.command()
@click.argument("dir", required=False)
@click.option("--budget", type=SIZE, default=None, metavar="SIZE",
              help="Disk budget to report use against (e.g. 20GiB), if the store doesn't record one.")
@click.option("--remote-url", "remote_url", default=None, metavar="URL",
              help="Also (or only, without DIR) report what a remote tier holds: redis://, rediss://, unix://.")
@table_option
@click.pass_context
def stats(ctx, dir, budget, remote_url, table):
    """Per-namespace statistics, then totals.

    For each namespace: its model, blocks, tails, checkpoints, bytes, logical
    tokens stored vs physical tokens (the dedup ratio), oldest/newest access and
    hits (restores served). With --remote-url: records, kinds and bytes the
    Redis/Valkey server holds per namespace (SCAN, never KEYS).

    Example: tiercache stats ~/.cache/tiercache/store --table
    Example: tiercache stats --remote-url redis://cache-host:6379/0 --table
    """
    if dir is None and remote_url is None:
        raise CliError("give a store folder, --remote-url, or both")
    remote = _remote_stats(remote_url) if remote_url is not None else None
    if dir is None:
        emit({"remote": remote}, _want_table(ctx, table), lambda d: _render_remote(d["remote"]))
        return
    _disk_stats(ctx, dir, budget, table, remote)


def _remote_stats(url: str) -> dict:
    from tiercache.remote.client import check_url
    from tiercache.remote.stats import RemoteStatsError, remote_stats

    try:
        return remote_stats(check_url(url))
    except (ValueError, RemoteStatsError) as e:
        raise CliError(str(e)) from None


def _render_remote(d: dict) -> None:
    rows = [{
        "ns": e["namespace"][:12] if e["namespace"] != "TOTAL" else "TOTAL",
        "records": e["records"], "blocks": e["blocks"], "ckpts": e["checkpoints"] + e["tails"],
        "foreign": e["foreign"], "size": human_size(e["bytes"]),
    } for e in d["namespaces"] + [d["total"]]]
    print_table([("namespace", "ns"), ("records", "records"), ("blocks", "blocks"),
                 ("ckpts/tails", "ckpts"), ("foreign", "foreign"), ("size", "size")],
                rows, title=f"remote {d['url']}")


def _disk_stats(ctx, dir, budget, table, remote) -> None:
    from tiercache.admin import inspect as I

    with open_store(dir) as store:
        data = I.store_stats(store, I.load_view(store), budget=budget)
    for e in data["namespaces"] + [data["total"]]:
        e["oldest_access_iso"], e["newest_access_iso"] = iso(e["oldest_access"]), iso(e["newest_access"])

    def render(d):
        now = time.time()
        rows = []
        for e in d["namespaces"] + [dict(d["total"], namespace="TOTAL", model="")]:
            rows.append({
                "ns": e["namespace"][:12] if e["namespace"] != "TOTAL" else "TOTAL",
                "model": Path(e["model"]).name if e.get("model") else ("?" if e["namespace"] != "TOTAL" else ""),
                "blocks": e["blocks"], "ckpts": e["checkpoints"] + e["tails"], "prefixes": e["prefixes"],
                "size": human_size(e["bytes"]), "logical": e["logical_tokens"], "physical": e["physical_tokens"],
                "dedup": "-" if e["dedup_ratio"] is None else f"{e['dedup_ratio']:.2f}x",
                "oldest": human_time(e["oldest_access"], now), "newest": human_time(e["newest_access"], now),
                "hits": e["hits"],
            })
        t = d["total"]
        budget_s = (f"{human_size(t['budget_bytes'])} ({100 * t['budget_used']:.1f}% used)"
                    if t["budget_bytes"] else "none recorded")
        print_table(
            [("namespace", "ns"), ("model", "model"), ("blocks", "blocks"), ("ckpts/tails", "ckpts"),
             ("prefixes", "prefixes"), ("size", "size"), ("logical tok", "logical"), ("physical tok", "physical"),
             ("dedup", "dedup"), ("oldest", "oldest"), ("newest", "newest"), ("hits", "hits")],
            rows,
            title=f"{d['path']}  format {d['format_version']}, block size {d['block_size']}, budget {budget_s}",
        )
        if d.get("remote") is not None:
            _render_remote(d["remote"])

    if remote is not None:
        data["remote"] = remote
    emit(data, _want_table(ctx, table), render)


@main.command()
@click.argument("dir")
@click.option("--namespace", "-n", default=None, metavar="NS", help="Only this namespace (hex, or a unique prefix).")
@click.option("--sort", "sort", type=click.Choice(["recent", "size", "hits", "tokens"]), default="recent",
              show_default=True, help="Order of the prefixes.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most N prefixes.")
@click.option("--words", type=click.IntRange(min=1), default=12, show_default=True,
              help="Words of decoded text to show per prefix.")
@table_option
@click.pass_context
def ls(ctx, dir, namespace, sort, limit, words, table):
    """List the stored prefixes (snapshot ends).

    A stored prefix is where a restore can end: a tail or checkpoint record, or a
    block with no children. Shows its ID (use it with show/export), token count,
    bytes of its whole chain, last access, hits and the first words of its text
    (when the model's tokenizer is found at the path recorded in the store; token
    ids otherwise).

    Example: tiercache ls ~/.cache/tiercache/store --sort size --limit 20 --table
    """
    from tiercache.admin import inspect as I

    with open_store(dir) as store:
        view, ns = _view_and_ns(store, namespace)
        dec = I.TextDecoder(view)
        rows = I.sort_rows([I.prefix_row(view, r, dec, words) for r in I.snapshot_ends(view, ns)], sort)
    if limit is not None:
        rows = rows[:limit]
    for r in rows:
        r["last_access_iso"] = iso(r["last_access"])

    def render(rows):
        now = time.time()
        print_table(
            [("id", "id8"), ("kind", "kind"), ("tokens", "tokens"), ("size", "size"), ("last access", "when"),
             ("hits", "hits"), ("text", "text")],
            [dict(r, id8=r["id"][:12], size=human_size(r["bytes"]), when=human_time(r["last_access"], now),
                  text=short(r.get("text") if "text" in r else r.get("token_ids")))
             for r in rows],
        )

    emit(rows, _want_table(ctx, table), render)


SHOW_CHARS = 200
"""Characters of decoded text ``show`` prints unless ``--full``."""
SHOW_TOKEN_IDS = 50
"""Token ids ``show`` prints (when the text can't be decoded) unless ``--full``."""


def _shorten_text(data: dict) -> None:
    """Cut ``show``'s text (or token ids) to its start; say how much there is."""
    if "text" in data:
        data["text_chars"] = len(data["text"])
        data["text_truncated"] = len(data["text"]) > SHOW_CHARS
        data["text"] = data["text"][:SHOW_CHARS]
    elif "token_ids" in data:
        data["text_truncated"] = len(data["token_ids"]) > SHOW_TOKEN_IDS
        data["token_ids"] = data["token_ids"][:SHOW_TOKEN_IDS]


@main.command()
@click.argument("dir")
@click.argument("id")
@click.option("--full", is_flag=True, default=False,
              help=f"Print the whole text (default: the first {SHOW_CHARS} characters).")
@table_option
@click.pass_context
def show(ctx, dir, id, full, table):
    """Show one stored prefix: its chain of blocks, token count, decoded text (or
    token ids), files, sizes, checksums and the checkpoints along it.

    ID is a record id from `ls` (any unique prefix of at least 8 hex digits).
    The text is cut to its first characters (system prompts run to tens of
    thousands of tokens) unless --full is given.

    Example: tiercache show ~/.cache/tiercache/store 3fa2c81d
    """
    from tiercache.admin import inspect as I

    with open_store(dir) as store:
        view = I.load_view(store)
        rec = I.resolve_id(view, id)
        data = I.prefix_detail(store, view, rec, I.TextDecoder(view))
    if not full:
        _shorten_text(data)

    def render(d):
        now = time.time()
        con = console()
        con.print(f"prefix {d['id']}  ({d['kind']}, {d['tokens']} tokens, {human_size(d['bytes'])}, "
                  f"last access {human_time(d['last_access'], now)}, {d['hits']} hits)")
        con.print(f"namespace {d['namespace']}  model {d.get('model') or '?'}")
        if d.get("broken"):
            con.print(f"BROKEN: {d['broken']}")
        print_table(
            [("record", "id"), ("kind", "kind"), ("tokens", "range"), ("size", "size"), ("checksum", "checksum"),
             ("file", "file"), ("state", "file_state"), ("hits", "hits")],
            [dict(r, range=f"{r['start']}-{r['end']}", size=human_size(r["bytes"])) for r in d["chain"]],
        )
        if d["checkpoints"]:
            con.print("other restore points along this chain: "
                      + ", ".join(f"{c['kind']} @{c['position']} {c['id'][:12]}" for c in d["checkpoints"]))
        what = "text" if "text" in d else "token ids"
        if d.get("text_truncated"):
            total = f"{d['text_chars']} characters" if "text" in d else f"{d['tokens']} ids"
            what += f" (the start of {total}; --full prints all)"
        con.print(what + ":", markup=False)
        con.print(d["text"] if "text" in d else json.dumps(d["token_ids"]), markup=False)

    emit(data, _want_table(ctx, table), render)


_RECORD_PROBLEMS = {"missing_file", "size_mismatch", "checksum_mismatch", "dangling_parent", "missing_link"}


def _settled(store, problems, temp_grace: float):
    """Drops what a concurrent writer explains: a file renamed into place whose
    record isn't committed yet (younger than the grace), or a record evicted since."""

    now = time.time()
    out = []
    with store.index.read() as txn:
        for p in problems:
            if p.kind == "orphan_file":
                path = Path(p.target)
                try:
                    young = now - path.lstat().st_mtime < temp_grace
                except FileNotFoundError:
                    continue
                stem = path.name.split(".")[0]
                try:
                    committed = store.index.get(txn, bytes.fromhex(stem)) is not None
                except ValueError:
                    committed = False
                if young or committed:
                    continue
            elif p.kind in _RECORD_PROBLEMS:
                try:
                    rid = bytes.fromhex(p.target)
                except ValueError:
                    rid = None
                if rid is not None and not store.index.has(txn, rid):
                    continue
            out.append(p)
    return out


@main.command()
@click.argument("dir")
@click.option("--fix", is_flag=True, help="Repair what is found (index first, then files).")
@click.option("--temp-grace", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Temp and unindexed files younger than this belong to a running writer and are left alone.")
@table_option
@click.pass_context
def verify(ctx, dir, fix, temp_grace, table):
    """Check the store: orphan/missing/corrupt files, broken chains, leftover temp
    files, byte-accounting drift. Prints each problem.

    Exits 0 when clean, 1 when problems remain (after --fix: when the repair
    could not clear them).

    Example: tiercache verify ~/.cache/tiercache/store --fix
    """
    with open_store(dir, write=fix) as store:
        found = _settled(store, store.check(fix=False, temp_grace=temp_grace), temp_grace)
        remaining = found
        if fix and found:
            store.check(fix=True, temp_grace=temp_grace)
            remaining = _settled(store, store.check(fix=False, temp_grace=temp_grace), temp_grace)
    data = {
        "clean": not remaining,
        "problems": [p.to_dict() for p in found],
        "fixed": bool(fix and found),
        "remaining": [p.to_dict() for p in remaining],
    }

    def render(d):
        con = console()
        if d["problems"]:
            print_table([("problem", "kind"), ("target", "target"), ("detail", "detail")], d["problems"])
        if d["clean"]:
            con.print("clean" if not d["problems"] else f"fixed {len(d['problems'])} problem(s); now clean")
        else:
            con.print(f"{len(d['remaining'])} problem(s) remain" + ("" if fix else " (run with --fix to repair)"))

    emit(data, _want_table(ctx, table), render)
    if remaining:
        ctx.exit(EXIT_PROBLEMS)


@main.command()
@click.argument("dir")
@click.option("--to", "to", type=SIZE, default=None, metavar="SIZE",
              help="Evict least recently used prefixes (leaves first) until the store holds at most SIZE (512MiB, 2GB...).")
@click.option("--namespace", "-n", default=None, metavar="NS", help="Evict everything of this namespace.")
@click.option("--older-than", "older_than", type=DURATION, default=None, metavar="DURATION",
              help="Evict what was last used longer ago than this (30m, 12h, 7d); with --namespace, only there.")
@table_option
@click.pass_context
def evict(ctx, dir, to, namespace, older_than, table):
    """Evict cached prefixes by size, namespace or age.

    Exactly one of --to, --namespace or --older-than (--namespace may narrow
    --older-than). A block is never evicted while a longer prefix built on it
    stays. Safe while a server uses the store.

    Example: tiercache evict ~/.cache/tiercache/store --older-than 7d
    """
    from tiercache.admin import inspect as I

    if to is None and namespace is None and older_than is None:
        raise click.UsageError("give one of --to SIZE, --namespace NS or --older-than DURATION")
    if to is not None and (namespace is not None or older_than is not None):
        raise click.UsageError("--to can't be combined with --namespace or --older-than")
    with open_store(dir, write=True) as store:
        before = store.total_bytes()
        if to is not None:
            removed = store.evict_to(to)
        else:
            view, ns = _view_and_ns(store, namespace)
            if older_than is not None:
                ids = I.records_older_than(view, time.time() - older_than, ns)
            else:
                ids = [r.id for r in view.records.values() if r.namespace == ns]
            removed = store.remove_records(ids)
        after = store.total_bytes()
    data = {"evicted_records": len(removed), "evicted_bytes": sum(r.nbytes for r in removed),
            "bytes_before": before, "bytes_after": after}
    emit(data, _want_table(ctx, table), lambda d: print_table(
        [("evicted records", "evicted_records"), ("evicted", "e"), ("before", "b"), ("after", "a")],
        [dict(d, e=human_size(d["evicted_bytes"]), b=human_size(d["bytes_before"]), a=human_size(d["bytes_after"]))]))


@main.command()
@click.argument("dir")
@click.option("--namespace", "-n", default=None, metavar="NS", help="Only clear this namespace.")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@table_option
@click.pass_context
def clear(ctx, dir, namespace, yes, table):
    """Remove every stored prefix (of one namespace). Asks first unless --yes.

    Namespace descriptions are kept, so a running server keeps working.

    Example: tiercache clear ~/.cache/tiercache/store --yes
    """
    with open_store(dir, write=True) as store:
        view, ns = _view_and_ns(store, namespace)
        n = sum(1 for r in view.records.values() if ns is None or r.namespace == ns)
        size = sum(r.nbytes for r in view.records.values() if ns is None or r.namespace == ns)
        what = f"namespace {ns.hex()}" if ns else "the whole store"
        if n and not yes:
            click.confirm(f"Remove {n} records ({human_size(size)}) from {what} in {dir}?", abort=True, err=True)
        removed = store.clear(ns)
        after = store.total_bytes()
    data = {"removed_records": removed, "namespace": ns.hex() if ns else None, "bytes_after": after}
    emit(data, _want_table(ctx, table), lambda d: print_table(
        [("removed records", "removed_records"), ("namespace", "ns"), ("bytes after", "a")],
        [dict(d, ns=d["namespace"] or "all", a=human_size(d["bytes_after"]))]))


@main.command("export")
@click.argument("dir")
@click.argument("id")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--follow-symlinks", is_flag=True,
              help="If OUT is a symlink, write its target (refused by default).")
@table_option
@click.pass_context
def export_cmd(ctx, dir, id, out, follow_symlinks, table):
    """Write stored prefix ID as an mlx-lm prompt-cache file (OUT.safetensors).

    mlx_lm.models.cache.load_prompt_cache reads it; the file's metadata carries
    the token ids, the namespace and the tiercache format. OUT is written to a
    temp file and renamed; OUT inside any tiercache store is refused.

    Example: tiercache export ~/.cache/tiercache/store 3fa2c81d prompt.safetensors
    """
    from tiercache.admin.interop import export_mlx_lm

    with open_store(dir) as store:
        res = export_mlx_lm(store, id, out, follow_symlinks=follow_symlinks)
    data = dict(vars(res))
    emit(data, _want_table(ctx, table), lambda d: print_table(
        [("file", "path"), ("tokens", "tokens"), ("namespace", "namespace"), ("size", "s")],
        [dict(d, s=human_size(d["bytes"]))]))


@main.command("import")
@click.argument("dir")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--model", "model", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The local model folder the cache was computed with.")
@click.option("--tokens", default=None, metavar="JSON",
              help="Token ids the cache holds: a JSON list, or a file holding one "
                   "(default: the ids recorded by `tiercache export`).")
@setting_option("block_size")
@table_option
@click.pass_context
def import_cmd(ctx, dir, file, model, tokens, block_size, table):
    """Store an mlx-lm prompt-cache FILE under the model's namespace.

    Only mlx-lm cache classes on tiercache's allow-list are ever built from the
    file. Creates DIR as a new store if it doesn't exist.

    Example: tiercache import ~/.cache/tiercache/store prompt.safetensors --model ./demo-model
    """
    from tiercache.admin.interop import import_mlx_lm

    if tokens is not None and not tokens.lstrip().startswith("["):
        tp = Path(tokens)
        if not tp.is_file():
            raise CliError(f"--tokens: not a JSON list and no such file: {tokens}")
        tokens = tp.read_text()
    with open_store(dir, write=True, create=not Path(dir).exists(), block_size=block_size) as store:
        res = import_mlx_lm(store, file, model, tokens=tokens)
    data = dict(vars(res))
    emit(data, _want_table(ctx, table), lambda d: print_table(
        [("namespace", "namespace"), ("tokens", "tokens"), ("records written", "records_written"),
         ("written", "w"), ("already stored", "records_skipped")],
        [dict(d, w=human_size(d["bytes_written"]))]))


@main.command()
@click.argument("dir")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="The local mlx-lm model folder to prefill with.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False, path_type=str),
              help='JSONL: {"messages": [...]} (chat template applied), {"text": "..."} or plain strings.')
@setting_option("prefill_step_size")  # the server's variable too, so hybrid models hit exactly
@setting_option("block_size")
@setting_option("disk_bytes")
@table_option
@click.pass_context
def warm(ctx, dir, model_path, prompts, prefill_step_size, block_size, disk_bytes, table):
    """Prefill prompts into the store ahead of time, skipping what is cached.

    Each prompt is tokenized like the server does, its tokens but the last are
    prefilled from a fresh cache in --prefill-step-size chunks (the server's own
    chunking, so restores are exact for hybrid models too) and saved. A request
    for the prompt then restores all but its last token from disk.

    Example: tiercache warm ~/.cache/tiercache/store --model ./demo-model --prompts prompts.jsonl
    """
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    from tiercache.tiers.checkpoints import CheckpointPolicy, prefill_with_checkpoints
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from tiercache.store.namespaces import model_namespace

    if disk_bytes == 0:  # one meaning everywhere: the server refuses 0 the same way
        raise click.BadParameter("must be greater than 0 (omit it for no budget)", param_hint="--disk-bytes")
    items = read_prompts(prompts)
    t0 = time.time()
    model, tokenizer = mlx_lm.load(model_path)
    summary = {"prompts": len(items), "warmed": 0, "skipped_cached": 0, "skipped_short": 0,
               "tokens_prefilled": 0, "records_written": 0, "bytes_written": 0}
    with open_store(dir, write=True, create=True, block_size=block_size, disk_bytes=disk_bytes) as store:
        ns = model_namespace(store, model_path, model)
        summary["namespace"] = ns.hex()
        progress = Progress(TextColumn("warming"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console(stderr=True), disable=not sys.stderr.isatty())
        with progress:
            task = progress.add_task("warm", total=len(items))
            for item in items:
                rendered = prompt_tokens(tokenizer, item, need_user_start=True)
                toks = rendered.tokens
                target = toks[:-1]
                if not target:
                    summary["skipped_short"] += 1
                elif store.longest_prefix(ns, toks, limit=len(target)).n_tokens >= len(target):
                    summary["skipped_cached"] += 1
                else:
                    cache = make_prompt_cache(model)
                    if can_trim_prompt_cache(cache):
                        for s in range(0, len(target), prefill_step_size):
                            model(mx.array(target[s : s + prefill_step_size])[None], cache=cache)
                            mx.eval([c.state for c in cache])
                        snaps = {len(target): cache}
                    else:
                        # Recurrent state depends on where prefill splits: split and
                        # snapshot exactly where the server would (checkpoints.py).
                        user_start = rendered.user_start
                        policy = CheckpointPolicy(min_tokens=store.block_size)
                        stops = policy.stops(prompt_len=len(toks), user_start=user_start, trimmable=False)
                        stops = sorted(set(stops) | {len(target)})
                        snaps = prefill_with_checkpoints(model, cache, target, stops, prefill_step_size, offset=0)
                    for pos in sorted(snaps):
                        res = store.save(ns, toks[:pos], snaps[pos])
                        summary["records_written"] += res.records_written
                        summary["bytes_written"] += res.bytes_written
                    summary["warmed"] += 1
                    summary["tokens_prefilled"] += len(target)
                progress.advance(task)
        summary["store_bytes"] = store.total_bytes()
    summary["seconds"] = round(time.time() - t0, 3)
    emit(summary, _want_table(ctx, table), lambda d: print_table(
        [("prompts", "prompts"), ("warmed", "warmed"), ("already cached", "skipped_cached"),
         ("tokens", "tokens_prefilled"), ("written", "w"), ("store", "s"), ("seconds", "seconds")],
        [dict(d, w=human_size(d["bytes_written"]), s=human_size(d["store_bytes"]))]))


if __name__ == "__main__":  # pragma: no cover
    main()

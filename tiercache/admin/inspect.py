"""Read-side queries over a :class:`tiercache.store.disk.DiskStore` for the tools CLI.

Everything here works from one consistent LMDB read snapshot (:func:`load_view`),
so it is safe to run while a server writes to the same store: LMDB readers never
block the writer and always see a committed state.

Vocabulary:

* a **stored prefix** (snapshot end) is a record a restore can end at: a tail or a
  checkpoint record, or a block that has no children. Its id is the record id.
* its **chain** is the list of records from the chain root down to it; the tokens
  it restores are the concatenated tokens of the chain.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..store.disk import DiskStore, RestorePlan
from ..store.index import KIND_BLOCK, KIND_CHECKPOINT, KIND_NAMES, KIND_TAIL, Record
from ..store.hashing import unpack_tokens
from ..store import layers as L

MIN_ID_PREFIX = 8


@dataclass
class StoreView:
    """Every record, child link and namespace of a store, read in one snapshot."""

    records: dict[bytes, Record] = field(default_factory=dict)
    children: dict[bytes, list[bytes]] = field(default_factory=dict)
    namespaces: dict[bytes, dict] = field(default_factory=dict)
    total_bytes: int = 0
    undecodable: int = 0
    _chain_bytes: dict[bytes, int] | None = None

    def chain_bytes(self, rid: bytes) -> int:
        """Bytes of a record's whole chain (itself and every ancestor present)."""
        if self._chain_bytes is None:
            cum: dict[bytes, int] = {}
            # Parents come before children: blocks have smaller positions than
            # their children; a tail/checkpoint may share its parent's position.
            for r in sorted(self.records.values(), key=lambda r: (r.position, r.kind != KIND_BLOCK)):
                cum[r.id] = r.nbytes + (cum.get(r.parent, 0) if r.start > 0 else 0)
            self._chain_bytes = cum
        return self._chain_bytes.get(rid, 0)


def load_view(store: DiskStore) -> StoreView:
    """Reads the whole index in one read transaction."""
    view = StoreView()
    ix = store.index
    with ix.read() as txn:
        for rid, rec in ix.scan(txn):
            if rec is not None:
                view.records[rid] = rec
            else:
                view.undecodable += 1
        for parent, child in ix.child_links(txn):
            view.children.setdefault(parent, []).append(child)
        view.namespaces = ix.all_namespaces(txn)
        view.total_bytes = ix.total_bytes(txn)
    return view


def is_end(view: StoreView, rec: Record) -> bool:
    """True for a snapshot end: a tail/checkpoint, or a block without children."""
    if rec.kind != KIND_BLOCK:
        return True
    return not any(c in view.records for c in view.children.get(rec.id, ()))


def snapshot_ends(view: StoreView, namespace: bytes | None = None) -> list[Record]:
    return [
        r
        for r in view.records.values()
        if (namespace is None or r.namespace == namespace) and is_end(view, r)
    ]


def chain_of(view: StoreView, rec: Record) -> list[Record]:
    """Records from the chain root to ``rec`` (inclusive).

    Raises:
        ValueError: if an ancestor is missing (the prefix can't be restored).
    """
    out = [rec]
    cur = rec
    while cur.start > 0:
        parent = view.records.get(cur.parent)
        if parent is None or parent.kind != KIND_BLOCK or parent.position != cur.start:
            raise ValueError(f"prefix {rec.id.hex()} is broken: block {cur.parent.hex()} is missing")
        out.append(parent)
        cur = parent
    out.reverse()
    return out


def chain_tokens(chain: Iterable[Record]) -> list[int]:
    toks: list[int] = []
    for r in chain:
        toks.extend(unpack_tokens(r.tokens))
    return toks


def resolve_id(view: StoreView, text: str) -> Record:
    """The record named by a full id or a unique hex prefix of >= 8 characters.

    Raises:
        ValueError: bad hex, too short, unknown or ambiguous.
    """
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]+", t or "-"):
        raise ValueError(f"bad ID {text!r}: expected hex digits")
    if len(t) < MIN_ID_PREFIX:
        raise ValueError(f"ID {text!r} is too short: give at least {MIN_ID_PREFIX} hex digits")
    if len(t) > 32:
        raise ValueError(f"bad ID {text!r}: longer than 32 hex digits")
    if len(t) == 32:
        rec = view.records.get(bytes.fromhex(t))
        if rec is None:
            raise ValueError(f"no stored prefix with ID {t}")
        return rec
    hits = [r for rid, r in view.records.items() if rid.hex().startswith(t)]
    if not hits:
        raise ValueError(f"no stored prefix with ID {t}")
    if len(hits) > 1:
        raise ValueError(f"ID {t} is ambiguous ({len(hits)} records match): give more digits")
    return hits[0]


def resolve_namespace(view: StoreView, text: str) -> bytes:
    """A namespace from its hex (or a unique prefix of >= 8 hex digits)."""
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,32}", t):
        raise ValueError(f"bad namespace {text!r}: expected 8 to 32 hex digits")
    known = set(view.namespaces) | {r.namespace for r in view.records.values()}
    hits = [ns for ns in known if ns.hex().startswith(t)]
    if not hits:
        raise ValueError(f"no namespace {t} in this store")
    if len(hits) > 1:
        raise ValueError(f"namespace {t} is ambiguous: give more digits")
    return hits[0]


def plan_for(store: DiskStore, view: StoreView, rec: Record) -> RestorePlan:
    """A restore plan ending exactly at ``rec``.

    Raises:
        ValueError: broken chain, or a block end in a namespace whose layers need a
            checkpoint (only checkpoints restore such models).
    """
    chain = chain_of(view, rec)
    desc = view.namespaces.get(rec.namespace, {}).get("layers")
    if desc is None:
        desc = store.layer_desc(rec.namespace)
    if desc is None:
        raise ValueError(f"namespace {rec.namespace.hex()} has no description in the store")
    if not L.all_splittable(desc) and rec.kind != KIND_CHECKPOINT:
        raise ValueError(
            f"{rec.id.hex()} is a {KIND_NAMES[rec.kind]}: this model's cache can only be "
            "restored at a checkpoint"
        )
    plan = RestorePlan(rec.namespace, layer_desc=list(desc))
    if rec.kind == KIND_BLOCK:
        plan.chain, plan.last = chain, None
    else:
        plan.chain, plan.last = chain[:-1], rec
    plan.n_tokens = rec.position
    return plan


# --- text -------------------------------------------------------------------------------


class TextDecoder:
    """Decodes token ids with the tokenizer of a namespace's model folder, if found."""

    def __init__(self, view: StoreView):
        self.view = view
        self._tok: dict[bytes, Any] = {}

    def model_path(self, ns: bytes) -> str | None:
        return ((self.view.namespaces.get(ns) or {}).get("model") or {}).get("path")

    def tokenizer(self, ns: bytes):
        if ns not in self._tok:
            self._tok[ns] = _load_tokenizer(self.model_path(ns))
        return self._tok[ns]

    def decode(self, ns: bytes, tokens: list[int]) -> str | None:
        tok = self.tokenizer(ns)
        if tok is None:
            return None
        try:
            return tok.decode(tokens)
        except Exception:
            return None

    def preview(self, ns: bytes, tokens: list[int], words: int = 12) -> str | None:
        """The first words of the text (decoding at most a few tokens per word)."""
        text = self.decode(ns, tokens[: words * 6])
        if text is None:
            return None
        parts = text.split()
        out = " ".join(parts[:words])
        return out + (" …" if len(parts) > words or len(tokens) > words * 6 else "")


def _load_tokenizer(path: str | None):
    if not path:
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    tj = p / "tokenizer.json"
    if tj.is_file():
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tj))
        except Exception:
            pass
    try:
        import logging

        from transformers import AutoTokenizer  # optional
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception:
        return None


# --- summaries ----------------------------------------------------------------------------


def namespace_model(view: StoreView, ns: bytes) -> str | None:
    return ((view.namespaces.get(ns) or {}).get("model") or {}).get("path")


def store_stats(store: DiskStore, view: StoreView, budget: int | None = None) -> dict:
    """Per-namespace and total statistics."""
    per: dict[bytes, dict] = {}

    def entry(ns: bytes) -> dict:
        if ns not in per:
            d = view.namespaces.get(ns) or {}
            per[ns] = {
                "namespace": ns.hex(),
                "model": namespace_model(view, ns),
                "layers": _layer_summary(d.get("layers")),
                "blocks": 0,
                "tails": 0,
                "checkpoints": 0,
                "prefixes": 0,
                "bytes": 0,
                "logical_tokens": 0,
                "physical_tokens": 0,
                "oldest_access": None,
                "newest_access": None,
                "hits": 0,
            }
        return per[ns]

    for ns in view.namespaces:
        entry(ns)
    for r in view.records.values():
        e = entry(r.namespace)
        e[{KIND_BLOCK: "blocks", KIND_TAIL: "tails", KIND_CHECKPOINT: "checkpoints"}[r.kind]] += 1
        e["bytes"] += r.nbytes
        e["physical_tokens"] += r.n_tokens
        if r.start == 0:
            # Every restore touches exactly one record that starts the chain.
            e["hits"] += r.hits
        if is_end(view, r):
            e["prefixes"] += 1
            e["logical_tokens"] += r.position
        e["oldest_access"] = r.last_access if e["oldest_access"] is None else min(e["oldest_access"], r.last_access)
        e["newest_access"] = r.last_access if e["newest_access"] is None else max(e["newest_access"], r.last_access)
    rows = sorted(per.values(), key=lambda e: -e["bytes"])
    for e in rows:
        e["dedup_ratio"] = round(e["logical_tokens"] / e["physical_tokens"], 3) if e["physical_tokens"] else None
    keys = ("blocks", "tails", "checkpoints", "prefixes", "bytes", "logical_tokens", "physical_tokens", "hits")
    total = {k: sum(e[k] for e in rows) for k in keys}
    total["dedup_ratio"] = (
        round(total["logical_tokens"] / total["physical_tokens"], 3) if total["physical_tokens"] else None
    )
    acc = [e["oldest_access"] for e in rows if e["oldest_access"] is not None]
    total["oldest_access"] = min(acc) if acc else None
    acc = [e["newest_access"] for e in rows if e["newest_access"] is not None]
    total["newest_access"] = max(acc) if acc else None
    total["namespaces"] = len(rows)
    total["index_bytes_counter"] = view.total_bytes
    total["undecodable_records"] = view.undecodable
    settings = store.settings()
    if budget is None:
        budget = store.recorded_budget()
    total["budget_bytes"] = budget
    total["budget_used"] = round(view.total_bytes / budget, 4) if budget else None
    return {
        "path": str(store.path),
        "format_version": settings.get("format_version"),
        "block_size": store.block_size,
        "created": settings.get("created"),
        "mlx_lm_version": settings.get("mlx_lm_version"),
        "namespaces": rows,
        "total": total,
    }


def _layer_summary(layers: list | None) -> str | None:
    if not layers:
        return None
    counts: dict[str, int] = {}
    for d in layers:
        key = f"{d.get('class')}" + (f"/{d['dtype']}" if d.get("dtype") else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n}×{k}" for k, n in counts.items())


def prefix_row(view: StoreView, rec: Record, decoder: TextDecoder | None = None, words: int = 12) -> dict:
    """One ``ls`` row for a snapshot end."""
    row = {
        "id": rec.id.hex(),
        "namespace": rec.namespace.hex(),
        "kind": KIND_NAMES[rec.kind],
        "tokens": rec.position,
        "bytes": view.chain_bytes(rec.id),
        "last_access": rec.last_access,
        "created": rec.created,
        "hits": rec.hits,
    }
    try:
        toks = chain_tokens(chain_of(view, rec))
        row["restorable"] = True
    except ValueError:
        toks = unpack_tokens(rec.tokens)
        row["restorable"] = False
    text = decoder.preview(rec.namespace, toks, words) if decoder is not None else None
    if text is not None:
        row["text"] = text
    else:
        row["token_ids"] = toks[:words]
    return row


def sort_rows(rows: list[dict], how: str) -> list[dict]:
    key = {"recent": "last_access", "size": "bytes", "hits": "hits", "tokens": "tokens"}[how]
    return sorted(rows, key=lambda r: (r[key], r["last_access"]), reverse=True)


def prefix_detail(store: DiskStore, view: StoreView, rec: Record, decoder: TextDecoder | None = None) -> dict:
    """Everything about one stored prefix (``show``)."""
    try:
        chain = chain_of(view, rec)
        broken = None
    except ValueError as e:
        chain, broken = [rec], str(e)
    toks = chain_tokens(chain) if broken is None else unpack_tokens(rec.tokens)
    text = decoder.decode(rec.namespace, toks) if decoder is not None else None

    def rec_info(r: Record) -> dict:
        path = store.file_path(r)
        info = {
            "id": r.id.hex(),
            "kind": KIND_NAMES[r.kind],
            "start": r.start,
            "end": r.position,
            "tokens": r.n_tokens,
            "bytes": r.nbytes,
            "checksum": f"{r.checksum:016x}",
            "file": str(path.relative_to(store.path)),
            "created": r.created,
            "last_access": r.last_access,
            "hits": r.hits,
        }
        try:  # never follow a symlink: lstat only
            st = path.lstat()
            if path.is_symlink():
                info["file_state"] = "symlink"
            else:
                info["file_state"] = "ok" if st.st_size == r.nbytes else f"size {st.st_size}"
        except FileNotFoundError:
            info["file_state"] = "missing"
        return info

    # Checkpoints/tails hanging off this prefix's blocks: other restore points.
    ckpts = []
    for r in chain:
        if r.kind != KIND_BLOCK:
            continue
        for cid in view.children.get(r.id, ()):
            c = view.records.get(cid)
            if c is not None and c.kind != KIND_BLOCK and c.id != rec.id:
                ckpts.append({"id": c.id.hex(), "kind": KIND_NAMES[c.kind], "position": c.position})
    if broken is None:
        for cid in view.children.get(chain[0].parent, ()):
            c = view.records.get(cid)
            if c is not None and c.kind != KIND_BLOCK and c.id != rec.id and c.namespace == rec.namespace and c.start == 0:
                ckpts.append({"id": c.id.hex(), "kind": KIND_NAMES[c.kind], "position": c.position})
    out = {
        "id": rec.id.hex(),
        "namespace": rec.namespace.hex(),
        "model": namespace_model(view, rec.namespace),
        "kind": KIND_NAMES[rec.kind],
        "tokens": rec.position,
        "bytes": sum(r.nbytes for r in chain),
        "last_access": rec.last_access,
        "hits": rec.hits,
        "is_end": is_end(view, rec),
        "chain": [rec_info(r) for r in chain],
        "checkpoints": sorted(ckpts, key=lambda c: c["position"]),
    }
    if broken:
        out["broken"] = broken
    if text is not None:
        out["text"] = text
    else:
        out["token_ids"] = toks
    return out


# --- eviction by age ----------------------------------------------------------------------


def records_older_than(view: StoreView, cutoff: float, namespace: bytes | None = None) -> list[bytes]:
    """Ids of records last used before ``cutoff`` that can go without orphaning a
    younger descendant (leaves first, like the budget eviction)."""
    removable: dict[bytes, bool] = {}
    for r in sorted(view.records.values(), key=lambda r: (-r.position, r.kind == KIND_BLOCK)):
        ok = r.last_access < cutoff and (namespace is None or r.namespace == namespace)
        if ok:
            ok = all(removable.get(c, c not in view.records) for c in view.children.get(r.id, ()))
        removable[r.id] = ok
    # Order: deepest first, so a crash midway never leaves a child without a parent.
    return [rid for rid, ok in removable.items() if ok]


def now() -> float:
    return time.time()

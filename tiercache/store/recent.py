"""The most recently used stored snapshots of a namespace (for prewarm).

A snapshot end is a leaf of the index (a tail, a checkpoint, or a block without
children), and the index keeps its leaves ordered by last access: walking that
order backwards gives the newest snapshots first, at a cost that grows with what
is returned, not with the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import lmdb

from . import layers as L
from .hashing import chain_root, checkpoint_id, next_hash
from .index import KIND_BLOCK, KIND_CHECKPOINT, Index, Record
from .lookup import RestorePlan


@dataclass
class StoredSnapshot:
    """A snapshot the store can restore whole.

    Attributes:
        tokens: the tokens it restores.
        plan: the restore plan ending exactly at its last record.
        nbytes: bytes of its files (the whole chain).
        last_access: when it was last used.
    """

    tokens: list[int]
    plan: RestorePlan
    nbytes: int
    last_access: float


def recent_snapshots(
    index: Index,
    txn: lmdb.Transaction,
    namespace: bytes,
    desc: list | None,
    block_size: int,
    budget: int,
    salt: str | bytes | None = None,
) -> list[StoredSnapshot]:
    """Return the most recently used snapshots of a namespace, newest first.

    Only snapshots whose every record is keyed by the hash of its own tokens under
    ``salt``'s chain root are returned: a caller keys memory entries by these
    tokens, so damage or poisoning in the index must never become KV served for
    other tokens. Models with non-splittable layers only restore at checkpoints.

    Args:
        index: the store's index.
        txn: a read transaction.
        namespace: the model namespace.
        desc: the namespace's cache layout (None: nothing to return).
        block_size: the store's block size.
        budget: skip snapshots that don't fit in what is left of this many bytes
            of files, and stop once it is spent.
        salt: the tenant salt of the chains wanted (None: unsalted).
    """
    if desc is None or budget <= 0:
        return []
    trimmable = L.all_splittable(desc)
    root = chain_root(namespace, salt)
    out: list[StoredSnapshot] = []
    left = budget
    for rec in index.iter_leaves(txn, newest_first=True):
        if left <= 0:
            break
        if rec.namespace != namespace or (not trimmable and rec.kind != KIND_CHECKPOINT):
            continue
        chain = verified_chain(index, txn, rec, root, block_size)
        if chain is None:
            continue
        nbytes = sum(r.nbytes for r in chain)
        if nbytes > left:
            continue
        plan = RestorePlan(namespace, rec.position, layer_desc=list(desc))
        if rec.kind == KIND_BLOCK:
            plan.chain = chain
        else:
            plan.chain, plan.last = chain[:-1], rec
        tokens = [t for r in chain for t in r.token_list]
        out.append(StoredSnapshot(tokens, plan, nbytes, rec.last_access))
        left -= nbytes
    return out


def verified_chain(
    index: Index, txn: lmdb.Transaction, rec: Record, root: bytes, block_size: int
) -> list[Record] | None:
    """Return the records from ``root`` down to ``rec``, each keyed by the hash of its
    tokens (None if a parent is missing or an id doesn't match its tokens)."""
    chain = [rec]
    while chain[-1].start > 0:
        cur = chain[-1]
        parent = index.get(txn, cur.parent)
        if parent is None or parent.kind != KIND_BLOCK or parent.position != cur.start:
            return None
        chain.append(parent)
    chain.reverse()
    prev = root
    for r in chain:
        if r.namespace != rec.namespace or r.parent != prev:
            return None
        if r.kind == KIND_BLOCK:
            if r.n_tokens != block_size or next_hash(prev, r.tokens) != r.id:
                return None
        elif r.id != checkpoint_id(prev, r.token_list):
            return None
        prev = r.id
    return chain

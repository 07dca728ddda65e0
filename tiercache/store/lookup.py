"""Finding the longest restorable prefix of a prompt in the LMDB index.

The walk follows the token-hash chain block by block and compares every block's
stored tokens with the prompt's, so a hash collision or a poisoned record ends the
match (a miss) instead of serving KV that belongs to other tokens. Trimmable
layouts then extend into a partial block token by token; layouts with
non-splittable layers only stop at exact checkpoint positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from . import layers as L
from .hashing import Namespace, chain_root, checkpoint_id, pack_tokens, packed_block_hashes
from .index import KIND_BLOCK, KIND_CHECKPOINT, Index, Record


@dataclass
class RestorePlan:
    """A restorable prefix: full blocks in chain order, then maybe a tail/checkpoint.

    Attributes:
        namespace: the namespace searched.
        n_tokens: tokens the restored cache will hold.
        chain: full block records, in order.
        last: a tail/checkpoint record, or a block used only partly, or None.
        layer_desc: cache layout of the namespace.
    """

    namespace: bytes
    n_tokens: int = 0
    chain: list[Record] = field(default_factory=list)
    last: Record | None = None
    layer_desc: list = field(default_factory=list)
    damaged: list[bytes] = field(default_factory=list)
    """Ids of undecodable records met on the chain (the match stopped there)."""

    @property
    def records(self) -> list[Record]:
        return self.chain + ([self.last] if self.last is not None else [])


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length, in tokens, of the common prefix of two packed token strings."""
    n = min(len(a), len(b)) // 4
    if n == 0:
        return 0
    x = np.frombuffer(a, dtype="<u4", count=n)
    y = np.frombuffer(b, dtype="<u4", count=n)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _token_seq(tokens) -> Sequence[int]:
    """A sliceable token sequence: numpy arrays stay arrays (packed without a list)."""
    if isinstance(tokens, mx.array):
        tokens = np.array(tokens)
    if isinstance(tokens, np.ndarray):
        return tokens.reshape(-1)
    return tokens if isinstance(tokens, list) else list(tokens)


def find_longest_prefix(
    index: Index,
    ns: Namespace,
    desc: list | None,
    tokens: Sequence[int],
    block_size: int,
    *,
    salt: str | bytes | None = None,
    limit: int | None = None,
) -> RestorePlan:
    """The longest stored prefix of ``tokens`` that restores exactly.

    Args:
        index: the store's index.
        ns: namespace searched.
        desc: the namespace's cache layout (``None``: unknown namespace, a miss).
        tokens: the prompt (list, numpy or mx array).
        block_size: the store's block size.
        salt: tenant salt mixed into the chain root.
        limit: restore at most this many tokens.

    Returns:
        A plan; ``plan.n_tokens == 0`` is a miss.
    """
    plan = RestorePlan(ns, layer_desc=desc or [])
    tokens = _token_seq(tokens)
    limit = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
    if desc is None or limit == 0:
        return plan
    B = block_size
    root = chain_root(ns, salt)
    packed = pack_tokens(tokens[:limit])
    hashes = packed_block_hashes(root, packed, B)
    trimmable = L.all_splittable(desc)
    ix = index
    with ix.read() as txn:
        chain: list[Record] = []
        parent = root
        for i, h in enumerate(hashes):
            rec = ix.get(txn, h)
            if rec is None and ix.has(txn, h):
                plan.damaged.append(h)  # present but undecodable
            if (
                rec is None
                or rec.kind != KIND_BLOCK
                or rec.namespace != ns
                or rec.parent != parent
                or rec.tokens != packed[i * 4 * B : (i + 1) * 4 * B]
            ):
                break
            chain.append(rec)
            parent = h
        if trimmable:
            base = len(chain) * B
            rest = packed[base * 4 :]
            best, best_c = None, 0
            if rest:
                # A child that differs at its first token adds nothing.
                for cid in ix.child_ids_starting(txn, parent, rest[:4]):
                    rec = ix.get(txn, cid, rest[:4])
                    if rec is None or rec.kind == KIND_CHECKPOINT or rec.parent != parent:
                        continue
                    c = _common_prefix(rec.tokens, rest)
                    if c > best_c:
                        best, best_c = rec, c
            plan.chain, plan.last, plan.n_tokens = chain, best, base + best_c
            return plan
        # Non-trimmable layers: only exact checkpoint positions count.
        for j in range(len(chain), -1, -1):
            p_hash = chain[j - 1].id if j else root
            base = j * B
            best = None
            # Candidates: the checkpoint exactly at the block boundary, and the
            # ones whose tail starts with the prompt's next token.
            cands = [checkpoint_id(p_hash, [])]
            if base < limit:
                cands += ix.child_ids_starting(txn, p_hash, packed[base * 4 : base * 4 + 4])
            for cid in cands:
                rec = ix.get(txn, cid)
                if (
                    rec is None
                    or rec.kind != KIND_CHECKPOINT
                    or rec.parent != p_hash
                    or rec.position > limit
                    or rec.tokens != packed[base * 4 : rec.position * 4]
                ):
                    continue
                if best is None or rec.position > best.position:
                    best = rec
            if best is not None:
                plan.chain, plan.last, plan.n_tokens = chain[:j], best, best.position
                return plan
    return plan

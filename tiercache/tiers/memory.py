"""Memory tier: an LRU prefix cache of mlx-lm prompt caches under a byte budget.

`MemoryPromptCache` keeps prompt-cache snapshots (lists of mlx-lm cache
objects, one per layer) keyed by ``(key, tokens)``. Lookups find the stored
snapshot that covers the most leading tokens of a query; eviction follows
mlx-lm's checkpoint priorities ("assistant" before "user" before "system").

Design notes (what differs from mlx-lm's ``LRUPromptCache``):

* The trie is a *radix* trie: a node per branch point / entry, each edge a
  tuple of tokens. A 32K-token prompt costs a handful of nodes and a few C-level
  tuple comparisons instead of 32K Python dicts, and no search recurses. Every
  node counts the trimmable entries below it (``n_trim``), so the best
  "longer or diverging" entry is found by walking the query path once and then
  descending along counted children, never by scanning a subtree.
* Fetch marks the entry most recently used (mlx-lm only orders by insertion).
* Hits are *shallow clones*, not deep copies: new cache objects whose arrays are
  new ``mx.array`` handles on the same buffers. Sharing the handles themselves
  would be a bug: ``cache.keys[..., a:b, :] = x`` mutates the ``mx.array``
  object in place, so every holder of that object would see the write. A new
  handle makes MLX copy the buffer on the first write instead (copy-on-write).
* Handover: a trimmable entry that is a prefix of the query will be superseded
  by the caller's next insert anyway, so it is removed and given away with no
  clone; the caller's first write then happens in place (buffer refcount 1).

Measured peak memory (``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``,
mlx 0.32.4 cpu): 16,000-token KVCache snapshot, 8 layers, 2 kv heads,
head_dim 64, float32 = 126 MiB stored (buffers 16,128 tokens long, so the next
token fits without growing); hit, then one decode-step write to every layer:

    deepcopy hit + write  : peak 252 MiB (the write copies the shared buffers)
    clone hit + write     : peak 252 MiB (same copy-on-write, less Python work)
    handover hit + write  : peak 126 MiB (written in place, nothing copied)

In mlx 0.32 ``copy.deepcopy`` of an array is itself lazy and copy-on-write, so
clone and deepcopy cost the same memory: while the stored entry stays, the
caller needs its own buffers. Only handover avoids the second copy. (Clone is
~4x cheaper in CPU: 0.035 ms vs 0.13 ms for 32 KVCache layers.) A fetch of a
32K-token query among 21 stored 16K-32K-token entries takes ~0.2 ms.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

logger = logging.getLogger(__name__)

#: Eviction classes, evicted first to last (same order as mlx-lm).
CACHE_TYPES = ("assistant", "user", "system")

OnEvict = Callable[[Hashable, tuple, list, str], None]


@dataclass
class MemoryHit:
    """A successful memory-tier lookup.

    Attributes:
        prompt_cache: Caller-owned cache objects, already trimmed to ``n_tokens``.
        n_tokens: Number of leading query tokens the cache covers.
        cache_type: The cache type of the entry the hit came from.
        handed_over: True if the entry was removed and given away (handover);
            False if it stays stored and ``prompt_cache`` is a clone.
    """

    prompt_cache: list
    n_tokens: int
    cache_type: str
    handed_over: bool = False


# --------------------------------------------------------------------------
# Shallow cloning
# --------------------------------------------------------------------------

_ATOMS = (int, float, str, bytes, bool, type(None))


def _clone_value(v: Any) -> Any:
    if isinstance(v, mx.array):
        # New handle, same buffer: writes through it rebind only this handle.
        return copy.copy(v)
    if isinstance(v, _ATOMS):
        return v
    if type(v) is list:
        # Lists must be new too: ArraysCache assigns ``cache[i] = x``.
        return [_clone_value(x) for x in v]
    if type(v) is tuple:
        return tuple(_clone_value(x) for x in v)
    if type(v) is dict:
        return {k: _clone_value(x) for k, x in v.items()}
    if hasattr(v, "__dict__") and not isinstance(v, type):
        return _clone_object(v)
    return copy.deepcopy(v)


def _clone_object(obj: Any) -> Any:
    cls = type(obj)
    new = cls.__new__(cls)
    new.__dict__.update({k: _clone_value(x) for k, x in vars(obj).items()})
    return new


def clone_prompt_cache(prompt_cache: Sequence[Any]) -> list:
    """Return a shallow clone of a prompt cache that is safe to mutate.

    Each cache object (including nested ones, e.g. in ``CacheList``) is a new
    object of the same class; each ``mx.array`` is a new handle on the same
    buffer, so no data is copied until one side writes.

    Args:
        prompt_cache: A list of mlx-lm cache objects.

    Returns:
        A new list of new cache objects.
    """
    return [_clone_object(c) for c in prompt_cache]


# --------------------------------------------------------------------------
# Radix trie
# --------------------------------------------------------------------------


def _common_len(edge: tuple, q: tuple, start: int) -> int:
    """Return the length of the common prefix of ``edge`` and ``q[start:]``."""
    n = min(len(edge), len(q) - start)
    if edge[:n] == q[start : start + n]:  # the common case: one C comparison
        return n
    j = 0
    while j < n:  # find the mismatching 256-token chunk, then the token
        k = min(j + 256, n)
        if edge[j:k] != q[start + j : start + k]:
            while edge[j] == q[start + j]:
                j += 1
            return j
        j = k
    return n


class _Node:
    """A trie node: the edge from its parent, its depth, children and entry."""
    __slots__ = ("parent", "edge", "depth", "children", "entry", "n_trim")

    def __init__(self, parent: Optional["_Node"], edge: tuple, depth: int):
        self.parent = parent
        self.edge = edge  # tokens on the edge from the parent to this node
        self.depth = depth  # tokens from the root to the end of this node
        self.children: dict[int, _Node] = {}
        self.entry: Optional[_Entry] = None
        self.n_trim = 0  # trimmable entries in this subtree (self included)


@dataclass(eq=False)  # identity hash: used as a key of the LRU dicts
class _Entry:
    """One stored snapshot: its key, tokens, cache and LRU bookkeeping."""
    key: Hashable
    tokens: tuple
    prompt_cache: list
    nbytes: int
    cache_type: str
    trimmable: bool
    node: _Node
    tick: int = 0


# --------------------------------------------------------------------------
# The memory tier
# --------------------------------------------------------------------------


class MemoryPromptCache:
    """Thread-safe in-memory prefix cache with checkpoint priorities.

    Args:
        max_size: Maximum number of stored sequences.
        max_bytes: Maximum total ``nbytes`` of stored sequences; holds after
            every insert.
        on_evict: Optional ``on_evict(key, tokens, prompt_cache, cache_type)``
            called for every entry evicted by the budget (``insert`` or
            ``trim_to``), never for entries replaced, superseded, removed,
            cleared or handed over. It is called after the lock is released,
            so it may call back into this cache; it is never re-entered on one
            thread (evictions caused from inside it are delivered after it
            returns) but may run concurrently on different threads. Its
            exceptions are logged, not raised. The ``prompt_cache`` passed is
            the stored one: it is no longer referenced by this cache.
    """

    def __init__(
        self,
        max_size: int = 10,
        max_bytes: int = 1 << 63,
        on_evict: Optional[OnEvict] = None,
    ):
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._lock = threading.RLock()
        self._roots: dict[Hashable, _Node] = {}
        self._lrus: dict[str, OrderedDict[_Entry, None]] = {
            t: OrderedDict() for t in CACHE_TYPES
        }
        self._bytes_by_type = {t: 0 for t in CACHE_TYPES}
        self._nbytes = 0
        self._ticks = itertools.count(1)
        self._local = threading.local()
        self.counters = {
            "hits": 0,
            "misses": 0,
            "hit_tokens": 0,
            "handovers": 0,
            "inserts": 0,
            "superseded": 0,
            "evictions": 0,
            "evicted_bytes": 0,
        }

    # ---------------------------------------------------------------- sizes

    @property
    def nbytes(self) -> int:
        """Return the total bytes of the stored sequences."""
        return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return sum(len(lru) for lru in self._lrus.values())

    def stats_by_type(self) -> dict:
        """Return ``{cache_type: {"n_sequences": int, "n_bytes": int}}``."""
        with self._lock:
            return {
                t: {"n_sequences": len(self._lrus[t]), "n_bytes": self._bytes_by_type[t]}
                for t in CACHE_TYPES
            }

    def entries(self) -> list:
        """Return ``[(key, tokens, cache_type, nbytes)]``, most recently used last."""
        with self._lock:
            all_entries = [e for lru in self._lrus.values() for e in lru]
        all_entries.sort(key=lambda e: e.tick)
        return [(e.key, e.tokens, e.cache_type, e.nbytes) for e in all_entries]

    # ---------------------------------------------------------------- fetch

    def fetch(
        self,
        key: Hashable,
        tokens: Sequence[int],
        *,
        limit: Optional[int] = None,
        handover: bool = True,
    ) -> Optional[MemoryHit]:
        """Find the stored cache covering the most leading tokens of a query.

        Candidates are stored prefixes of ``tokens`` no longer than ``limit``
        (used as they are) and trimmable entries sharing a common prefix ``c``
        with ``tokens`` (longer, equal or diverging; used for ``min(c, limit)``
        tokens after trimming). Ties prefer the untrimmed prefix.

        Args:
            key: Namespace of the entry (any hashable).
            tokens: The query tokens.
            limit: Maximum number of tokens to cover. Defaults to
                ``len(tokens) - 1`` so at least one token is always left to
                process (mlx-lm's server fails on an empty prompt, issue #1215).
                Clamped to ``len(tokens)``.
            handover: If the chosen entry is trimmable and a prefix of (or
                equal to) ``tokens``, remove it and return it without copying:
                the caller's next insert would supersede it anyway. If the
                caller will not re-insert, pass ``False``.

        Returns:
            A `MemoryHit` with caller-owned cache objects, or None.
        """
        q = tokens if type(tokens) is tuple else tuple(tokens)
        n = len(q)
        limit = n - 1 if limit is None else min(limit, n)
        with self._lock:
            root = self._roots.get(key)
            found = self._search(root, q, limit) if root is not None and limit > 0 else None
            if found is None:
                self.counters["misses"] += 1
                return None
            entry, n_tokens = found
            give = (
                handover
                and entry.trimmable
                and len(entry.tokens) <= n
                and q[: len(entry.tokens)] == entry.tokens
            )
            if give:
                self._detach(entry)
                prompt_cache = entry.prompt_cache
                self.counters["handovers"] += 1
            else:
                prompt_cache = clone_prompt_cache(entry.prompt_cache)
                self._touch(entry)
            self.counters["hits"] += 1
            self.counters["hit_tokens"] += n_tokens
        # The objects are the caller's now: trimming needs no lock.
        if len(entry.tokens) > n_tokens:
            trim_prompt_cache(prompt_cache, len(entry.tokens) - n_tokens)
        return MemoryHit(prompt_cache, n_tokens, entry.cache_type, give)

    def _search(self, root: _Node, q: tuple, limit: int):
        """Return ``(entry, n_tokens)`` for the best usable entry, or None."""
        n = len(q)
        prefix_node = None  # deepest entry on the query path with depth <= limit
        trim_node, trim_c = None, 0  # deepest node whose subtree has a trimmable entry
        node = root
        while True:
            if node.entry is not None and node.depth <= limit:
                prefix_node = node
            if node.n_trim > 0:
                trim_node, trim_c = node, node.depth
            if node.depth >= limit or node.depth >= n:
                break  # deeper nodes cannot cover more than `limit`
            child = node.children.get(q[node.depth])
            if child is None:
                break
            m = _common_len(child.edge, q, node.depth)
            if m < len(child.edge):
                # The query diverges (or ends) inside this edge: everything
                # below shares exactly depth + m tokens with it.
                if child.n_trim > 0:
                    trim_node, trim_c = child, node.depth + m
                break
            node = child
        a = prefix_node.depth if prefix_node is not None else 0
        b = min(trim_c, limit) if trim_node is not None else 0
        if b > a:
            return self._trimmable_below(trim_node, q), b
        if a > 0:
            return prefix_node.entry, a
        return None

    @staticmethod
    def _trimmable_below(node: _Node, q: tuple) -> _Entry:
        """Descend from ``node`` (``n_trim > 0``) to the nearest trimmable entry."""
        n = len(q)
        while node.entry is None or not node.entry.trimmable:
            nxt = node.children.get(q[node.depth]) if node.depth < n else None
            if nxt is None or nxt.n_trim == 0:  # prefer staying on the query path
                nxt = next(c for c in node.children.values() if c.n_trim > 0)
            node = nxt
        return node.entry

    # --------------------------------------------------------------- insert

    def insert(
        self,
        key: Hashable,
        tokens: Sequence[int],
        prompt_cache: Sequence[Any],
        *,
        cache_type: str = "assistant",
    ) -> None:
        """Store a snapshot of the cache for ``tokens``, then enforce the budget.

        The store keeps a shallow clone, so the caller may keep using (and
        writing to) its own objects. An entry with equal tokens is replaced; a
        trimmable snapshot also drops the stored strict prefixes of ``tokens``
        (it can serve them by trimming). Entries evicted by ``max_size`` /
        ``max_bytes`` go to ``on_evict``; a snapshot larger than ``max_bytes``
        is not stored and goes to ``on_evict`` at once. Empty ``tokens`` are
        ignored (such an entry could never be used).

        Args:
            key: Namespace of the entry (any hashable).
            tokens: The tokens the cache covers.
            prompt_cache: A list of mlx-lm cache objects.
            cache_type: "assistant", "user" or "system" (eviction class).

        Raises:
            ValueError: For an unknown ``cache_type``.
        """
        if cache_type not in self._lrus:
            raise ValueError(f"unknown cache_type {cache_type!r}; expected one of {CACHE_TYPES}")
        q = tokens if type(tokens) is tuple else tuple(tokens)
        if not q:
            return
        stored = clone_prompt_cache(prompt_cache)
        nbytes = sum(c.nbytes for c in stored)
        trimmable = can_trim_prompt_cache(stored)
        evicted = []
        with self._lock:
            self.counters["inserts"] += 1
            if nbytes > self.max_bytes:
                # Would evict everything else and still not fit: skip the trie.
                evicted.append((key, q, stored, cache_type))
                self.counters["evictions"] += 1
                self.counters["evicted_bytes"] += nbytes
            else:
                self._add(key, q, stored, nbytes, cache_type, trimmable)
                evicted = self._enforce(self.max_size, self.max_bytes)
        self._deliver(evicted)

    def _add(self, key, q, prompt_cache, nbytes, cache_type, trimmable) -> None:
        root = self._roots.get(key)
        if root is None:
            root = self._roots[key] = _Node(None, (), 0)
        node = self._node_for(root, q)
        if node.entry is not None:
            self._detach(node.entry, prune=False)  # replaced, not evicted
            self.counters["superseded"] += 1
        entry = _Entry(key, q, prompt_cache, nbytes, cache_type, trimmable, node)
        node.entry = entry
        if trimmable:
            self._bump_trim(node, +1)
        self._lrus[cache_type][entry] = None
        entry.tick = next(self._ticks)
        self._nbytes += nbytes
        self._bytes_by_type[cache_type] += nbytes
        if trimmable:
            # Stored strict prefixes are redundant: this entry trims to them.
            anc = node.parent
            while anc is not None:
                up = anc.parent
                if anc.entry is not None:
                    self._detach(anc.entry)
                    self.counters["superseded"] += 1
                anc = up

    @staticmethod
    def _node_for(root: _Node, q: tuple) -> _Node:
        """Return the node for exactly ``q``, splitting an edge if needed."""
        node, i, n = root, 0, len(q)
        while i < n:
            child = node.children.get(q[i])
            if child is None:
                leaf = _Node(node, q[i:], n)
                node.children[q[i]] = leaf
                return leaf
            m = _common_len(child.edge, q, i)
            if m < len(child.edge):
                mid = _Node(node, child.edge[:m], node.depth + m)
                mid.n_trim = child.n_trim
                node.children[q[i]] = mid
                child.edge = child.edge[m:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            node, i = child, i + m
        return node

    # -------------------------------------------------------------- removal

    def remove(self, key: Hashable, tokens: Sequence[int]) -> bool:
        """Remove the entry for exactly ``tokens`` (no ``on_evict``).

        Returns:
            True if an entry was removed.
        """
        q = tuple(tokens)
        with self._lock:
            root = self._roots.get(key)
            node = root
            while node is not None and node.depth < len(q):
                child = node.children.get(q[node.depth])
                if child is None or _common_len(child.edge, q, node.depth) < len(child.edge):
                    return False
                node = child
            if node is None or node.entry is None:
                return False
            self._detach(node.entry)
            return True

    def trim_to(self, *, n_sequences: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """Evict (through ``on_evict``) until both limits hold.

        Args:
            n_sequences: Maximum number of sequences to keep (None: no limit).
            n_bytes: Maximum number of bytes to keep (None: no limit).
        """
        n_seq = max(0, n_sequences) if n_sequences is not None else 1 << 63
        n_b = max(0, n_bytes) if n_bytes is not None else 1 << 63
        with self._lock:
            evicted = self._enforce(n_seq, n_b)
        self._deliver(evicted)

    def clear(self) -> None:
        """Drop every entry without calling ``on_evict``."""
        with self._lock:
            self._roots.clear()
            for lru in self._lrus.values():
                lru.clear()
            self._bytes_by_type = {t: 0 for t in CACHE_TYPES}
            self._nbytes = 0

    # ------------------------------------------------------------ internals

    def _touch(self, entry: _Entry) -> None:
        self._lrus[entry.cache_type].move_to_end(entry)
        entry.tick = next(self._ticks)

    def _bump_trim(self, node: Optional[_Node], delta: int) -> None:
        while node is not None:
            node.n_trim += delta
            node = node.parent

    def _detach(self, entry: _Entry, prune: bool = True) -> None:
        """Remove ``entry`` from the LRU, the byte counts and the trie."""
        del self._lrus[entry.cache_type][entry]
        self._nbytes -= entry.nbytes
        self._bytes_by_type[entry.cache_type] -= entry.nbytes
        node = entry.node
        node.entry = None
        if entry.trimmable:
            self._bump_trim(node, -1)
        if prune:
            self._prune(node, entry.key)

    def _prune(self, node: _Node, key: Hashable) -> None:
        """Delete entry-less leaves and merge entry-less one-child nodes."""
        while node.parent is not None and node.entry is None:
            parent = node.parent
            if not node.children:
                del parent.children[node.edge[0]]
                node = parent
                continue
            if len(node.children) == 1:
                (child,) = node.children.values()
                child.edge = node.edge + child.edge
                child.parent = parent
                parent.children[node.edge[0]] = child
            break
        if node.parent is None and node.entry is None and not node.children:
            if self._roots.get(key) is node:
                del self._roots[key]

    def _pop_victim(self) -> Optional[_Entry]:
        # mlx-lm's CacheOrder.pop: take the LRU of a class unless the class
        # is shorter than the next (more valuable) one.
        for a, b in zip(CACHE_TYPES, CACHE_TYPES[1:]):
            lru_a, lru_b = self._lrus[a], self._lrus[b]
            if lru_a and len(lru_a) >= len(lru_b):
                return next(iter(lru_a))
        last = self._lrus[CACHE_TYPES[-1]]
        return next(iter(last)) if last else None

    def _enforce(self, max_size: int, max_bytes: int) -> list:
        evicted = []
        while len(self) > max_size or self._nbytes > max_bytes:
            victim = self._pop_victim()
            if victim is None:
                break
            self._detach(victim)
            self.counters["evictions"] += 1
            self.counters["evicted_bytes"] += victim.nbytes
            evicted.append((victim.key, victim.tokens, victim.prompt_cache, victim.cache_type))
        return evicted

    def _deliver(self, evicted: list) -> None:
        """Call ``on_evict`` outside the lock, never re-entrantly per thread."""
        if not evicted or self.on_evict is None:
            return
        pending = getattr(self._local, "pending", None)
        if pending is not None:  # inside on_evict on this thread: queue
            pending.extend(evicted)
            return
        self._local.pending = pending = list(evicted)
        try:
            while pending:
                item = pending.pop(0)
                try:
                    self.on_evict(*item)
                except Exception:
                    logger.exception("on_evict failed for %r (%d tokens)", item[0], len(item[1]))
        finally:
            self._local.pending = None

"""Restoring a plan: files read straight into MLX buffers, every byte checksummed.

One copy on the whole path: each layer's destination is allocated once with
``mx.empty`` for the plan's total length (rounded up to mlx-lm's 256-row step), and every (batch, head) plane of every
block file is ``readinto`` its place through a zero-copy numpy view, hashed as it
streams. No concatenation, no intermediate arrays. Files are announced to the
kernel first (``posix_fadvise(WILLNEED)``) so a cold restore reads ahead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from ..errors import TiercacheError
from . import layers as L
from .blockfile import BlockFileError, HashingReader, as_numpy, mx_dtype, np_dtype
from .index import Record
from .lookup import RestorePlan


class RestoreError(TiercacheError):
    """A record's file is missing or corrupt; carries the record."""

    def __init__(self, record: Record, reason: str):
        super().__init__(f"{record.id.hex()}: {reason}")
        self.record = record
        self.reason = reason


def _prefetch(paths: Sequence[Path]) -> None:
    """Asks the kernel to read every file of a plan ahead (POSIX_FADV_WILLNEED), so
    a cold restore overlaps disk reads with hashing and copying instead of waiting
    for each file in turn. A no-op where fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # restore reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def read_plan(
    plan: RestorePlan,
    file_path: Callable[[Record], Path] | None,
    geometry: list | None = None,
    open_record: Callable[[Record], HashingReader] | None = None,
) -> list | None:
    """Builds mlx-lm cache objects for a plan, verifying every file.

    Args:
        plan: from :func:`tiercache.store.lookup.find_longest_prefix`.
        file_path: where a record's file lives.
        geometry: the namespace's per-layer tensor geometry
            (:func:`tiercache.store.layers.layer_geometry`), when recorded: a
            tensor that doesn't fit it fails the restore instead of the model.
        open_record: opens a record's bytes instead of its file (records fetched
            from a remote store); checked exactly as files are.

    Raises:
        RestoreError: a file is missing, truncated, fails its checksum or holds a
            tensor that doesn't fit ``geometry``.
    """
    if plan.n_tokens == 0:
        return None
    desc = plan.layer_desc
    # Rows to allocate per splittable layer: room for the next tokens, so the first
    # decode step writes in place instead of making mlx-lm's KVCache concatenate
    # (a copy of the whole snapshot). ConcatenateKVCache reads its length from its
    # buffer, so it gets exactly its rows.
    split = {
        i: n_alloc if d["class"] != "ConcatenateKVCache" else plan.n_tokens
        for i, d in enumerate(desc)
        if L.is_splittable(d)
        for n_alloc in [-(-plan.n_tokens // L.ROW_STEP) * L.ROW_STEP]
    }
    n_total = plan.n_tokens
    dests: dict[tuple[int, str], tuple[mx.array, np.ndarray]] = {}
    states: dict[str, dict] = {}
    state_arrays: dict[int, dict[str, mx.array]] = {}
    row = 0
    if open_record is None:
        _prefetch([file_path(r) for r in plan.records])

        def open_record(rec: Record) -> HashingReader:
            return HashingReader(file_path(rec), rec.nbytes)

    for rec in plan.records:
        use = min(rec.n_tokens, n_total - row)
        try:
            meta = _read_record(open_record(rec), rec, use, row, n_total, split, dests, state_arrays,
                                geometry)
        except (BlockFileError, OSError, KeyError, ValueError, TypeError) as e:
            raise RestoreError(rec, str(e)) from None
        if meta is not None:
            states = meta
        row += use
    cache: list[Any] = []
    for i, d in enumerate(desc):
        if i in split:
            arrays = {s: dests[(i, s)][0] for s in L.kv_suffixes(d) if (i, s) in dests}
            if len(arrays) != len(L.kv_suffixes(d)):
                raise RestoreError(plan.records[-1], f"layer {i} missing from files")
            cache.append(L.build_splittable(d, arrays, n_total))
        else:
            meta = states.get(str(i))
            if meta is None:
                raise RestoreError(plan.records[-1], f"no state for layer {i}")
            cache.append(L.decode_state(meta, state_arrays.get(i, {})))
    return cache


def _read_record(r, rec, use, row, n_total, split, dests, state_arrays, geometry=None):
    """Reads one record's file (an open reader) into the restore buffers; returns its
    layer states."""
    states = None
    try:
        for name in r.tensors_in_order():
            dt, shape, s, e = r.tensor_info(name)
            misfit = geometry is not None and L.geometry_misfit(geometry, name, dt, shape)
            if misfit:
                raise BlockFileError(f"geometry: {misfit}")
            li_str, _, suffix = name.partition(".")
            li = int(li_str)
            r.skip_to(s)
            if suffix.startswith("s."):
                arr = np.empty(shape, dtype=np_dtype(dt))
                r.readinto(memoryview(arr).cast("B"))
                a = mx.array(arr)
                if mx_dtype(dt) == mx.bfloat16:
                    a = a.view(mx.bfloat16)
                state_arrays.setdefault(li, {})[suffix[2:]] = a
                continue
            if li not in split or len(shape) != 4 or shape[2] != rec.n_tokens:
                raise BlockFileError(f"unexpected tensor {name} {shape}")
            key = (li, suffix)
            if key not in dests:
                dest = mx.empty((shape[0], shape[1], split[li], shape[3]), dtype=mx_dtype(dt))
                view = as_numpy(dest)
                view[:, :, n_total:] = 0  # never expose stale allocator memory
                dests[key] = (dest, view)
            dview = dests[key][1]
            if dview.shape[:2] != tuple(shape[:2]) or dview.shape[3] != shape[3]:
                raise BlockFileError(f"tensor {name} shape {shape} differs between files")
            if use == 0:
                continue  # empty tail of a checkpoint on a block boundary
            if use == shape[2]:
                # Each (batch, head) plane of the file lands in one contiguous run.
                for b in range(shape[0]):
                    for h in range(shape[1]):
                        r.readinto(memoryview(dview[b, h, row : row + use]).cast("B"))
            else:
                scratch = np.empty(shape, dtype=dview.dtype)
                r.readinto(memoryview(scratch).cast("B"))
                dview[:, :, row : row + use] = scratch[:, :, :use]
        raw_states = (r.header.get("__metadata__") or {}).get("states")
        if raw_states is not None:
            states = json.loads(raw_states)
        r.finish(rec.checksum)
    finally:
        r.close()
    return states

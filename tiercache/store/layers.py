"""Our own, versioned layout of mlx-lm cache layers.

mlx-lm's ``state`` changed shape between releases (0.32 returns padded buffers), so
we never store ``state``: we store live rows and the few integers needed to rebuild
each class, and rebuild objects through an explicit allow-list of classes.

Two kinds of layers:

* **splittable** (``KVCache``, ``QuantizedKVCache``, ``ConcatenateKVCache``): rows
  along the sequence axis can be cut into blocks and concatenated back.
* **checkpoint** (``RotatingKVCache``, ``ArraysCache``, ``ChunkedKVCache``,
  ``CacheList``): state that only exists at one exact token position; stored whole.
  A ``RotatingKVCache`` is always stored whole: it is bounded by its window, and
  once wrapped its rows can't be split anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlc

from ..errors import TiercacheError
from .blockfile import as_numpy, dtype_name, mx_dtype

SPLITTABLE = ("KVCache", "QuantizedKVCache", "ConcatenateKVCache")

#: Restored buffers are rounded up to this many rows (mlx-lm's KVCache.step), so
#: the next tokens are written in place instead of growing the buffer.
ROW_STEP = mlc.KVCache.step

#: Classes we are willing to build when reading a file. Nothing else is ever instantiated.
ALLOWED_CLASSES = {
    "KVCache": mlc.KVCache,
    "QuantizedKVCache": mlc.QuantizedKVCache,
    "ConcatenateKVCache": mlc.ConcatenateKVCache,
    "RotatingKVCache": mlc.RotatingKVCache,
    "ArraysCache": mlc.ArraysCache,
    "ChunkedKVCache": mlc.ChunkedKVCache,
    "CacheList": mlc.CacheList,
}


class UnsupportedCacheError(TiercacheError, ValueError):
    """A cache layer class we don't know how to store."""


@dataclass
class HostLayer:
    """A layer's bytes as numpy views, made on the MLX thread for the disk writer.

    Attributes:
        desc: the layer's description (see :func:`describe_layer`).
        offset: tokens held (splittable layers).
        arrays: tensor name -> (safetensors dtype, numpy view). For splittable
            layers the names are the k/v suffixes and views cover the whole buffer;
            for checkpoint layers they are :func:`encode_state`'s names.
        meta: :func:`encode_state` metadata (checkpoint layers only).
    """

    desc: dict
    offset: int | None
    arrays: dict
    meta: dict | None = None


def to_host(prompt_cache: list) -> list[HostLayer]:
    """Writer-safe numpy views of a prompt cache, without copying its data.

    Must run on the thread that owns MLX. Each array gets a *new* handle on the
    same buffer before it is viewed: a later in-place write by the caller rebinds
    only the caller's handle, and MLX copies the buffer because ours still holds
    it, so the views never change while the writer reads them.
    """
    pending = []
    out = []
    for layer in prompt_cache:
        if isinstance(layer, HostLayer):
            out.append(layer)
            continue
        d = describe_layer(layer)
        if is_splittable(d):
            named, meta = _kv_arrays(layer), None
        else:
            tensors, meta = encode_state(layer)
            named = list(tensors.items())
        handles = []
        for name, a in named:
            h = copy.copy(a)
            v = h.view(mx.uint16) if h.dtype == mx.bfloat16 else h
            handles.append((name, dtype_name(a.dtype), v))
            pending.append(v)
        out.append((d, layer_offset(layer) if meta is None else None, handles, meta))
    mx.eval(pending)
    result = []
    for item in out:
        if isinstance(item, HostLayer):
            result.append(item)
            continue
        d, off, handles, meta = item
        arrays = {name: (dt, np.array(v, copy=False)) for name, dt, v in handles}
        result.append(HostLayer(d, off, arrays, meta))
    return result


def from_host(host: list[HostLayer], n_tokens: int) -> list:
    """Rebuilds mlx-lm cache objects from :func:`to_host` views, holding ``n_tokens``.

    The inverse of ``to_host`` followed by a restore of the first ``n_tokens``
    tokens: splittable layers get their first ``n_tokens`` rows copied into new
    buffers rounded up to :data:`ROW_STEP` rows (zeros after), exactly as a disk
    restore builds them; checkpoint layers are rebuilt whole, so ``n_tokens``
    must then be the length the snapshot holds. Runs on the MLX thread; the views
    are only read, so the writer may read them at the same time.
    """
    n_alloc = -(-n_tokens // ROW_STEP) * ROW_STEP
    cache: list = []
    for h in host:
        if not is_splittable(h.desc):
            tensors = {name: _host_to_mx(dt, v) for name, (dt, v) in h.arrays.items()}
            cache.append(decode_state(h.meta, tensors))
            continue
        rows = n_tokens if h.desc["class"] == "ConcatenateKVCache" else n_alloc
        arrays = {}
        for suffix, (dt, v) in h.arrays.items():
            dest = mx.empty((v.shape[0], v.shape[1], rows, v.shape[3]), dtype=mx_dtype(dt))
            view = as_numpy(dest)
            view[:, :, :n_tokens] = v[:, :, :n_tokens]
            view[:, :, n_tokens:] = 0  # never expose stale allocator memory
            arrays[suffix] = dest
        cache.append(build_splittable(h.desc, arrays, n_tokens))
    return cache


def _host_to_mx(dt: str, v: np.ndarray) -> mx.array:
    a = mx.array(v)
    return a.view(mx.bfloat16) if mx_dtype(dt) == mx.bfloat16 else a


def _class_name(layer: Any) -> str:
    name = type(layer).__name__
    if name not in ALLOWED_CLASSES or type(layer) is not ALLOWED_CLASSES[name]:
        raise UnsupportedCacheError(f"cache class {type(layer).__qualname__} is not supported")
    return name


def _dtype_of(layer: Any) -> str | None:
    keys = getattr(layer, "keys", None)
    if isinstance(keys, (tuple, list)):
        keys = keys[1]  # quantized: (wq, scales, biases): scales carry the dtype
    return dtype_name(keys.dtype) if isinstance(keys, mx.array) else None


def describe_layer(layer: Any) -> dict:
    """JSON-able description of one layer: class, dtype and class parameters."""
    if isinstance(layer, HostLayer):
        return layer.desc
    name = _class_name(layer)
    d: dict = {"class": name}
    if name == "CacheList":
        d["children"] = [describe_layer(c) for c in layer.caches]
    elif name == "ArraysCache":
        d["dtypes"] = [dtype_name(a.dtype) if a is not None else None for a in layer.cache]
    else:
        d["dtype"] = _dtype_of(layer)
    if name == "QuantizedKVCache":
        d["group_size"], d["bits"] = layer.group_size, layer.bits
    elif name == "RotatingKVCache":
        d["max_size"], d["keep"] = layer.max_size, layer.keep
    elif name == "ChunkedKVCache":
        d["chunk_size"] = layer.chunk_size
    return d


def describe_cache(cache: list) -> list[dict]:
    """Descriptions of every layer of a prompt cache (part of the namespace)."""
    return [describe_layer(c) for c in cache]


def _tensor_geometry(name: str, dtype: str, shape) -> list:
    """``[dims..., dtype]`` of one stored tensor; the sequence axis (axis 2 of K/V
    tensors) is ``-1``. ArraysCache arrays (names ``a<j>``) have no sequence axis."""
    dims = [int(x) for x in shape]
    if not name.rpartition(".")[2].startswith("a") and len(dims) == 4:
        dims[2] = -1
    return dims + [dtype]


def layer_geometry(layer: Any) -> dict[str, list]:
    """Shapes and dtypes of the tensors a layer is stored as, by tensor name as it
    appears in block files after the layer index (``k``, ``v``, ``s.<state name>``).

    Part of a namespace's description: a file whose tensors don't fit it (another
    head count or head size) must never be restored into the model.
    """
    if isinstance(layer, HostLayer):
        named = [(n, dt, v.shape) for n, (dt, v) in layer.arrays.items()]
        split = is_splittable(layer.desc)
    elif is_splittable(describe_layer(layer)):
        named, split = [(n, dtype_name(a.dtype), a.shape) for n, a in _kv_arrays(layer)], True
    else:
        tensors, _ = encode_state(layer)
        named, split = [(n, dtype_name(a.dtype), a.shape) for n, a in tensors.items()], False
    return {
        (n if split else f"s.{n}"): _tensor_geometry(n, dt, shape) for n, dt, shape in named
    }


def cache_geometry(cache: list) -> list[dict[str, list]]:
    """:func:`layer_geometry` of every layer of a prompt cache."""
    return [layer_geometry(c) for c in cache]


def geometry_misfit(layers: list[dict], name: str, dtype: str, shape) -> str | None:
    """Why a stored tensor ``name`` (``<layer>.<suffix>``) doesn't fit a namespace's
    geometry, or None when it fits."""
    li, _, suffix = name.partition(".")
    try:
        want = layers[int(li)].get(suffix)
    except (ValueError, IndexError):
        want = None
    if want is None:
        return f"tensor {name} is not part of the model's cache layout"
    got = _tensor_geometry(suffix, dtype, shape)
    if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want, got)):
        return f"tensor {name} is {got}, the model's cache layout wants {want}"
    return None


def is_splittable(desc: dict) -> bool:
    return desc["class"] in SPLITTABLE


def all_splittable(layer_desc: list[dict]) -> bool:
    """True when every layer can be cut at any token (token-level prefix reuse)."""
    return all(is_splittable(d) for d in layer_desc)


def layer_offset(layer: Any) -> int | None:
    """Tokens a layer holds, where the class records it."""
    if isinstance(layer, HostLayer):
        return layer.offset
    return getattr(layer, "offset", None)


def _kv_arrays(layer: Any) -> list[tuple[str, mx.array]]:
    name = type(layer).__name__
    if name == "QuantizedKVCache":
        return [(f"k{i}", a) for i, a in enumerate(layer.keys)] + [
            (f"v{i}", a) for i, a in enumerate(layer.values)
        ]
    return [("k", layer.keys), ("v", layer.values)]


def kv_rows(layer: Any, start: int, end: int) -> list[tuple[str, str, np.ndarray]]:
    """Zero-copy views of rows ``[start, end)`` of a splittable layer.

    Returns:
        ``(suffix, safetensors dtype, numpy view)`` per tensor, shape ``(B, H, n, D)``.
    """
    if isinstance(layer, HostLayer):
        return [(s, dt, v[..., start:end, :]) for s, (dt, v) in layer.arrays.items()]
    out = []
    for suffix, a in _kv_arrays(layer):
        view = as_numpy(a)[..., start:end, :]
        out.append((suffix, dtype_name(a.dtype), view))
    return out


def kv_suffixes(desc: dict) -> list[str]:
    if desc["class"] == "QuantizedKVCache":
        return ["k0", "k1", "k2", "v0", "v1", "v2"]
    return ["k", "v"]


def build_splittable(desc: dict, arrays: dict[str, mx.array], n_tokens: int) -> Any:
    """Rebuilds a splittable layer whose arrays hold ``n_tokens`` live rows (KVCache and
    QuantizedKVCache buffers may have spare rows after them)."""
    cls = ALLOWED_CLASSES[desc["class"]]
    if desc["class"] == "QuantizedKVCache":
        layer = cls(group_size=desc["group_size"], bits=desc["bits"])
        layer.keys = tuple(arrays[f"k{i}"] for i in range(3))
        layer.values = tuple(arrays[f"v{i}"] for i in range(3))
    else:
        layer = cls()
        layer.keys, layer.values = arrays["k"], arrays["v"]
    layer.offset = n_tokens
    return layer


def _temporal(layer: Any, v: mx.array) -> mx.array:
    """Rows of a RotatingKVCache buffer in the order the tokens came."""
    idx, keep = layer._idx, layer.keep
    if idx == v.shape[2]:
        return v
    if idx < layer.offset:
        return mx.concatenate([v[..., :keep, :], v[..., idx:, :], v[..., keep:idx, :]], axis=2)
    return v[..., :idx, :]


def host_state(layer: Any) -> tuple[list[tuple[str, str, np.ndarray]], dict]:
    """``encode_state`` as ``(name, dtype, numpy view)`` triples, for writing."""
    if isinstance(layer, HostLayer):
        return [(n, dt, v) for n, (dt, v) in layer.arrays.items()], layer.meta
    tensors, meta = encode_state(layer)
    return [(n, dtype_name(a.dtype), as_numpy(a)) for n, a in tensors.items()], meta


def encode_state(layer: Any, prefix: str = "") -> tuple[dict[str, mx.array], dict]:
    """Whole state of a checkpoint layer as tensors plus JSON metadata."""
    name = _class_name(layer)
    tensors: dict[str, mx.array] = {}
    meta: dict = {"class": name}
    if name == "CacheList":
        meta["children"] = []
        for j, child in enumerate(layer.caches):
            t, m = encode_state(child, f"{prefix}c{j}.")
            tensors.update(t)
            meta["children"].append(m)
        return tensors, meta
    if name == "ArraysCache":
        if layer.left_padding is not None or layer.lengths is not None:
            raise UnsupportedCacheError("batched ArraysCache state can't be stored")
        meta["size"] = len(layer.cache)
        meta["present"] = [a is not None for a in layer.cache]
        for j, a in enumerate(layer.cache):
            if a is not None:
                tensors[f"{prefix}a{j}"] = a
        return tensors, meta
    if layer.keys is None:
        meta["empty"] = True
        return tensors, meta
    if name == "RotatingKVCache":
        k, v = _temporal(layer, layer.keys), _temporal(layer, layer.values)
        meta.update(offset=layer.offset, keep=layer.keep, max_size=layer.max_size)
    elif name == "ChunkedKVCache":
        live = layer.offset - layer.start_position
        k, v = layer.keys[..., :live, :], layer.values[..., :live, :]
        meta.update(
            offset=layer.offset,
            chunk_size=layer.chunk_size,
            start_position=layer.start_position,
        )
    elif name == "QuantizedKVCache":
        for i in range(3):
            tensors[f"{prefix}k{i}"] = layer.keys[i][..., : layer.offset, :]
            tensors[f"{prefix}v{i}"] = layer.values[i][..., : layer.offset, :]
        meta.update(offset=layer.offset, group_size=layer.group_size, bits=layer.bits)
        return tensors, meta
    else:  # KVCache / ConcatenateKVCache inside a CacheList
        k, v = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
        meta["offset"] = layer.offset
    tensors[f"{prefix}k"], tensors[f"{prefix}v"] = k, v
    return tensors, meta


def decode_state(meta: dict, tensors: dict[str, mx.array], prefix: str = "") -> Any:
    """Inverse of :func:`encode_state`; only builds allow-listed classes."""
    name = meta.get("class")
    if name not in ALLOWED_CLASSES:
        raise UnsupportedCacheError(f"refusing to build cache class {name!r}")
    cls = ALLOWED_CLASSES[name]
    if name == "CacheList":
        children = [
            decode_state(m, tensors, f"{prefix}c{j}.") for j, m in enumerate(meta["children"])
        ]
        return cls(*children)
    if name == "ArraysCache":
        layer = cls(int(meta["size"]))
        layer.cache = [
            tensors[f"{prefix}a{j}"] if present else None
            for j, present in enumerate(meta["present"])
        ]
        return layer
    if name == "RotatingKVCache":
        layer = cls(max_size=int(meta.get("max_size", 0) or 0), keep=int(meta.get("keep", 0)))
    elif name == "ChunkedKVCache":
        layer = cls(int(meta.get("chunk_size", 0)))
    elif name == "QuantizedKVCache":
        layer = cls(group_size=int(meta.get("group_size", 64)), bits=int(meta.get("bits", 8)))
    else:
        layer = cls()
    if meta.get("empty"):
        return layer
    if name == "QuantizedKVCache":
        layer.keys = tuple(tensors[f"{prefix}k{i}"] for i in range(3))
        layer.values = tuple(tensors[f"{prefix}v{i}"] for i in range(3))
    else:
        layer.keys, layer.values = tensors[f"{prefix}k"], tensors[f"{prefix}v"]
    layer.offset = int(meta["offset"])
    if name == "RotatingKVCache":
        layer._idx = layer.keys.shape[2]
    elif name == "ChunkedKVCache":
        layer.start_position = int(meta["start_position"])
    return layer

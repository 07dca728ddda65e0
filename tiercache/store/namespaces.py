"""How a model maps to a disk namespace.

The namespace never comes from how a caller spells the model (a repo id, a path, a
tuple of paths): it comes from the model folder's files (config, tokenizer, weight
headers and sizes) and from the cache the model really builds — each layer's class,
class parameters and KV dtype — found by running the model on one token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import xxhash

from .hashing import Namespace, adapter_files_fingerprint, model_files_fingerprint
from .layers import cache_geometry, describe_cache


def probe_layout(model: Any) -> tuple[list[dict], dict]:
    """Describe the cache a model builds, and its geometry.

    A one-token forward pass is the only reliable way to learn the KV dtype
    (quantized weights, mixed precision and hybrid layers all change it).

    Returns:
        ``(layer_desc, geometry)``: the class and dtype of every layer (part of
        the namespace id), and ``{"layers": <shape and dtype of every stored
        tensor per layer>, "vocab_size": <logits width>}``, which imports,
        restores and ``verify`` check stored KV against.
    """
    cache = make_prompt_cache(model)
    out = model(mx.array([[0]]), cache=cache)
    mx.eval(out)
    mx.eval(list(cache_arrays(cache)))
    return describe_cache(cache), {"layers": cache_geometry(cache), "vocab_size": int(out.shape[-1])}


def probe_layer_desc(model: Any) -> list[dict]:
    """Describe the cache a model builds (class and dtype of every layer)."""
    return probe_layout(model)[0]


def cache_arrays(obj: Any):
    """Every ``mx.array`` inside a prompt cache (nested lists and CacheLists too)."""
    if isinstance(obj, mx.array):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from cache_arrays(x)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from cache_arrays(v)


def _local_model(ref: Any) -> Path | None:
    """A local model folder for a path or an already-downloaded Hugging Face repo id."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    p = Path(ref)
    if (p / "config.json").is_file():
        return p
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(ref), local_files_only=True))
        if (local / "config.json").is_file():
            return local
    except Exception:
        return None
    return None


def model_path_of(key: Any) -> Path | None:
    """The local model folder named by a cache key, if any.

    Accepts a path, or a tuple whose first item is a path (mlx_lm.server passes
    ``(model_path, adapter_path, draft_model_path)``).
    """
    if isinstance(key, tuple) and key:
        key = key[0]
    return _local_model(key)


def stack_fingerprint(
    model_path, adapter_path=None, draft_model_path=None, digest=None
) -> tuple[bytes, dict]:
    """Fingerprint of everything that shapes the KV a server computes: the model's
    files, plus an adapter's (a LoRA changes every layer's K/V) and a draft model's
    (its cache layers are part of the prompt cache). Without adapter and draft it
    equals :func:`tiercache.store.hashing.model_files_fingerprint`. ``digest`` hashes
    weight files (a store's memoizing :meth:`~tiercache.store.disk.DiskStore.file_digest`).

    Raises:
        FileNotFoundError: a path that names no local files.
    """
    fp, desc = model_files_fingerprint(_local_model(model_path) or model_path, digest)
    if adapter_path is None and draft_model_path is None:
        return fp, desc
    h = xxhash.xxh3_128()
    h.update(b"tiercache-stack" + fp)
    if adapter_path is not None:
        h.update(b"adapter" + adapter_files_fingerprint(adapter_path, digest))
        desc["adapter"] = str(adapter_path)
    if draft_model_path is not None:
        draft = _local_model(draft_model_path)
        if draft is None:
            raise FileNotFoundError(f"draft model {draft_model_path} is not local")
        h.update(b"draft" + model_files_fingerprint(draft, digest)[0])
        desc["draft_model"] = str(draft)
    return h.digest(), desc


def key_fingerprint(key: Any, digest=None) -> tuple[bytes, dict] | None:
    """:func:`stack_fingerprint` of the model, adapter and draft a cache key names,
    or None when they aren't all local files (such keys stay memory-only)."""
    path = model_path_of(key)
    if path is None:
        return None
    adapter = key[1] if isinstance(key, tuple) and len(key) > 1 else None
    draft = key[2] if isinstance(key, tuple) and len(key) > 2 else None
    try:
        return stack_fingerprint(path, adapter, draft, digest)
    except OSError:
        return None


def model_namespace(
    store,
    model_path: str | os.PathLike,
    model: Any = None,
    layer_desc=None,
    *,
    geometry: dict | None = None,
    adapter_path=None,
    draft_model_path=None,
    draft_model: Any = None,
) -> Namespace:
    """Registers (if new) and returns the namespace of a model in a store.

    Args:
        store: a :class:`tiercache.store.disk.DiskStore`.
        model_path: the local model folder.
        model: the loaded model, probed for its cache layout and geometry
            (recorded with the namespace).
        layer_desc: the cache layout, when there is no model to probe.
        geometry: the cache geometry (see :func:`probe_layout`) that goes with
            ``layer_desc``; without a model or this, none is recorded.
        adapter_path: an adapter applied to the model (part of the fingerprint).
        draft_model_path: a draft model whose cache layers follow the model's.
        draft_model: the loaded draft model (its layers are probed too).
    """
    fp, desc = stack_fingerprint(model_path, adapter_path, draft_model_path, store.file_digest)
    if model is not None:
        probed, geometry = probe_layout(model)
        if draft_model is not None:
            d_desc, d_geo = probe_layout(draft_model)
            probed, geometry["layers"] = probed + d_desc, geometry["layers"] + d_geo["layers"]
        if layer_desc is not None and layer_desc != probed:
            raise ValueError("the layer description given is not the model's")
        layer_desc = probed
    if layer_desc is None:
        raise ValueError("need the model or its layer description")
    return store.register_namespace(fp, layer_desc, desc, geometry=geometry)

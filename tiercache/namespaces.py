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

from .hashing import Namespace, model_files_fingerprint
from .layers import describe_cache


def probe_layer_desc(model: Any) -> list[dict]:
    """Describes the cache a model builds (class and dtype of every layer).

    A one-token forward pass is the only reliable way to learn the KV dtype
    (quantized weights, mixed precision and hybrid layers all change it).
    """
    cache = make_prompt_cache(model)
    out = model(mx.array([[0]]), cache=cache)
    mx.eval(out)
    mx.eval(list(cache_arrays(cache)))
    return describe_cache(cache)


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


def model_path_of(key: Any) -> Path | None:
    """The local model folder named by a cache key, if any.

    Accepts a path, or a tuple whose first item is a path (mlx_lm.server passes
    ``(model_path, adapter_path, draft_model_path)``).
    """
    if isinstance(key, tuple) and key:
        key = key[0]
    if isinstance(key, (str, os.PathLike)):
        p = Path(key)
        if (p / "config.json").is_file():
            return p
        try:  # a Hugging Face repo id already in the local hub cache
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(key), local_files_only=True))
            if (local / "config.json").is_file():
                return local
        except Exception:
            return None
    return None


def model_namespace(store, model_path: str | os.PathLike, model: Any = None, layer_desc=None) -> Namespace:
    """Registers (if new) and returns the namespace of a model in a store.

    Args:
        store: a :class:`tiercache.disk.DiskStore`.
        model_path: the local model folder.
        model: the loaded model, used to probe the cache layout when
            ``layer_desc`` is not given.
        layer_desc: the cache layout, if already known.
    """
    fp, desc = model_files_fingerprint(model_path)
    if layer_desc is None:
        if model is None:
            raise ValueError("need the model or its layer description")
        layer_desc = probe_layer_desc(model)
    return store.register_namespace(fp, layer_desc, desc)

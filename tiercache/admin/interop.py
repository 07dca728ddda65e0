"""Export stored prefixes to mlx-lm prompt-cache files, and import such files.

Export writes exactly what :func:`mlx_lm.models.cache.save_prompt_cache` writes
(it is called on the restored cache objects), so
:func:`mlx_lm.models.cache.load_prompt_cache` reads the file with the mlx-lm
version installed here. Our metadata rides along in the file's user metadata:
``tiercache`` (= ``"export"``), ``tiercache_format``, ``namespace`` (hex), ``tokens``
(a JSON list) and ``model`` (the model folder recorded in the store).

Import never goes through ``load_prompt_cache``, which instantiates whatever class
name the file holds (``globals()[name]``). We parse the file's metadata ourselves,
check every class name — including those nested in a ``CacheList`` — against
:data:`tiercache.store.layers.ALLOWED_CLASSES` before building any object, and only then
rebuild the layers from their state.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
from mlx.utils import tree_unflatten

from ..errors import TiercacheError
from ..store import layers as L
from ..store.disk import DiskStore, RestorePlan, SaveResult
from ..store.hashing import FORMAT_VERSION, model_files_fingerprint
from ..store.blockfile import TEMP_MARK
from ..store.index import Record
from ..store.layout import INDEX_DIR
from ..store.namespaces import model_namespace, probe_layout
from .inspect import chain_tokens, load_view, plan_for, resolve_id

EXPORT_TAG = "export"

# Number of entries in each allowed class's ``state`` (mlx-lm 0.32).
_STATE_LEN = {
    "KVCache": 3,
    "QuantizedKVCache": 5,
    "ConcatenateKVCache": 2,
    "RotatingKVCache": 6,
    "ArraysCache": 3,
    "ChunkedKVCache": 5,
}


class InteropError(TiercacheError, ValueError):
    """A prompt-cache file can't be exported or imported."""


@dataclass
class ExportResult:
    path: str
    tokens: int
    namespace: str
    bytes: int


@dataclass
class ImportResult:
    namespace: str
    tokens: int
    records_written: int
    bytes_written: int
    records_skipped: int
    source_namespace: str | None


# --- export --------------------------------------------------------------------------------


def _plan_and_tokens(store: DiskStore, what: Any) -> tuple[RestorePlan, list[int]]:
    if isinstance(what, RestorePlan):
        toks: list[int] = []
        for r in what.records:
            toks.extend(r.token_list)
        return what, toks[: what.n_tokens]
    view = load_view(store)
    if isinstance(what, Record):
        rec = what
    elif isinstance(what, (bytes, bytearray)):
        rec = resolve_id(view, bytes(what).hex())
    elif isinstance(what, str):
        rec = resolve_id(view, what)
    else:
        raise TypeError("expected a Record, a RestorePlan or a record id")
    plan = plan_for(store, view, rec)
    return plan, chain_tokens(plan.records)[: plan.n_tokens]


def _store_holding(folder: Path) -> Path | None:
    """The tiercache store a folder is in (itself or an ancestor has an index)."""
    for d in (folder, *folder.parents):
        if (d / INDEX_DIR).exists():
            return d
    return None


def _export_target(out_path: str | os.PathLike, follow_symlinks: bool) -> Path:
    """Where an export may write: never inside a store, never through a symlink
    unless asked (then the link's target is checked instead)."""
    out = str(out_path)
    if not out.endswith(".safetensors"):
        out += ".safetensors"
    path = Path(os.path.abspath(out))
    if path.is_symlink():
        if not follow_symlinks:
            raise InteropError(
                f"{path} is a symlink: refusing to write through it (--follow-symlinks to do so)"
            )
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InteropError(f"{path} is a folder")
    # Resolve the folder (symlinked folders included): a store reached through
    # a link is still a store.
    store_dir = _store_holding(Path(os.path.realpath(path.parent)))
    if store_dir is not None:
        raise InteropError(f"{path} is inside a tiercache store ({store_dir}): export elsewhere")
    return path


def _save_atomically(path: Path, cache: list, meta: dict) -> None:
    """Writes the file under a temp name in its folder, fsyncs it and renames it
    into place, so the destination holds the old file or the whole new one."""
    import mlx_lm.models.cache as mlc

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}.safetensors")
    try:
        mlc.save_prompt_cache(str(tmp), cache, meta)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def export_mlx_lm(
    store: DiskStore, what: Any, out_path: str | os.PathLike, *, follow_symlinks: bool = False
) -> ExportResult:
    """Writes a stored prefix as an mlx-lm prompt-cache ``.safetensors`` file.

    The file is written to a temp name next to the destination and renamed into
    place. Destinations inside any tiercache store are refused (an export there
    could overwrite a live block), and so is a symlink at the destination unless
    ``follow_symlinks`` is set.

    Args:
        store: the store (read-only is fine).
        what: a :class:`Record`, a :class:`RestorePlan`, or a record id (bytes, or
            hex / a unique hex prefix of at least 8 digits).
        out_path: the file to write (``.safetensors`` is added if missing).
        follow_symlinks: write to the target of a symlink at ``out_path``.

    Raises:
        InteropError / ValueError: unknown id, broken chain, unrestorable record,
            or a destination refused as above.
        RestoreError: a block file is missing or corrupt.
    """
    target = _export_target(out_path, follow_symlinks)
    plan, tokens = _plan_and_tokens(store, what)
    if plan.n_tokens == 0:
        raise InteropError("nothing to export: the prefix holds no tokens")
    cache = store.restore(plan)
    # Restored buffers carry spare rows for decoding; the file holds live rows only.
    for layer in cache:
        if type(layer).__name__ == "KVCache" and layer.keys.shape[2] > layer.offset:
            layer.keys = layer.keys[..., : layer.offset, :]
            layer.values = layer.values[..., : layer.offset, :]
        elif type(layer).__name__ == "QuantizedKVCache" and layer.keys[0].shape[2] > layer.offset:
            layer.keys = tuple(a[..., : layer.offset, :] for a in layer.keys)
            layer.values = tuple(a[..., : layer.offset, :] for a in layer.values)
    model = ((store.namespaces().get(plan.namespace) or {}).get("model") or {}).get("path", "")
    meta = {
        "tiercache": EXPORT_TAG,
        "tiercache_format": str(FORMAT_VERSION),
        "namespace": plan.namespace.hex(),
        "tokens": json.dumps(tokens, separators=(",", ":")),
        "model": model or "",
    }
    _save_atomically(target, cache, meta)
    return ExportResult(str(target), len(tokens), plan.namespace.hex(), target.stat().st_size)


# --- safe reading ------------------------------------------------------------------------


def _decode_scalars(arrays: dict, scalars: list) -> dict:
    for item in scalars[1:]:
        if not isinstance(item, list) or len(item) != 2:
            raise InteropError("malformed scalar table in the file's metadata")
        pos, kind = item
        if pos not in arrays:
            raise InteropError(f"metadata names a missing tensor {pos!r}")
        a = arrays[pos]
        if kind == "scalar":
            arrays[pos] = a.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(int(i)) for i in a.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise InteropError(f"unknown scalar type {kind!r} in the file")
    return arrays


def _check_classes(name: Any, state: Any, where: str) -> None:
    """Validates a class name (recursively for CacheList) without building anything."""
    if not isinstance(name, str) or name not in L.ALLOWED_CLASSES:
        raise InteropError(f"{where}: cache class {name!r} is not allowed")
    if name == "CacheList":
        if not isinstance(state, list):
            raise InteropError(f"{where}: malformed CacheList state")
        for j, child in enumerate(state):
            if not isinstance(child, list) or len(child) != 2:
                raise InteropError(f"{where}.{j}: malformed CacheList entry")
            _check_classes(child[1], child[0], f"{where}.{j}")
        return
    if not isinstance(state, list) or len(state) != _STATE_LEN[name]:
        raise InteropError(f"{where}: malformed {name} state")


def _build(name: str, state: list) -> Any:
    """Builds one (already validated) allow-listed layer from its state."""
    cls = L.ALLOWED_CLASSES[name]
    if name == "CacheList":
        return cls(*[_build(c[1], c[0]) for c in state])
    obj = cls.__new__(cls)
    if name == "ArraysCache":
        cache, left_padding, lengths = state
        if not isinstance(cache, list):
            raise InteropError("malformed ArraysCache state")
        obj.state = (list(cache), left_padding, lengths)
        return obj
    obj.state = tuple(state)
    keys = getattr(obj, "keys", None)
    off = getattr(obj, "offset", None)
    if keys is not None and not isinstance(keys, (mx.array, tuple, list)):
        raise InteropError(f"malformed {name} keys")
    if off is not None and not isinstance(off, int):
        raise InteropError(f"malformed {name} offset")
    if isinstance(keys, (tuple, list)):
        obj.keys, obj.values = tuple(obj.keys), tuple(obj.values)
    return obj


def read_prompt_cache(path: str | os.PathLike) -> tuple[list, dict]:
    """Reads an mlx-lm prompt-cache file without instantiating unknown classes.

    Returns:
        ``(cache layers, user metadata)``.

    Raises:
        InteropError: not a prompt-cache file, or a class outside the allow-list.
    """
    p = Path(path)
    if not p.is_file():
        raise InteropError(f"{p}: no such file")
    try:
        arrays, flat = mx.load(str(p), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for non-safetensors input
        raise InteropError(f"{p}: not a safetensors file ({str(e).splitlines()[0]})") from None
    try:
        tree = tree_unflatten(list(flat.items()))
    except Exception:
        raise InteropError(f"{p}: not an mlx-lm prompt-cache file (unreadable metadata)") from None
    if not isinstance(tree, list) or len(tree) != 3:
        raise InteropError(f"{p}: not an mlx-lm prompt-cache file")
    user_meta, classes, scalars = tree
    if isinstance(user_meta, str) and user_meta == "":
        user_meta = {}
    if not isinstance(classes, list) or not isinstance(scalars, list) or not isinstance(user_meta, dict):
        raise InteropError(f"{p}: not an mlx-lm prompt-cache file")
    # Top-level class names first: nothing is decoded or built before they pass.
    for i, c in enumerate(classes):
        if not isinstance(c, str) or c not in L.ALLOWED_CLASSES:
            raise InteropError(f"{p}: layer {i}: cache class {c!r} is not allowed")
    arrays = _decode_scalars(dict(arrays), scalars)
    states = tree_unflatten(list(arrays.items())) if arrays else []
    if not isinstance(states, list) or len(states) != len(classes):
        raise InteropError(f"{p}: {len(classes)} cache classes but {len(states) if isinstance(states, list) else '?'} states")
    for i, (c, s) in enumerate(zip(classes, states)):
        _check_classes(c, s, f"layer {i}")
    try:
        cache = [_build(c, s) for c, s in zip(classes, states)]
    except InteropError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise InteropError(f"{p}: malformed cache state ({e})") from None
    return cache, {str(k): str(v) for k, v in user_meta.items()}


# --- import --------------------------------------------------------------------------------


def _parse_tokens(tokens: Any) -> list[int]:
    if isinstance(tokens, str):
        try:
            tokens = json.loads(tokens)
        except ValueError:
            raise InteropError("tokens must be a JSON list of integers") from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InteropError("tokens must be a JSON list of integers")
    return tokens


def _cache_tokens(cache: list) -> int | None:
    """Tokens held, from the first layer that records an offset."""
    for c in cache:
        inner = c.caches if type(c).__name__ == "CacheList" else [c]
        for x in inner:
            off = getattr(x, "offset", None)
            if isinstance(off, int):
                return off
    return None


def import_mlx_lm(
    store: DiskStore,
    file: str | os.PathLike,
    model_path: str | os.PathLike,
    model: Any = None,
    tokens: Sequence[int] | str | None = None,
) -> ImportResult:
    """Stores an mlx-lm prompt-cache file under a model's namespace.

    Args:
        store: a writable store.
        file: the ``.safetensors`` prompt-cache file.
        model_path: the local model folder the cache was computed with.
        model: the loaded model; when ``None``, a namespace already registered for
            the folder's files with the file's cache layout is used, else the model is
            loaded with ``mlx_lm.load`` to probe its layout.
        tokens: the token ids the cache holds; default: the file's ``tokens``
            metadata (present in files written by :func:`export_mlx_lm`).

    Raises:
        InteropError: disallowed class, malformed file, missing/mismatched tokens,
            or a cache layout that does not belong to the model.
    """
    cache, meta = read_prompt_cache(file)
    if tokens is None:
        if "tokens" not in meta:
            raise InteropError(
                "the file does not record its token ids (not a tiercache export): pass them (--tokens)"
            )
        tokens = meta["tokens"]
    toks = _parse_tokens(tokens) if isinstance(tokens, str) else _parse_tokens(list(tokens))
    held = _cache_tokens(cache)
    if held is not None and held != len(toks):
        raise InteropError(f"the cache holds {held} tokens but {len(toks)} token ids were given")
    try:
        desc = L.describe_cache(cache)
    except L.UnsupportedCacheError as e:
        raise InteropError(str(e)) from None
    except (AttributeError, TypeError, KeyError):
        raise InteropError("the file's cache layers are empty or malformed") from None
    mp = Path(model_path)
    if not (mp / "config.json").is_file():
        raise InteropError(f"{mp} is not a model folder (no config.json)")
    ns, geometry = None, None
    if model is None:
        fp, _ = model_files_fingerprint(mp, store.file_digest)
        for cand in store.namespaces_for_files(fp):
            if store.layer_desc(cand) == desc:
                ns, geometry = cand, store.geometry(cand)
                break
        if geometry is None:  # the model's own cache shapes are needed: probe it
            import mlx_lm

            model, _ = mlx_lm.load(str(mp))
    if geometry is None:
        layer_desc, geometry = probe_layout(model)
        if layer_desc != desc:
            raise InteropError(
                "the file's cache layout does not match the model "
                f"({_brief(desc)} vs {_brief(layer_desc)}): was it made with another model?"
            )
        ns = None
    # Everything is checked before anything (the namespace included) is written.
    _check_geometry(cache, geometry, toks)
    if ns is None:
        ns = model_namespace(store, mp, layer_desc=desc, geometry=geometry)
    res: SaveResult = store.save(ns, toks, cache)
    return ImportResult(
        namespace=ns.hex(),
        tokens=len(toks),
        records_written=res.records_written,
        bytes_written=res.bytes_written,
        records_skipped=res.records_skipped,
        source_namespace=meta.get("namespace"),
    )


def _check_geometry(cache: list, geometry: dict, tokens: list[int]) -> None:
    """Refuse arrays whose shapes or dtypes are not the model's own cache layout
    (another head count or head size would fail every request extending these
    tokens), and token ids outside the model's vocabulary."""
    want = geometry.get("layers") or []
    try:
        got = L.cache_geometry(cache)
    except (AttributeError, TypeError, KeyError, ValueError):
        raise InteropError("the file's cache layers are empty or malformed") from None
    if len(got) != len(want):
        raise InteropError(f"the file has {len(got)} cache layers, the model {len(want)}")
    for li, layer in enumerate(got):
        for name, g in layer.items():
            misfit = L.geometry_misfit(want, f"{li}.{name}", g[-1], g[:-1])
            if misfit:
                raise InteropError(f"the file does not fit the model: {misfit}")
    vocab = geometry.get("vocab_size")
    bad = [t for t in tokens if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise InteropError(
            f"token id {bad[0]} is outside the model's vocabulary (0..{(vocab or 2**32) - 1})"
        )


def _brief(desc: list) -> str:
    classes = sorted({d.get("class", "?") + "/" + str(d.get("dtype")) for d in desc})
    return f"{len(desc)} layers: {', '.join(classes)}"

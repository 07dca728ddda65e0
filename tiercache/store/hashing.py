"""Typed, deterministic hashes: chain roots, block chain hashes and model namespaces.

Everything stored on disk is addressed by xxh3-128 digests computed from bytes we
define (never Python's ``hash()``, never pickle), so the same tokens give the same
hashes in every process, on every machine and after every restart.
"""

from __future__ import annotations

import array
import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable, NewType, Sequence

import numpy as np
import xxhash

#: Version of the on-disk layout; part of every namespace and checked on open.
FORMAT_VERSION = 1
#: Tag mixed into every chain root so hashes of another scheme can never collide with ours.
CHAIN_TAG = b"tiercache-chain-v1"
HASH_ALGORITHM = "xxh3_128"

BlockHash = NewType("BlockHash", bytes)
"""16-byte chain hash of a block (or of the chain root)."""

Namespace = NewType("Namespace", bytes)
"""16-byte fingerprint of everything that makes a model's KV bytes differ."""

HASH_SIZE = 16

# Files whose bytes change the tokens or the KV a model computes.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


def _digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Packs token ids as little-endian uint32, the byte form that is hashed and stored.

    Args:
        tokens: token ids, each in ``[0, 2**32)``.

    Returns:
        ``4 * len(tokens)`` bytes.

    Raises:
        ValueError: if a token id is negative or does not fit in 32 bits.
    """
    if not isinstance(tokens, np.ndarray) and _NATIVE_U32:
        # array('I') converts a list ~3x faster than numpy and range-checks for us.
        try:
            a = array.array("I", tokens)
        except (OverflowError, TypeError):
            pass  # out of range or not plain ints: numpy path below decides
        else:
            if sys.byteorder != "little":
                a.byteswap()
            return a.tobytes()
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4").tobytes()


_NATIVE_U32 = array.array("I").itemsize == 4


def unpack_tokens(data: bytes) -> list[int]:
    """Inverse of :func:`pack_tokens`."""
    return np.frombuffer(data, dtype="<u4").tolist()


def salt_bytes(salt: str | bytes | None) -> bytes:
    """Normalises a tenant salt to bytes (UTF-8 for strings, empty for ``None``)."""
    if salt is None:
        return b""
    if isinstance(salt, str):
        return salt.encode("utf-8")
    if isinstance(salt, (bytes, bytearray)):
        return bytes(salt)
    raise TypeError(f"salt must be str, bytes or None, not {type(salt).__name__}")


def chain_root(namespace: Namespace, salt: str | bytes | None = None) -> BlockHash:
    """Root of a token-hash chain: xxh3_128(tag ‖ namespace ‖ salt).

    The salt's length is mixed in too, so ``salt=b""`` and ``salt=None`` are equal
    but no salt can masquerade as a longer namespace.
    """
    if len(namespace) != HASH_SIZE:
        raise ValueError("namespace must be 16 bytes")
    s = salt_bytes(salt)
    return BlockHash(_digest(CHAIN_TAG + namespace + struct.pack("<Q", len(s)) + s))


def next_hash(parent: BlockHash, packed_block: bytes) -> BlockHash:
    """Chain step: xxh3_128(parent ‖ packed tokens of the block)."""
    return BlockHash(_digest(parent + packed_block))


def block_hashes(root: BlockHash, tokens: Sequence[int], block_size: int) -> list[BlockHash]:
    """Chain hashes of every *full* block of ``tokens``.

    Args:
        root: the chain root (see :func:`chain_root`).
        tokens: the token ids.
        block_size: tokens per block.

    Returns:
        ``len(tokens) // block_size`` hashes; hash ``i`` covers ``tokens[: (i+1)*B]``.
    """
    return packed_block_hashes(root, pack_tokens(tokens), block_size)


def packed_block_hashes(root: BlockHash, packed: bytes, block_size: int) -> list[BlockHash]:
    """:func:`block_hashes` of tokens already packed by :func:`pack_tokens`."""
    width = 4 * block_size
    mv = memoryview(packed)
    out: list[BlockHash] = []
    h = root
    for i in range(len(packed) // width):
        x = xxhash.xxh3_128(h)
        x.update(mv[i * width : (i + 1) * width])
        h = BlockHash(x.digest())
        out.append(h)
    return out


def checkpoint_id(parent: BlockHash, tail_tokens: Sequence[int]) -> bytes:
    """Id of a checkpoint/tail record: the block it hangs from plus its tail tokens."""
    return packed_checkpoint_id(parent, pack_tokens(tail_tokens))


def packed_checkpoint_id(parent: BlockHash, packed_tail: bytes) -> bytes:
    """:func:`checkpoint_id` of tail tokens already packed by :func:`pack_tokens`."""
    return _digest(b"ckpt" + parent + packed_tail)


_HF_BLOB = 64  # hex digits of the sha256 a Hugging Face cache names its blobs by


def file_digest(path: Path) -> bytes:
    """xxh3-128 of a file's whole content.

    Weights must be hashed in full: two fine-tunes of one architecture (or two LoRA
    adapters of one rank) have byte-identical safetensors headers and sizes, and
    telling them apart is what keeps one's KV from being served to the other. A file
    in a Hugging Face cache is a link to a blob named by its sha256: that name is
    the content hash already, so nothing is read.
    """
    real = Path(os.path.realpath(path))
    name = real.name
    if len(name) == _HF_BLOB and all(c in "0123456789abcdef" for c in name) and "blobs" in real.parts:
        return xxhash.xxh3_128_digest(b"hf-blob" + name.encode())
    h = xxhash.xxh3_128()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(real, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.digest()


def model_files_fingerprint(
    model_path: str | os.PathLike, digest: "Callable[[Path], bytes] | None" = None
) -> tuple[bytes, dict]:
    """Fingerprint of a local model folder's files that determine its KV.

    Covers config.json, the tokenizer files, and the full content of every
    ``*.safetensors`` file (see :func:`file_digest`).

    Args:
        model_path: a local mlx-lm model folder.
        digest: how to hash a weight file; :meth:`tiercache.store.disk.DiskStore.file_digest`
            remembers digests by (path, size, mtime, inode) so only the first start
            after a change reads the weights.

    Returns:
        ``(16-byte digest, description)`` where description names the files used.

    Raises:
        FileNotFoundError: if the folder has no config.json.
    """
    root = Path(model_path)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{root} is not a model folder (no config.json)")
    h = xxhash.xxh3_128()
    used = []

    def add(name: str, data: bytes) -> None:
        h.update(struct.pack("<Q", len(name)) + name.encode())
        h.update(struct.pack("<Q", len(data)) + data)
        used.append(name)

    add("config.json", config.read_bytes())
    for name in _TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            add(name, p.read_bytes())
    digest = digest or file_digest
    for p in sorted(root.glob("*.safetensors")):
        add(p.name, digest(p) + struct.pack("<Q", p.stat().st_size))
    return h.digest(), {"path": str(root.resolve()), "files": used}


def adapter_files_fingerprint(
    path: str | os.PathLike, digest: "Callable[[Path], bytes] | None" = None
) -> bytes:
    """Fingerprint of an adapter (a file, or a folder such as a LoRA's): every file's
    full content (weights through ``digest``, see :func:`file_digest`)."""
    digest = digest or file_digest
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"{p}: no adapter files")
    h = xxhash.xxh3_128()
    for f in files:
        data = digest(f) + struct.pack("<Q", f.stat().st_size)
        h.update(struct.pack("<Q", len(f.name)) + f.name.encode())
        h.update(struct.pack("<Q", len(data)) + data)
    return h.digest()


def namespace_id(
    files_fingerprint: bytes, layer_desc: Iterable, block_size: int
) -> Namespace:
    """Namespace of a model + cache layout + block size + format version.

    Args:
        files_fingerprint: from :func:`model_files_fingerprint` (or any 16 bytes
            that identify the weights and tokenizer).
        layer_desc: JSON-able description of every cache layer (class and dtype),
            see :func:`tiercache.store.layers.describe_cache`.
        block_size: tokens per block.
    """
    desc = json.dumps(
        {
            "format": FORMAT_VERSION,
            "block_size": block_size,
            "layers": list(layer_desc),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return Namespace(_digest(b"tiercache-ns" + files_fingerprint + desc))

"""The remote record format and key layout, and the checks a remote hit must pass.

One Redis key holds one block (or tail, or checkpoint) with its metadata, so
eviction can never separate the two:

``tiercache:v1:<namespace hex>:<record id hex>`` ->
``header (82 bytes) ‖ the record's tokens (little-endian uint32) ‖ the block file``

The block file is byte for byte what the disk tier writes (a safetensors file), so
a hit is restored by the same reader and checked by the same checksum. The header:

==========  =====  ==============================================================
field       bytes  meaning
==========  =====  ==============================================================
magic       4      ``TCRR``
version     1      :data:`RECORD_VERSION`
kind        1      block, tail or checkpoint (``tiercache.store.index`` kinds)
namespace   16     the model namespace
parent      16     chain hash of the previous block (or the chain root)
id          16     the record id (the key's last part)
position    8      tokens from the chain start to the record's end
nbytes      8      length of the block file
checksum    8      xxh3_64 of the block file
n_tokens    4      tokens the record covers
==========  =====  ==============================================================

Nothing in a value is trusted: :func:`decode_verified` recomputes the record id
from the parent and the tokens (the chain hash for a block, the checkpoint id for a
tail), compares the tokens with the prompt's and checks the checksum. A shared
store is a poisoning surface: any mismatch is a miss.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from ..store.hashing import next_hash, packed_checkpoint_id
from ..store.index import KIND_BLOCK, KIND_CHECKPOINT, KIND_NAMES, KIND_TAIL, Record

MAGIC = b"TCRR"
RECORD_VERSION = 1
KEY_PREFIX = "tiercache:v1:"
_HEAD = struct.Struct("<4sBB16s16s16sQQQI")
HEADER_SIZE = _HEAD.size


class RemoteRecordError(ValueError):
    """A remote value is malformed or does not belong to the tokens asked for."""


def record_key(namespace: bytes, record_id: bytes) -> str:
    """The Redis key of a record: ``tiercache:v1:<namespace hex>:<id hex>``."""
    return f"{KEY_PREFIX}{namespace.hex()}:{record_id.hex()}"


def namespace_pattern(namespace: bytes | None = None) -> str:
    """A SCAN pattern for every record (of one namespace)."""
    return f"{KEY_PREFIX}{namespace.hex() if namespace else '*'}:*"


def parse_key(key: str | bytes) -> tuple[str, str] | None:
    """``(namespace hex, id hex)`` of one of our keys, or None."""
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not key.startswith(KEY_PREFIX):
        return None
    parts = key[len(KEY_PREFIX):].split(":")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def encode(rec: Record, payload: bytes) -> bytes:
    """One remote value: header, tokens, then the record's block file bytes."""
    head = _HEAD.pack(
        MAGIC, RECORD_VERSION, rec.kind, rec.namespace, rec.parent, rec.id,
        rec.position, len(payload), rec.checksum, rec.n_tokens,
    )
    return head + rec.tokens + payload


@dataclass
class RemoteRecord:
    """A decoded, verified remote value.

    Attributes:
        record: the record as the disk index would hold it.
        payload: the block file bytes.
    """

    record: Record
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def decode(raw: bytes) -> RemoteRecord:
    """Parses a value without checking it against a prompt (inspection).

    Raises:
        RemoteRecordError: if the value is not a record of this version or its
            lengths don't add up.
    """
    if len(raw) < HEADER_SIZE:
        raise RemoteRecordError("value too short")
    magic, version, kind, ns, parent, rid, pos, nbytes, checksum, ntok = _HEAD.unpack_from(raw)
    if magic != MAGIC or version != RECORD_VERSION:
        raise RemoteRecordError("not a tiercache record of this version")
    if kind not in KIND_NAMES:
        raise RemoteRecordError(f"unknown record kind {kind}")
    end_tokens = HEADER_SIZE + 4 * ntok
    if len(raw) != end_tokens + nbytes:
        raise RemoteRecordError("value length does not match its header")
    tokens = bytes(raw[HEADER_SIZE:end_tokens])
    payload = bytes(raw[end_tokens:])
    rec = Record(rid, kind, ns, parent, nbytes, checksum, 0.0, 0.0, 0, pos, tokens)
    return RemoteRecord(rec, payload)


def decode_verified(
    raw: bytes,
    *,
    record_id: bytes,
    namespace: bytes,
    parent: bytes,
    tokens: bytes,
    position: int,
    kinds: tuple[int, ...],
) -> RemoteRecord:
    """Parses a value and checks it belongs exactly where the lookup expects it.

    Args:
        raw: the value read under the key of ``record_id``.
        record_id: the id the lookup computed from the prompt.
        namespace: the namespace asked for.
        parent: the previous block's chain hash (or the chain root).
        tokens: the prompt's packed tokens this record must cover.
        position: the chain position the record must end at.
        kinds: record kinds acceptable here.

    Returns:
        The verified record.

    Raises:
        RemoteRecordError: on any mismatch (the caller counts it and misses).
    """
    rr = decode(raw)
    rec = rr.record
    if rec.kind not in kinds:
        raise RemoteRecordError(f"{KIND_NAMES[rec.kind]} where {'/'.join(KIND_NAMES[k] for k in kinds)} expected")
    if rec.id != record_id or rec.namespace != namespace or rec.parent != parent:
        raise RemoteRecordError("record id, namespace or parent differ from the key's")
    if rec.tokens != tokens or rec.position != position:
        raise RemoteRecordError("record covers other tokens")
    # The id must be the hash of its own parent and tokens, as the disk's check()
    # requires: a record stored under a key it doesn't hash to is never served.
    if rec.kind == KIND_BLOCK:
        if next_hash(parent, rec.tokens) != rec.id:
            raise RemoteRecordError("chain hash does not match parent and tokens")
    elif packed_checkpoint_id(parent, rec.tokens) != rec.id:
        raise RemoteRecordError("checkpoint id does not match parent and tokens")
    if xxhash.xxh3_64_intdigest(rr.payload) != rec.checksum:
        raise RemoteRecordError("checksum mismatch")
    return rr


__all__ = [
    "HEADER_SIZE", "KEY_PREFIX", "KIND_BLOCK", "KIND_CHECKPOINT", "KIND_TAIL", "MAGIC",
    "RECORD_VERSION", "RemoteRecord", "RemoteRecordError", "decode", "decode_verified",
    "encode", "namespace_pattern", "parse_key", "record_key",
]

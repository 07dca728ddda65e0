"""Chain hashes, namespaces and model fingerprints: deterministic and pinned."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tiercache.store.hashing import (
    CHAIN_TAG,
    block_hashes,
    chain_root,
    checkpoint_id,
    model_files_fingerprint,
    namespace_id,
    pack_tokens,
    unpack_tokens,
)

NS = bytes(range(16))
ROOT = Path(__file__).resolve().parent.parent

# Computed once with this code and hard-coded: any change to the chain scheme
# silently orphans every store on disk, so it must show up here.
PINNED_ROOT = "cd7198968a94ae6c835c0306be70871a"
PINNED_BLOCKS = ["69a1685c2f9cf75b502c10f46d5e0035", "219c84a12e4d1a1cbcc96f1b9b8beed9"]
PINNED_SALTED_ROOT = "e3a57ca477a0b3b7e4e2ec27ff1b12d0"
PINNED_CHECKPOINT = "cdac34aa05a222312a172fd8f9dcbe76"
PINNED_NAMESPACE = "6c15e2cbb17a9b7969a1944fe349ee1b"


def test_pinned_chain_hashes():
    root = chain_root(NS)
    assert root.hex() == PINNED_ROOT
    assert [h.hex() for h in block_hashes(root, list(range(10)), 4)] == PINNED_BLOCKS
    assert chain_root(NS, "tenant").hex() == PINNED_SALTED_ROOT
    assert checkpoint_id(root, [1, 2, 3]).hex() == PINNED_CHECKPOINT
    desc = [{"class": "KVCache", "dtype": "F32"}]
    assert namespace_id(b"\x01" * 16, desc, 4).hex() == PINNED_NAMESPACE


def test_chain_matches_spec():
    """h_i = xxh3_128(h_{i-1} ‖ block tokens as little-endian uint32)."""
    salt = "t1"
    root = xxhash.xxh3_128_digest(CHAIN_TAG + NS + struct.pack("<Q", 2) + b"t1")
    assert chain_root(NS, salt) == root
    toks = [7, 1 << 31, 0, 65535, 3, 4, 5, 6]
    h = root
    expect = []
    for i in range(2):
        h = xxhash.xxh3_128_digest(h + struct.pack("<4I", *toks[4 * i : 4 * i + 4]))
        expect.append(h)
    assert block_hashes(root, toks, 4) == expect
    assert block_hashes(root, toks + [9, 9, 9], 4) == expect  # partial block: no hash


def test_same_in_another_process():
    code = (
        "from tiercache.store.hashing import chain_root, block_hashes;"
        f"r = chain_root({NS!r}, 'x');"
        "print(''.join(h.hex() for h in block_hashes(r, list(range(40)), 8)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert out == "".join(h.hex() for h in block_hashes(chain_root(NS, "x"), list(range(40)), 8))


def test_salt_and_namespace_separate_chains():
    toks = list(range(8))
    a = block_hashes(chain_root(NS), toks, 4)
    assert block_hashes(chain_root(NS, ""), toks, 4) == a  # empty salt == no salt
    assert block_hashes(chain_root(NS, "a"), toks, 4) != a
    assert block_hashes(chain_root(NS, b"a"), toks, 4) == block_hashes(chain_root(NS, "a"), toks, 4)
    other = bytes(16)
    assert block_hashes(chain_root(other), toks, 4)[0] != a[0]
    # A change in block i changes every later hash and no earlier one.
    b = block_hashes(chain_root(NS), toks[:5] + [99] + toks[6:], 4)
    assert b[0] == a[0] and b[1] != a[1]
    with pytest.raises(ValueError):
        chain_root(b"short")
    with pytest.raises(TypeError):
        chain_root(NS, 5)


def test_pack_tokens():
    toks = [0, 1, 255, 256, (1 << 32) - 1]
    raw = pack_tokens(toks)
    assert raw == struct.pack("<5I", *toks)
    assert unpack_tokens(raw) == toks
    assert pack_tokens(np.array([1, 2], dtype=np.int32)) == struct.pack("<2I", 1, 2)
    assert pack_tokens([np.int64(3), np.uint32(4), 5]) == struct.pack("<3I", 3, 4, 5)
    assert pack_tokens(range(3)) == struct.pack("<3I", 0, 1, 2)
    assert pack_tokens([]) == b""
    for bad in ([-1], [1 << 32], [5, -2], np.array([-1]), [np.int64(-3)]):
        with pytest.raises(ValueError):
            pack_tokens(bad)


def test_namespace_inputs():
    desc = [{"class": "KVCache", "dtype": "F32"}]
    base = namespace_id(b"\x01" * 16, desc, 4)
    assert namespace_id(b"\x02" * 16, desc, 4) != base
    assert namespace_id(b"\x01" * 16, desc, 8) != base
    assert namespace_id(b"\x01" * 16, [{"class": "KVCache", "dtype": "BF16"}], 4) != base
    assert namespace_id(b"\x01" * 16, desc * 2, 4) != base


def test_model_files_fingerprint(tiny_llama_path, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_llama_path, copy)
    fp, info = model_files_fingerprint(copy)
    assert len(fp) == 16 and "config.json" in info["files"]
    assert model_files_fingerprint(copy)[0] == fp
    # Bigger weight file -> other fingerprint.
    weights = copy / "model.safetensors"
    with open(weights, "ab") as f:
        f.write(b"\0")
    fp2 = model_files_fingerprint(copy)[0]
    assert fp2 != fp
    # Tokenizer change -> other fingerprint.
    tok = copy / "tokenizer_config.json"
    tok.write_text(tok.read_text() + " ")
    assert model_files_fingerprint(copy)[0] not in (fp, fp2)
    with pytest.raises(FileNotFoundError):
        model_files_fingerprint(tmp_path)


def test_fine_tunes_with_identical_headers_get_different_namespaces(tiny_llama_path, tmp_path):
    """Two fine-tunes of one architecture have byte-identical safetensors headers and
    sizes: only the weights' content tells them apart, and it must."""
    import shutil

    import tiercache.store.hashing as hashing
    from tiercache.store.disk import DiskStore

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_llama_path, a)
    shutil.copytree(tiny_llama_path, b)
    w = b / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x01  # one weight byte, same header, same size
    w.write_bytes(bytes(raw))
    assert model_files_fingerprint(a)[0] != model_files_fingerprint(b)[0]
    # A store remembers digests by (path, size, mtime, inode): the second start
    # reads nothing, and a changed file is hashed again.
    store = DiskStore(tmp_path / "store")
    calls = []
    real = hashing.file_digest

    def counting(path):
        calls.append(path)
        return real(path)

    import tiercache.store.disk as disk_mod

    orig = disk_mod.file_digest
    disk_mod.file_digest = counting
    try:
        fp1 = model_files_fingerprint(b, store.file_digest)[0]
        fp2 = model_files_fingerprint(b, store.file_digest)[0]
        assert fp1 == fp2 == model_files_fingerprint(b)[0] and len(calls) == 1
        raw[-3] ^= 0x01
        w.write_bytes(bytes(raw))
        os.utime(w, ns=(1, 1))  # a new mtime even on coarse clocks
        assert model_files_fingerprint(b, store.file_digest)[0] == model_files_fingerprint(a)[0]
        assert len(calls) == 2
    finally:
        disk_mod.file_digest = orig
        store.close()

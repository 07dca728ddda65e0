"""Reading and writing our safetensors files with one copy on each path.

Writes stream each tensor's rows straight out of the MLX buffer (a zero-copy numpy
view), so slicing live rows out of mlx-lm's padded buffers costs no extra copy.
Reads ``readinto`` the file's bytes straight into preallocated MLX buffers, hashing
as they go, so a restore is one pass over the bytes. The files are plain safetensors
(the ``safetensors`` library loads them), written to a temp name, fsynced and renamed.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import numpy as np
import xxhash

from ..errors import TiercacheError

TEMP_MARK = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700

# mx dtype -> (safetensors name, numpy dtype used to move its bytes)
_DTYPES = {
    mx.float32: ("F32", np.float32),
    mx.float16: ("F16", np.float16),
    mx.bfloat16: ("BF16", np.uint16),
    mx.float64: ("F64", np.float64),
    mx.int8: ("I8", np.int8),
    mx.int16: ("I16", np.int16),
    mx.int32: ("I32", np.int32),
    mx.int64: ("I64", np.int64),
    mx.uint8: ("U8", np.uint8),
    mx.uint16: ("U16", np.uint16),
    mx.uint32: ("U32", np.uint32),
    mx.uint64: ("U64", np.uint64),
    mx.bool_: ("BOOL", np.bool_),
}
_BY_NAME = {name: (dt, npdt) for dt, (name, npdt) in _DTYPES.items()}


class BlockFileError(TiercacheError):
    """A file is missing, truncated, corrupt or not in the expected layout."""


def dtype_name(dtype: mx.Dtype) -> str:
    """Safetensors name of an MLX dtype (``F32``, ``BF16``...)."""
    return _DTYPES[dtype][0]


def mx_dtype(name: str) -> mx.Dtype:
    """MLX dtype of a safetensors dtype name."""
    try:
        return _BY_NAME[name][0]
    except KeyError:
        raise BlockFileError(f"unsupported dtype {name!r}") from None


def np_dtype(name: str) -> np.dtype:
    """Numpy dtype that carries the bytes of a safetensors dtype (BF16 -> uint16)."""
    try:
        return np.dtype(_BY_NAME[name][1])
    except KeyError:
        raise BlockFileError(f"unsupported dtype {name!r}") from None


def as_numpy(a: mx.array) -> np.ndarray:
    """Zero-copy numpy view of an evaluated, row-contiguous MLX array.

    bfloat16 has no numpy dtype, so its bits are viewed as uint16.
    """
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    return np.array(a, copy=False)


@dataclass
class TensorSource:
    """One tensor to write: a numpy view of its rows (may be a strided slice)."""

    name: str
    dtype: str
    array: np.ndarray


def _header_bytes(tensors: Sequence[TensorSource], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        n = t.array.nbytes
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.array.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _write_rows(f, h, arr: np.ndarray) -> None:
    """Writes ``arr`` in C order without copying when its inner rows are contiguous."""
    if arr.size == 0:  # e.g. the empty tail of a checkpoint taken on a block boundary
        return
    if arr.flags.c_contiguous:
        mv = memoryview(arr).cast("B")
        f.write(mv)
        h.update(mv)
        return
    # Padded mlx-lm buffers sliced on the sequence axis: every [..., :, :] plane
    # of the slice is contiguous, only the outer axes jump.
    outer = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 2 else arr[None]
    for plane in outer:
        if not plane.flags.c_contiguous:
            plane = np.ascontiguousarray(plane)
        mv = memoryview(plane).cast("B")
        f.write(mv)
        h.update(mv)


def fsync_dir(path: Path) -> None:
    """Makes a rename durable. A no-op where directories can't be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_private_dirs(folder: Path) -> None:
    """Creates ``folder`` and its missing parents, each 0700.

    (``Path.mkdir(parents=True)`` gives the parents the default mode.)
    """
    if folder.is_dir():
        return
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir(mode=DIR_MODE, exist_ok=True)


def write_tensor_file(
    path: Path, tensors: Sequence[TensorSource], metadata: dict[str, str]
) -> tuple[int, int]:
    """Writes a safetensors file durably: temp name, fsync, rename, fsync dir.

    Args:
        path: final file path; its folder is created (0700) if needed.
        tensors: tensors in file order.
        metadata: string metadata for the header.

    Returns:
        ``(file size in bytes, xxh3_64 of the file bytes)``.
    """
    make_private_dirs(path.parent)
    if path.parent.is_symlink() or path.parent.parent.is_symlink():
        raise OSError(f"{path.parent} is a symlink; refusing to write through it")
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    h = xxhash.xxh3_64()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), FILE_MODE)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            head = _header_bytes(tensors, metadata)
            f.write(head)
            h.update(head)
            for t in tensors:
                _write_rows(f, h, t.array)
            f.flush()
            size = f.tell()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return size, h.intdigest()


def write_bytes_file(path: Path, data: bytes) -> None:
    """Writes a file's bytes durably, as :func:`write_tensor_file` does (temp name,
    fsync, rename, fsync dir): records copied from another store keep their bytes."""
    make_private_dirs(path.parent)
    if path.parent.is_symlink() or path.parent.parent.is_symlink():
        raise OSError(f"{path.parent} is a symlink; refusing to write through it")
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


class HashingReader:
    """Reads a file sequentially into caller buffers while hashing every byte."""

    def __init__(self, path: Path | None, expected_size: int | None = None, *, stream=None):
        if stream is not None:
            # Bytes already in memory (a remote record): same checks, same hashing.
            self.f = stream
            size = len(stream.getbuffer())
        else:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
                self.f = os.fdopen(fd, "rb", buffering=0)
            except FileNotFoundError:
                raise BlockFileError(f"missing file {path.name}") from None
            except OSError as e:  # ELOOP: a symlink where a file should be
                raise BlockFileError(f"cannot open {path.name}: {e.strerror}") from None
            size = os.fstat(self.f.fileno()).st_size
        if expected_size is not None and size != expected_size:
            self.f.close()
            raise BlockFileError(f"size {size} != recorded {expected_size}")
        self.size = size
        self.h = xxhash.xxh3_64()
        try:  # a file truncated inside its header must not leak the descriptor
            raw8 = self._read_exact(8)
            (n,) = struct.unpack("<Q", raw8)
            if n > min(size, 100 << 20):
                raise BlockFileError("bad header length")
            raw = self._read_exact(n)
            try:
                self.header = json.loads(raw)
            except ValueError:
                raise BlockFileError("bad header") from None
            if not isinstance(self.header, dict):
                raise BlockFileError("bad header")
        except BaseException:
            self.close()
            raise
        self.data_start = 8 + n
        self.pos = 0  # position inside the data section

    @classmethod
    def from_bytes(cls, data: bytes, expected_size: int | None = None) -> "HashingReader":
        """A reader over a file's bytes held in memory (read exactly like a file)."""
        return cls(None, expected_size, stream=io.BytesIO(data))

    def _read_exact(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BlockFileError("truncated file")
        self.h.update(data)
        return data

    def readinto(self, mv: memoryview) -> None:
        """Fills ``mv`` with the next bytes of the data section."""
        n = mv.nbytes
        got = 0
        while got < n:
            k = self.f.readinto(mv[got:])
            if not k:
                raise BlockFileError("truncated file")
            got += k
        self.h.update(mv)
        self.pos += n

    def skip_to(self, data_offset: int) -> None:
        """Reads (and hashes) up to ``data_offset`` of the data section."""
        gap = data_offset - self.pos
        if gap < 0:
            raise BlockFileError("tensors out of order")
        if gap:
            self.readinto(memoryview(bytearray(gap)))

    def finish(self, expected_checksum: int | None) -> None:
        """Hashes the rest of the file and checks the checksum."""
        rest = self.f.read()
        self.h.update(rest)
        self.close()
        if expected_checksum is not None and self.h.intdigest() != expected_checksum:
            raise BlockFileError("checksum mismatch")

    def close(self) -> None:
        self.f.close()

    def tensor_info(self, name: str) -> tuple[str, list[int], int, int]:
        """``(dtype, shape, start, end)`` of a tensor, or BlockFileError."""
        info = self.header.get(name)
        if not isinstance(info, dict):
            raise BlockFileError(f"tensor {name!r} missing")
        try:
            s, e = info["data_offsets"]
            return info["dtype"], list(info["shape"]), int(s), int(e)
        except (KeyError, TypeError, ValueError):
            raise BlockFileError(f"tensor {name!r} has a bad header entry") from None

    def tensors_in_order(self) -> list[str]:
        """Tensor names sorted by their position in the file."""
        names = [k for k in self.header if k != "__metadata__"]
        return sorted(names, key=lambda k: self.tensor_info(k)[2])


def list_files(folder: Path) -> Iterable[Path]:
    """Every regular file under ``folder`` (two levels), never following symlinks."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for sub in sorted(folder.iterdir()):
        if sub.is_symlink():
            yield sub
        elif sub.is_dir():
            for p in sorted(sub.iterdir()):
                yield p
        else:
            yield sub

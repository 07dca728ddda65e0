"""One exception root: real failures of every layer are caught as TiercacheError."""

from __future__ import annotations

import pytest

from tiercache import ConfigError, StoreError, TiercacheError
from tiercache.admin.interop import InteropError, read_prompt_cache
from tiercache.store import layers as L
from tiercache.store.blockfile import BlockFileError, HashingReader
from tiercache.store.disk import DiskStore
from tiercache.store.index import Index, IndexError_
from tiercache.store.restore import RestoreError


def test_every_error_class_derives_from_the_root():
    for cls in (StoreError, IndexError_, BlockFileError, RestoreError, InteropError,
                L.UnsupportedCacheError, ConfigError):
        assert issubclass(cls, TiercacheError), cls
    # The ones about a bad argument stay ValueErrors for code written against those.
    for cls in (InteropError, L.UnsupportedCacheError, ConfigError):
        assert issubclass(cls, ValueError), cls


def test_real_failures_are_caught_by_the_root(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(TiercacheError) as ei:
        DiskStore(not_a_dir)
    assert isinstance(ei.value, StoreError)

    index = Index(tmp_path / "idx")
    index.close()
    ro = Index(tmp_path / "idx", readonly=True)
    with pytest.raises(TiercacheError, match="read-only") as ei:
        ro.write(lambda txn: None)
    assert isinstance(ei.value, IndexError_)
    ro.close()

    truncated = tmp_path / "x.safetensors"
    truncated.write_bytes(b"\x01\x02\x03")
    with pytest.raises(TiercacheError) as ei:
        HashingReader(truncated)
    assert isinstance(ei.value, BlockFileError)

    with pytest.raises(TiercacheError) as ei:
        read_prompt_cache(tmp_path / "missing.safetensors")
    assert isinstance(ei.value, InteropError)

    with pytest.raises(TiercacheError) as ei:
        L.decode_state({"class": "Popen"}, {})
    assert isinstance(ei.value, L.UnsupportedCacheError)

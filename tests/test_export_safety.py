"""`export` writes only where it should (issue 16, defect 4): never inside a store,
never through a symlink unless asked, and atomically (temp file + rename)."""

from __future__ import annotations

import errno
import json
import os

import mlx_lm.models.cache as mlc
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

from mlx_helpers import prefill
from tiercache.admin import inspect as I
from tiercache.admin.interop import InteropError, export_mlx_lm
from tiercache.store.disk import DiskStore
from tiercache.store.namespaces import model_namespace
from tiercache.tools.cli import main

B = 8


@pytest.fixture
def stored(tmp_path, tiny_llama_path, tiny_llama, make_tokens):
    model, _ = tiny_llama
    d = tmp_path / "store"
    store = DiskStore(d, block_size=B)
    ns = model_namespace(store, tiny_llama_path, model)
    toks = make_tokens(3 * B + 5, seed=11)
    cache = make_prompt_cache(model)
    prefill(model, toks, cache)
    store.save(ns, toks, cache)
    (end,) = I.snapshot_ends(I.load_view(store))
    store.close()
    return d, end, toks


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    return err


def _no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_export_into_the_stores_own_blocks_is_refused(stored):
    d, end, _ = stored
    with DiskStore(d) as store:
        plan = I.plan_for(store, I.load_view(store), end)
        victim = store.file_path(plan.records[0])
    before = victim.read_bytes()
    err = _one_line_error(_cli("export", d, end.id.hex(), victim))
    assert "inside a tiercache store" in err
    assert victim.read_bytes() == before
    assert _cli("verify", d, "--temp-grace", "0").exit_code == 0
    # The store folder itself and a folder next to the index are refused too.
    for target in (d / "x.safetensors", d / "blocks" / "new" / "x.safetensors"):
        assert "inside a tiercache store" in _one_line_error(_cli("export", d, end.id.hex(), target))
        assert not target.exists()


def test_export_into_another_store_is_refused(stored, tmp_path):
    d, end, _ = stored
    other = tmp_path / "other"
    DiskStore(other, block_size=B).close()
    with DiskStore(d) as store:
        with pytest.raises(InteropError, match="inside a tiercache store"):
            export_mlx_lm(store, end, other / "checkpoints" / "ab" / "x.safetensors")
    # Reached through a symlinked folder, it is the same store.
    link = tmp_path / "innocent"
    link.symlink_to(other / "checkpoints")
    with DiskStore(d) as store:
        with pytest.raises(InteropError, match="inside a tiercache store"):
            export_mlx_lm(store, end, link / "x.safetensors")
    assert not (other / "checkpoints" / "x.safetensors").exists()


def test_export_to_a_symlink_needs_follow_symlinks(stored, tmp_path):
    d, end, toks = stored
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.safetensors"
    link.symlink_to(target)
    err = _one_line_error(_cli("export", d, end.id.hex(), link))
    assert "symlink" in err and "--follow-symlinks" in err
    assert target.read_text() == "keep me" and link.is_symlink()
    # Asked to, it writes the link's target (and the link stays a link).
    real = tmp_path / "real.safetensors"
    link.unlink()
    link.symlink_to(real)
    res = _cli("export", d, end.id.hex(), link, "--follow-symlinks")
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and real.is_file()
    _, meta = load_prompt_cache(str(real), return_metadata=True)
    assert json.loads(meta["tokens"]) == toks
    # A symlink to a file inside a store is refused even when following.
    with DiskStore(d) as store:
        victim = store.file_path(I.plan_for(store, I.load_view(store), end).records[0])
    link.unlink()
    link.symlink_to(victim)
    before = victim.read_bytes()
    assert "inside a tiercache store" in _one_line_error(
        _cli("export", d, end.id.hex(), link, "--follow-symlinks"))
    assert victim.read_bytes() == before


def test_failed_export_leaves_the_old_file_and_no_temp(stored, tmp_path, monkeypatch):
    d, end, toks = stored
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.safetensors"
    out.write_bytes(b"an earlier export")
    real_save = mlc.save_prompt_cache

    def save_then_fail(path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlc, "save_prompt_cache", save_then_fail)
    with DiskStore(d) as store:
        with pytest.raises(OSError):
            export_mlx_lm(store, end, out)
    assert out.read_bytes() == b"an earlier export"
    assert _no_temp_files(out_dir), list(out_dir.iterdir())
    monkeypatch.setattr(mlc, "save_prompt_cache", real_save)
    with DiskStore(d) as store:
        res = export_mlx_lm(store, end, out)
    assert res.path == str(out) and res.bytes == os.path.getsize(out)
    assert json.loads(load_prompt_cache(str(out), return_metadata=True)[1]["tokens"]) == toks
    assert _no_temp_files(out_dir)

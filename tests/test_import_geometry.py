"""KV of the wrong geometry (issue 16, defect 2): `import` refuses it before
writing anything, `verify` finds it in a store, a restore of it is a miss (record
dropped and counted), and a server request extending such tokens succeeds."""

from __future__ import annotations

import json
import shutil

import httpx
import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import KVCache, make_prompt_cache, save_prompt_cache

from mlx_helpers import prefill
from tiercache.tools.server_process import start_server
from tiercache.admin.interop import InteropError, import_mlx_lm
from tiercache.store.disk import DiskStore
from tiercache.store.namespaces import model_namespace, probe_layer_desc
from tiercache.tools.cli import main

B = 16


def _misfit_cache(n: int, heads: int, dim: int) -> list:
    """A tiny-llama shaped cache (2 float32 KVCache layers) with other head geometry."""
    out = []
    for li in range(2):
        c = KVCache()
        k = mx.arange(heads * n * dim, dtype=mx.float32).reshape(1, heads, n, dim) * 1e-3 + li
        c.update_and_fetch(k, k + 1)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def _file(tmp_path, name, cache, tokens) -> str:
    path = str(tmp_path / name)
    save_prompt_cache(path, cache, {"tokens": json.dumps(tokens)})
    return path


def _nothing_written(d) -> bool:
    with DiskStore(d) as store:
        return store.n_records() == 0 and store.namespaces() == {} and not any(
            p.is_file() for p in (d / "blocks").rglob("*")
        )


@pytest.mark.parametrize("heads,dim", [(1, 7), (2, 8), (4, 16)])
def test_import_of_another_geometry_is_refused_before_writing(
    tmp_path, tiny_llama_path, tiny_llama, make_tokens, heads, dim
):
    model, _ = tiny_llama  # (1, 2, L, 16) float32 per layer
    toks = make_tokens(2 * B + 3, seed=1)
    bad = _file(tmp_path, "bad.safetensors", _misfit_cache(len(toks), heads, dim), toks)
    d = tmp_path / "store"
    with DiskStore(d, block_size=B) as store:
        with pytest.raises(InteropError, match="does not fit the model"):
            import_mlx_lm(store, bad, tiny_llama_path)
        with pytest.raises(InteropError, match="does not fit the model"):
            import_mlx_lm(store, bad, tiny_llama_path, model=model)
    assert _nothing_written(d)
    res = CliRunner().invoke(main, ["import", str(d), bad, "--model", str(tiny_llama_path)])
    assert res.exit_code == 2 and "does not fit the model" in res.stderr, res.output
    assert "Traceback" not in res.output
    assert _nothing_written(d)
    # The right file imports, into the same (still empty) store.
    good = make_prompt_cache(model)
    prefill(model, toks, good)
    ok = _file(tmp_path, "good.safetensors", good, toks)
    with DiskStore(d) as store:
        assert import_mlx_lm(store, ok, tiny_llama_path).records_written > 0
        cache, n = store.fetch(next(iter(store.namespaces())), toks + [5])
        assert n == len(toks) and cache[0].keys.shape[1] == 2


def test_import_token_ids_outside_the_vocabulary_are_refused(
    tmp_path, tiny_llama_path, tiny_llama, make_tokens
):
    model, _ = tiny_llama
    toks = make_tokens(B + 2, seed=2)
    good = make_prompt_cache(model)
    prefill(model, toks, good)
    d = tmp_path / "store"
    for bad_toks in (toks[:-1] + [512], toks[:-1] + [-1]):
        f = _file(tmp_path, "x.safetensors", good, bad_toks)
        with DiskStore(d, block_size=B) as store:
            with pytest.raises(InteropError, match="outside the model's vocabulary"):
                import_mlx_lm(store, f, tiny_llama_path, model=model)
    assert _nothing_written(d)


def _legacy_misfit_store(d, model_path, model, toks):
    """A store as an older tiercache left it: a namespace registered without
    geometry and a wrong-geometry import stored under it."""
    store = DiskStore(d, block_size=B)
    desc = probe_layer_desc(model)
    ns = model_namespace(store, model_path, layer_desc=desc)
    assert store.geometry(ns) is None
    store.save(ns, toks, _misfit_cache(len(toks), 1, 7))
    return store, ns


def test_verify_finds_stored_geometry_that_does_not_fit(
    tmp_path, tiny_llama_path, tiny_llama, make_tokens
):
    model, _ = tiny_llama
    toks = make_tokens(3 * B + 1, seed=3)
    store, ns = _legacy_misfit_store(tmp_path / "s", tiny_llama_path, model, toks)
    n = store.n_records()
    assert n == 4 and store.check() == []  # no geometry recorded yet: nothing to judge by
    # The server (or anything with the model) registers it: geometry is recorded.
    assert model_namespace(store, tiny_llama_path, model) == ns
    assert store.geometry(ns)["vocab_size"] == 512
    problems = store.check()
    assert [p.kind for p in problems] == ["geometry_mismatch"] * n, [p.to_dict() for p in problems]
    assert "[1, 1, -1, 7, 'F32']" in problems[0].detail
    store.close()
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "s"), "--fix"])
    assert res.exit_code == 0, res.output
    with DiskStore(tmp_path / "s") as store:
        assert store.check(temp_grace=0) == [] and store.n_records() == 0


def test_restore_of_misfit_geometry_is_a_miss_dropped_and_counted(
    tmp_path, tiny_llama_path, tiny_llama, make_tokens
):
    model, _ = tiny_llama
    toks = make_tokens(3 * B + 1, seed=4)
    store, ns = _legacy_misfit_store(tmp_path / "s", tiny_llama_path, model, toks)
    model_namespace(store, tiny_llama_path, model)
    cache, n = store.fetch(ns, toks + [9])
    assert (cache, n) == (None, 0)
    assert store.counters["corrupt_records"] >= 1
    assert store.longest_prefix(ns, toks + [9]).n_tokens == 0
    # The records after the dropped one are unreachable; verify finds and removes them.
    assert {p.kind for p in store.check(temp_grace=0)} == {"geometry_mismatch"}
    store.check(fix=True, temp_grace=0)
    assert store.check(temp_grace=0) == [] and store.n_records() == 0
    store.close()


def test_server_request_extending_misfit_tokens_succeeds(
    tmp_path, tiny_llama_path, tiny_llama, make_tokens
):
    model, _ = tiny_llama
    toks = make_tokens(4 * B + 2, seed=5)
    d = tmp_path / "disk"
    store, ns = _legacy_misfit_store(d, tiny_llama_path, model, toks)
    store.close()
    srv = start_server(["--model", str(tiny_llama_path), "--disk-dir", str(d),
                        "--block-size", str(B)], tmp_path / "srv.log")
    try:
        model_id = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        for _ in range(2):
            r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
                "model": model_id, "prompt": toks + [7, 8, 9], "max_tokens": 4,
                "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["disk_tokens"] == 0
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log and "broadcast_shapes" not in log, log
    assert "geometry" in log  # the dropped record is logged
    with DiskStore(d) as store:
        assert {p.kind for p in store.check(temp_grace=0)} <= {"geometry_mismatch"}
    shutil.rmtree(d)


def test_namespace_made_by_an_insert_records_the_geometry(tmp_path, tiny_llama_path, tiny_llama,
                                                          make_tokens):
    """Without register_model the first insert registers the namespace: it records
    the cache geometry too, so restores of misfits are refused there as well."""
    from tiercache import TieredPromptCache
    from tiercache.store.namespaces import probe_layout

    model, _ = tiny_llama
    toks = make_tokens(2 * B + 1, seed=6)
    cache = make_prompt_cache(model)
    prefill(model, toks, cache)
    tc = TieredPromptCache(disk_dir=tmp_path / "d", block_size=B)
    tc.insert_cache(str(tiny_llama_path), toks, cache)
    assert tc.flush(30)
    ns = tc.namespace_of(str(tiny_llama_path))
    assert tc.disk.geometry(ns)["layers"] == probe_layout(model)[1]["layers"]
    # register_model adds what an insert can't know (the vocabulary size).
    assert tc.register_model("m", tiny_llama_path, model) == ns
    assert tc.disk.geometry(ns)["vocab_size"] == 512
    assert tc.close()

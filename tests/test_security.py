"""Security: default bind, API key on every endpoint but /health, tenant isolation by
cache_salt, private file modes, no symlink following, allow-listed cache classes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from server_helpers import wait_for

from tiercache.tools.server_process import ROOT, start_server, subprocess_env

from tiercache.store import layers as L
from tiercache.store.disk import DiskStore, StoreError

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --------------------------------------------------------------------------- bind


def test_default_bind_is_loopback():
    from tiercache.server.config import ServerConfig, parse_config

    assert ServerConfig().host == "127.0.0.1"
    assert parse_config([], env={}).host == "127.0.0.1"
    p = subprocess.run([sys.executable, "-m", "tiercache.server.cli", "--help"], cwd=str(ROOT),
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    m = re.search(r"--host HOST\s+(.*?)(?=\n\s+--)", p.stdout, re.S)
    assert m and "default: 127.0.0.1" in " ".join(m.group(1).split()), p.stdout


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def keyed(tiny_llama_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    disk = tmp / "disk"
    srv = start_server(["--model", str(tiny_llama_path), "--api-key", KEY, "--disk-dir",
                        str(disk), "--block-size", "16", "--max-tokens", "4"],
                       tmp / "server.log")
    srv.disk = disk
    yield srv
    assert srv.stop() == 0, srv.log()


def _envelope_401(r):
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "authentication_error"
    assert KEY not in r.text


PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/anything", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"prompt": "hi"}),
    ("GET", "/v1/cache/stats", None),
    ("POST", "/v1/cache/reset", {"tier": "memory"}),
]


@pytest.mark.slow
def test_api_key_required_everywhere_but_health(keyed):
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                   {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY},
                   {"Authorization": f"Bearer {KEY[:-1]}"}]
    with httpx.Client(base_url=keyed.base_url, timeout=60) as h:
        for method, path, body in PROTECTED:
            for headers in bad_headers:
                _envelope_401(h.request(method, path, json=body, headers=headers))
        assert h.get("/health").status_code == 200
        # With the key, everything works (the reset too).
        for method, path, body in PROTECTED:
            if path == "/v1/models/anything":
                continue
            r = h.request(method, path, json=body, headers=AUTH)
            assert r.status_code == 200, (path, r.text)


@pytest.mark.slow
def test_metrics_requires_api_key(keyed):
    """Bug S1: /metrics answers without the key (server/app.py `prometheus`)."""
    _envelope_401(httpx.get(keyed.base_url + "/metrics", timeout=30))
    assert httpx.get(keyed.base_url + "/metrics", headers=AUTH, timeout=30).status_code == 200


def _cached(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]


def _disk_entries(srv) -> int:
    s = httpx.get(srv.base_url + "/v1/cache/stats", headers=AUTH, timeout=30).json()
    return int(((s.get("tiers") or {}).get("disk") or {}).get("entries") or 0)


@pytest.mark.slow
def test_cache_salt_isolates_tenants_memory_and_disk(keyed):
    ids = [(11 * i) % 500 + 3 for i in range(70)]
    url = keyed.base_url + "/v1/completions"
    with httpx.Client(timeout=60, headers=AUTH) as h:
        def ask(salt):
            body = {"prompt": ids, "max_tokens": 2, "temperature": 0}
            if salt is not None:
                body["cache_salt"] = salt
            return _cached(h.post(url, json=body))

        assert ask("tenant-a")["cached_tokens"] == 0
        assert ask("tenant-b")["cached_tokens"] == 0  # identical prompt, other salt
        assert ask(None)["cached_tokens"] == 0  # no salt is a tenant of its own
        assert ask("tenant-a")["cached_tokens"] >= len(ids) - 1
        # Same again from disk only: flush to disk, drop the memory tier.
        wait_for(lambda: _disk_entries(keyed) >= 3 * (len(ids) // 16), timeout=60)
        assert h.post(keyed.base_url + "/v1/cache/reset", json={"tier": "memory"}).status_code == 200
        assert ask("tenant-c")["cached_tokens"] == 0
        d = ask("tenant-b")
        assert d["disk_tokens"] >= 16 * (len(ids) // 16) and d["memory_tokens"] == 0


def _modes(root: Path) -> list[tuple[str, str]]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in [dirpath]:
            mode = stat.S_IMODE(os.lstat(d).st_mode)
            if mode != 0o700:
                bad.append((d, oct(mode)))
        for f in filenames:
            p = os.path.join(dirpath, f)
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if mode != 0o600:
                bad.append((p, oct(mode)))
    return bad


@pytest.mark.slow
def test_disk_dir_files_0600_folders_0700_inside(keyed):
    with httpx.Client(timeout=60, headers=AUTH) as h:
        r = h.post(keyed.base_url + "/v1/completions",
                   json={"prompt": list(range(3, 60)), "max_tokens": 2, "cache_salt": "m"})
        assert r.status_code == 200
    wait_for(lambda: _disk_entries(keyed) > 0, timeout=60)
    bad = [b for b in _modes(keyed.disk) if Path(b[0]) != keyed.disk]
    assert not bad, bad


@pytest.mark.slow
def test_disk_dir_root_created_0700(keyed):
    """Bug S2: server/config.py validate_config creates --disk-dir with the umask's
    mode (0755) before DiskStore can create it 0700."""
    mode = stat.S_IMODE(os.stat(keyed.disk).st_mode)
    assert mode == 0o700, oct(mode)


def test_store_created_by_library_is_private(tmp_path):
    old = os.umask(0o022)
    try:
        with DiskStore(tmp_path / "a" / "b", block_size=4):
            pass
    finally:
        os.umask(old)
    assert _modes(tmp_path / "a" / "b") == []


# --------------------------------------------------------------------------- symlinks


def _store_with_record(path: Path):
    from mlx_lm.models.cache import KVCache

    store = DiskStore(path, block_size=4)
    c = KVCache()
    a = mx.arange(1 * 2 * 6 * 8, dtype=mx.float32).reshape(1, 2, 6, 8)
    c.update_and_fetch(a, a)
    ns = store.register_namespace(b"f" * 16, L.describe_cache([c]), {})
    toks = [5, 6, 7, 8, 9, 10]
    store.save(ns, toks, [c])
    return store, ns, toks


def _tiercache_cli(*args):
    exe = Path(sys.executable).parent / "tiercache"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())


def test_planted_symlinks_are_reported_and_unlinked_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    precious = outside / "precious.safetensors"
    precious.write_bytes(b"do not touch")
    (outside / "sub" / "x.safetensors").write_bytes(b"do not touch either")
    store, ns, toks = _store_with_record(tmp_path / "s")
    try:
        rec = store.longest_prefix(ns, toks).chain[0]
        blocks = tmp_path / "s" / "blocks"
        # 1. a symlink file beside the real ones, 2. a symlinked sub-folder,
        # 3. a symlink in place of a record's own file.
        link_file = store.file_path(rec).parent / ("ff" * 16 + ".safetensors")
        link_file.symlink_to(precious)
        (blocks / "zz").symlink_to(outside / "sub", target_is_directory=True)
        own = store.file_path(rec)
        own.unlink()
        own.symlink_to(precious)

        problems = store.check(temp_grace=0)
        kinds = [p.kind for p in problems]
        assert kinds.count("symlink") >= 3, [p.to_dict() for p in problems]
        # Reading never follows it either: the record is dropped, counted.
        cache, n = store.fetch(ns, toks)
        assert n < len(toks)
        store.check(fix=True, temp_grace=0)
        assert store.check(temp_grace=0) == []
    finally:
        store.close()
    assert not link_file.is_symlink() and not (blocks / "zz").exists()
    assert precious.read_bytes() == b"do not touch"
    assert (outside / "sub" / "x.safetensors").read_bytes() == b"do not touch either"


def test_cli_refuses_symlinked_store_folders(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ab.safetensors").write_bytes(b"keep")
    store, _, _ = _store_with_record(tmp_path / "s")
    store.close()
    blocks = tmp_path / "s" / "blocks"
    os.rename(blocks, tmp_path / "real-blocks")
    blocks.symlink_to(outside, target_is_directory=True)
    p = _tiercache_cli("verify", str(tmp_path / "s"), "--fix", "--temp-grace", "0")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "symlink" in p.stderr
    assert (outside / "ab.safetensors").read_bytes() == b"keep"


def test_cli_verify_fix_unlinks_planted_symlink(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep")
    store, ns, toks = _store_with_record(tmp_path / "s")
    link = store.file_path(store.longest_prefix(ns, toks).chain[0]).parent / ("ee" * 16 + ".safetensors")
    store.close()
    link.symlink_to(outside)
    p = _tiercache_cli("verify", str(tmp_path / "s"), "--temp-grace", "0")
    assert p.returncode == 1
    assert any(x["kind"] == "symlink" for x in json.loads(p.stdout)["problems"])
    p = _tiercache_cli("verify", str(tmp_path / "s"), "--fix", "--temp-grace", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert not link.is_symlink() and outside.read_bytes() == b"keep"


def test_library_refuses_symlinked_store_folders(tmp_path):
    """Bug S3: DiskStore follows a symlinked blocks/ (or checkpoints/) folder:
    check(fix=True) deletes files outside the store and save() writes there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "ab.safetensors"
    victim.write_bytes(b"keep")
    store, _, _ = _store_with_record(tmp_path / "s")
    store.close()
    blocks = tmp_path / "s" / "blocks"
    os.rename(blocks, tmp_path / "real-blocks")
    blocks.symlink_to(outside, target_is_directory=True)
    try:
        store = DiskStore(tmp_path / "s")
    except StoreError:
        pass  # refusing to open is a fine answer
    else:
        try:
            store.check(fix=True, temp_grace=0)
        finally:
            store.close()
    assert victim.exists() and victim.read_bytes() == b"keep"


# --------------------------------------------------------------------------- classes


def _prompt_cache_file(tmp_path: Path, evil: str) -> Path:
    from mlx_lm.models.cache import KVCache, save_prompt_cache

    c = KVCache()
    a = mx.ones((1, 2, 4, 8))
    c.update_and_fetch(a, a)
    good = tmp_path / "good.safetensors"
    save_prompt_cache(str(good), [c, c], {"tokens": "[1, 2, 3, 4]"})
    arrays, meta = mx.load(str(good), return_metadata=True)
    assert "KVCache" in meta.values()
    meta = {k: (evil if v == "KVCache" else v) for k, v in meta.items()}
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), arrays, meta)
    return bad


@pytest.mark.parametrize("evil", ["Popen", "system", "__import__", "eval", "Path",
                                  "KVCache.__init__", "BatchKVCache", ""])
def test_prompt_cache_file_with_foreign_class_is_refused(tmp_path, evil):
    from tiercache.admin import interop

    bad = _prompt_cache_file(tmp_path, evil)
    with pytest.raises(interop.InteropError, match="not allowed"):
        interop.read_prompt_cache(bad)


def test_decode_state_refuses_foreign_class():
    for name in ("Popen", "system", "object", None, 3):
        with pytest.raises(L.UnsupportedCacheError):
            L.decode_state({"class": name}, {})
    assert "KVCache" in L.ALLOWED_CLASSES


def test_no_pickle_or_eval_on_load_paths():
    """Loading only ever parses JSON headers and raw tensor bytes."""
    src = ROOT / "tiercache"
    banned = re.compile(r"^\s*(import|from)\s+(pickle|marshal|shelve|dill|cloudpickle)\b|"
                        r"\b(pickle|marshal)\.loads?\(|yaml\.load\(|(?<![.\w])(eval|exec)\(|"
                        r"__import__\(|import_module\(|allow_pickle\s*=\s*True")
    hits = []
    # demo_model.py builds test models from its own presets: not a load path.
    for p in sorted(x for x in src.glob("*.py") if x.name != "demo_model.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if banned.search(line) and not line.lstrip().startswith("#"):
                hits.append(f"{p.name}:{i}: {line.strip()}")
    assert not hits, hits


# --------------------------------------------------------------------------- fuzz


@pytest.mark.slow
def test_short_fuzz_no_5xx(tiny_llama_path, tmp_path):
    """A deterministic 150-case run of tools/fuzz_test.py (the full run is manual)."""
    from tiercache.tools.fuzz_test import run_fuzz

    srv = start_server(["--model", str(tiny_llama_path), "--max-tokens", "4", "--disk-dir",
                        str(tmp_path / "disk"), "--block-size", "16"], tmp_path / "fuzz.log")
    try:
        summary = run_fuzz(srv.base_url, examples=150, seconds=60, seed=0)
    finally:
        assert srv.stop() == 0, srv.log()
    assert summary["ok"], summary
    assert summary["server_errors_5xx"] == 0 and summary["cases_run"] > 0


@pytest.mark.slow
def test_out_of_range_seed_is_a_client_error(keyed):
    """Bug F1 (found by tools/fuzz_test.py): ``seed`` < 0 or >= 2**64 reaches
    ``mx.random.seed`` and comes back as a 500 ``generation_failed``."""
    with httpx.Client(timeout=60, headers=AUTH) as h:
        for seed in (-1, 2**64):
            r = h.post(keyed.base_url + "/v1/completions",
                       json={"prompt": "hello", "max_tokens": 2, "seed": seed})
            assert r.status_code in (200, 400, 422), (seed, r.text)

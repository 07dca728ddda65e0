"""The tools CLI (`tiercache ...`) through click's CliRunner against real stores
filled by a real prefill of the tiny llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from mlx_helpers import cold_greedy, greedy_continue, prefill
from tiercache.store.disk import DiskStore
from tiercache.store.namespaces import model_namespace
from tiercache.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
B = 8
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "The quick brown fox jumps over the lazy dog and then runs far into the green forest.",
    "A completely different story about ships sailing across the wide and windy ocean.",
]
COMMANDS = ["stats", "ls", "show", "verify", "evict", "clear", "export", "import", "warm"]


def run(*args, input=None, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args], input=input)
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res


def jrun(*args):
    return json.loads(run(*args).stdout)


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("Error: ")
    return err


def _fill(path, model_path, model, tok, texts=TEXTS):
    store = DiskStore(path, block_size=B)
    ns = model_namespace(store, model_path, model)
    all_tokens = []
    for t in texts:
        toks = list(tok.encode(t))
        cache = make_prompt_cache(model)
        prefill(model, toks, cache)
        store.save(ns, toks, cache)
        all_tokens.append(toks)
    store.close()
    return ns, all_tokens


@pytest.fixture
def filled(tmp_path, tiny_llama_path, tiny_llama):
    model, tok = tiny_llama
    d = tmp_path / "store"
    ns, toks = _fill(d, tiny_llama_path, model, tok)
    return d, ns, toks


def _ls(d, *extra):
    return jrun("ls", d, *extra)


# --- help and docs --------------------------------------------------------------------------


def test_docs_agree_on_the_store_path_and_describe_the_folder():
    # docs/cli.md used ~/.cache/tiercache (the demo model's home, not a store)
    # while the README served ~/.cache/tiercache/store.
    readme, cli_md = (ROOT / "README.md").read_text(), (ROOT / "docs" / "cli.md").read_text()
    helps = "\n".join(main.commands[c].help or "" for c in COMMANDS)
    verbs = "|".join(COMMANDS)
    paths = set()
    for text in (readme, cli_md, helps):
        paths |= set(re.findall(rf"tiercache (?:{verbs}) (~\S+)", text))
        paths |= set(re.findall(r"--disk-dir (~\S+)", text))
    assert paths == {"~/.cache/tiercache/store"}
    from tiercache.store.layout import BLOCKS_DIR, CHECKPOINTS_DIR, INDEX_DIR

    for text in (readme, cli_md):
        assert all(f"{d}/" in text for d in (INDEX_DIR, BLOCKS_DIR, CHECKPOINTS_DIR))
        assert ".venv/bin/tiercache" in text and "source .venv/bin/activate" in text


def test_every_command_has_help():
    assert sorted(main.commands) == sorted(COMMANDS)
    res = run("--help")
    for name in COMMANDS:
        assert name in res.output
        h = run(name, "--help")
        doc = main.commands[name].help or ""
        assert len(doc.strip()) > 20, name
        assert "Example:" in h.output, name


def test_docs_document_each_command_with_an_example():
    docs = ""
    for p in (ROOT / "README.md", ROOT / "docs" / "cli.md"):
        if p.is_file():
            docs += p.read_text()
    for name in COMMANDS:
        assert re.search(rf"^\s*(\$ )?tiercache {name} \S", docs, re.M), f"no example of `tiercache {name}`"


# --- read-only commands ---------------------------------------------------------------------


def test_stats(filled):
    d, ns, toks = filled
    data = jrun("stats", d)
    assert data["block_size"] == B and data["format_version"] == 1
    (e,) = data["namespaces"]
    assert e["namespace"] == ns.hex()
    assert e["model"].endswith("tiny-llama")
    assert e["prefixes"] == 3
    assert e["logical_tokens"] == sum(len(t) for t in toks)
    # The first two texts share their first blocks: physical < logical.
    assert e["physical_tokens"] < e["logical_tokens"] and e["dedup_ratio"] > 1
    assert data["total"]["bytes"] == e["bytes"] > 0
    assert data["total"]["index_bytes_counter"] == e["bytes"]
    budget = jrun("stats", d, "--budget", "1MiB")["total"]
    assert budget["budget_bytes"] == 1 << 20 and 0 < budget["budget_used"] < 1
    out = run("stats", d, "--table").stdout
    assert "TOTAL" in out and "tiny-llama" in out and "KiB" in out
    assert "TOTAL" in run("--table", "stats", d).stdout  # the group-level flag works too


def test_ls(filled):
    d, ns, toks = filled
    rows = _ls(d)
    assert len(rows) == 3
    assert sorted(r["tokens"] for r in rows) == sorted(len(t) for t in toks)
    assert all(r["restorable"] and r["namespace"] == ns.hex() for r in rows)
    # The tokenizer is found from the model path stored with the namespace.
    assert any(r["text"].startswith("A completely different") for r in rows)
    by_size = _ls(d, "--sort", "size")
    assert [r["bytes"] for r in by_size] == sorted((r["bytes"] for r in rows), reverse=True)
    assert len(_ls(d, "--limit", "1")) == 1
    assert len(_ls(d, "--namespace", ns.hex()[:10])) == 3
    assert _ls(d, "--sort", "hits")[0]["hits"] == 0
    table = run("ls", d, "--table").stdout
    for r in rows:
        assert r["id"][:12] in table
    assert "quick brown" in table


def test_ls_hits_and_recent_after_a_fetch(filled, tiny_llama):
    d, ns, toks = filled
    with DiskStore(d) as store:
        cache, n = store.fetch(ns, toks[2] + [5, 6])
        assert n == len(toks[2])
    rows = _ls(d, "--sort", "hits")
    assert rows[0]["hits"] == 1 and rows[0]["tokens"] == len(toks[2])
    assert _ls(d, "--sort", "recent")[0]["id"] == rows[0]["id"]
    assert jrun("stats", d)["total"]["hits"] == 1


def test_show(filled, tiny_llama):
    d, ns, toks = filled
    _, tok = tiny_llama
    rows = _ls(d)
    # Two texts may have the same token count: pick the first one's row by its text prefix.
    row = next(r for r in rows if r["tokens"] == len(toks[0])
               and r["text"].startswith(TEXTS[0][:50]))
    data = jrun("show", d, row["id"][:8])
    assert data["id"] == row["id"] and data["tokens"] == len(toks[0])
    assert data["text"] == tok.decode(toks[0])
    chain = data["chain"]
    assert [c["kind"] for c in chain] == ["block"] * (len(toks[0]) // B) + ["tail"] * (len(toks[0]) % B > 0)
    assert chain[-1]["end"] == len(toks[0]) and chain[0]["start"] == 0
    assert all(c["file_state"] == "ok" and re.fullmatch(r"[0-9a-f]{16}", c["checksum"]) for c in chain)
    assert sum(c["bytes"] for c in chain) == data["bytes"] == row["bytes"]
    assert all((d / c["file"]).is_file() for c in chain)
    # A block in the middle of a chain is addressable too.
    mid = jrun("show", d, chain[1]["id"])
    assert mid["tokens"] == 2 * B and mid["is_end"] is False
    out = run("show", d, row["id"], "--table").stdout
    assert row["id"] in out and chain[0]["id"] in out


def test_show_cuts_a_long_text_unless_full(tmp_path, tiny_llama_path, tiny_llama):
    model, tok = tiny_llama
    d = tmp_path / "store"
    long_text = " ".join(TEXTS * 4)  # ~340 characters
    _, (toks,) = _fill(d, tiny_llama_path, model, tok, texts=[long_text])
    whole = tok.decode(toks)
    assert len(whole) > 300
    rid = next(r["id"] for r in _ls(d) if r["tokens"] == len(toks))
    short_data = jrun("show", d, rid)
    assert short_data["text"] == whole[:200]
    assert short_data["text_chars"] == len(whole) and short_data["text_truncated"] is True
    full = jrun("show", d, rid, "--full")
    assert full["text"] == whole and "text_truncated" not in full
    out = run("show", d, rid, "--table").stdout
    assert f"the start of {len(whole)} characters; --full prints all" in out
    assert whole[:40] in out and whole[-40:] not in out
    assert whole[-40:] in run("show", d, rid, "--table", "--full").stdout.replace("\n", " ")


def test_verify_clean(filled):
    d, _, _ = filled
    data = jrun("verify", d)
    assert data == {"clean": True, "problems": [], "fixed": False, "remaining": []}
    assert "clean" in run("verify", d, "--table").stdout


def test_verify_and_fix_a_damaged_store(filled):
    d, ns, toks = filled
    files = sorted((d / "blocks").rglob("*.safetensors"))
    assert len(files) >= 3
    # Flip a byte in the data section of one file (the checksum covers it).
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0xFF
    files[0].write_bytes(data)
    files[1].unlink()
    old_tmp = files[2].parent / (files[2].name + ".tmp-dead")
    old_tmp.write_bytes(b"half written")
    past = time.time() - 3600
    os.utime(old_tmp, (past, past))
    young_tmp = files[2].parent / (files[2].name + ".tmp-busy")
    young_tmp.write_bytes(b"a writer is still here")  # inside temp_grace: left alone

    res = run("verify", d, ok=False)
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    kinds = {p["kind"] for p in report["problems"]}
    assert {"checksum_mismatch", "missing_file", "temp_file"} <= kinds
    assert not any("tmp-busy" in p["target"] for p in report["problems"])
    assert report["remaining"] == report["problems"] and not report["clean"]
    table = run("verify", d, "--table", ok=False)
    assert table.exit_code == 1 and "checksum_mismatch" in table.stdout and "remain" in table.stdout

    fixed = jrun("verify", d, "--fix")
    assert fixed["fixed"] and fixed["clean"] and fixed["remaining"] == []
    assert jrun("verify", d)["clean"]
    assert young_tmp.exists() and not old_tmp.exists()
    # What survives still restores: every remaining prefix is complete.
    assert all(r["restorable"] for r in _ls(d))


# --- write commands ---------------------------------------------------------------------------


def test_evict_to_size(filled):
    d, _, _ = filled
    before = jrun("stats", d)["total"]["bytes"]
    res = jrun("evict", d, "--to", f"{before // 2}B")
    assert res["bytes_before"] == before and res["bytes_after"] <= before // 2
    assert res["evicted_records"] > 0
    assert jrun("verify", d)["clean"]
    assert jrun("evict", d, "--to", "0")["bytes_after"] == 0
    assert _ls(d) == []


def test_evict_namespace_and_age(filled):
    d, ns, toks = filled
    assert jrun("evict", d, "--older-than", "1h")["evicted_records"] == 0
    time.sleep(0.05)
    res = jrun("evict", d, "--older-than", "0.01s", "--namespace", ns.hex()[:8])
    assert res["evicted_records"] > 0 and res["bytes_after"] == 0
    assert jrun("verify", d)["clean"]


def test_evict_namespace(filled):
    d, ns, _ = filled
    res = jrun("evict", d, "--namespace", ns.hex())
    assert res["bytes_after"] == 0 and _ls(d) == []
    assert jrun("stats", d)["namespaces"][0]["namespace"] == ns.hex()  # description kept
    assert "evicted" in run("evict", d, "--to", "1GB", "--table").stdout


def test_evict_needs_a_criterion(filled):
    d, _, _ = filled
    assert run("evict", d, ok=False).exit_code == 2
    assert run("evict", d, "--to", "1GB", "--older-than", "1d", ok=False).exit_code == 2


def test_clear_confirms(filled):
    d, ns, _ = filled
    res = run("clear", d, input="n\n", ok=False)
    assert res.exit_code == 1 and len(_ls(d)) == 3
    res = run("clear", d, "--namespace", ns.hex()[:8], input="y\n")
    assert json.loads(res.stdout)["removed_records"] > 0
    assert _ls(d) == []
    assert jrun("clear", d, "--yes")["removed_records"] == 0
    assert jrun("verify", d)["clean"]


# --- interop --------------------------------------------------------------------------------


def test_export_loads_in_mlx_lm_and_generates_like_a_cold_run(filled, tmp_path, tiny_llama):
    d, ns, toks = filled
    model, _ = tiny_llama
    for row in _ls(d):
        out = tmp_path / f"{row['id']}.safetensors"
        res = jrun("export", d, row["id"][:10], out)
        assert res["tokens"] == row["tokens"] and res["namespace"] == ns.hex()
        cache, meta = load_prompt_cache(str(out), return_metadata=True)
        prompt = json.loads(meta["tokens"])
        assert len(prompt) == row["tokens"] and meta["namespace"] == ns.hex()
        assert meta["tiercache_format"] == "1"
        assert all(c.offset == len(prompt) and c.keys.shape[2] == len(prompt) for c in cache)
        more = [11, 12, 13]
        assert greedy_continue(model, cache, more, 16) == cold_greedy(model, prompt + more, 16)


def test_import_round_trip(filled, tmp_path, tiny_llama, tiny_llama_path):
    d, ns, toks = filled
    model, _ = tiny_llama
    rows = {r["tokens"]: r for r in _ls(d)}
    out = tmp_path / "x.safetensors"
    jrun("export", d, rows[len(toks[0])]["id"], out)
    d2 = tmp_path / "other"
    res = jrun("import", d2, out, "--model", tiny_llama_path, "--block-size", B)
    assert res["namespace"] == ns.hex() and res["tokens"] == len(toks[0]) and res["records_written"] > 0
    assert jrun("import", d2, out, "--model", tiny_llama_path)["records_written"] == 0
    (row,) = _ls(d2)
    assert row["tokens"] == len(toks[0])
    with DiskStore(d2) as store:
        cache, n = store.fetch(ns, toks[0] + [7, 8])
    assert n == len(toks[0])
    assert greedy_continue(model, cache, [7, 8], 12) == cold_greedy(model, toks[0] + [7, 8], 12)

    # A file mlx-lm wrote itself (padded buffers, no token metadata) needs --tokens.
    raw = tmp_path / "raw.safetensors"
    c = make_prompt_cache(model)
    prefill(model, toks[2], c)
    save_prompt_cache(str(raw), c)
    err = one_line_error(run("import", d2, raw, "--model", tiny_llama_path, ok=False))
    assert "--tokens" in err
    res = jrun("import", d2, raw, "--model", tiny_llama_path, "--tokens", json.dumps(toks[2]))
    assert res["tokens"] == len(toks[2])
    tf = tmp_path / "toks.json"
    tf.write_text(json.dumps(toks[2]))
    assert jrun("import", d2, raw, "--model", tiny_llama_path, "--tokens", tf)["records_written"] == 0
    bad = one_line_error(run("import", d2, raw, "--model", tiny_llama_path, "--tokens", "[1,2]", ok=False))
    assert "holds" in bad
    with DiskStore(d2) as store:
        cache, n = store.fetch(ns, toks[2] + [9])
    assert greedy_continue(model, cache, [9], 12) == cold_greedy(model, toks[2] + [9], 12)


def test_import_refuses_classes_off_the_allow_list(filled, tmp_path, tiny_llama_path):
    d, _, _ = filled
    out = tmp_path / "x.safetensors"
    jrun("export", d, _ls(d)[0]["id"], out)
    import mlx.core as mx

    arrays, meta = mx.load(str(out), return_metadata=True)
    meta["1.0"] = "Popen"
    evil = tmp_path / "evil.safetensors"
    mx.save_safetensors(str(evil), arrays, meta)
    err = one_line_error(run("import", d, evil, "--model", tiny_llama_path, ok=False))
    assert "'Popen' is not allowed" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    one_line_error(run("import", d, junk, "--model", tiny_llama_path, ok=False))


# --- warm ---------------------------------------------------------------------------------


def test_warm_then_lookup_hits(tmp_path, tiny_llama_path, tiny_llama):
    model, tok = tiny_llama
    prompts = tmp_path / "prompts.jsonl"
    items = [
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]},
        {"text": "The quick brown fox jumps over the lazy dog."},
        "A plain string prompt about the sea and the ships.",
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in items) + "\nnot json, a line of text\n\n")
    d = tmp_path / "warm"
    res = jrun("warm", d, "--model", tiny_llama_path, "--prompts", prompts, "--prefill-step-size", "5",
               "--block-size", B)
    assert res["prompts"] == 4 and res["warmed"] == 4 and res["skipped_cached"] == 0
    assert res["records_written"] > 0
    again = jrun("warm", d, "--model", tiny_llama_path, "--prompts", prompts)
    assert again["warmed"] == 0 and again["skipped_cached"] == 4
    chat = tok.apply_chat_template(items[0]["messages"], add_generation_prompt=True, tokenize=True)
    texts = [list(tok.encode(items[1]["text"])), list(tok.encode(items[2])), list(tok.encode("not json, a line of text"))]
    with DiskStore(d) as store:
        ns = model_namespace(store, tiny_llama_path, model)
        assert ns.hex() == res["namespace"]
        for toks in [list(chat)] + texts:
            plan = store.longest_prefix(ns, toks, limit=len(toks) - 1)
            assert plan.n_tokens == len(toks) - 1
            cache, n = store.fetch(ns, toks, limit=len(toks) - 1)
            assert greedy_continue(model, cache, toks[n:], 8) == cold_greedy(model, toks, 8)
    assert "warmed" in run("warm", d, "--model", tiny_llama_path, "--prompts", prompts, "--table").stdout


def test_warm_hybrid_chat_splits_like_the_server(tmp_path, tiny_hybrid_path, tiny_hybrid):
    """On a model with recurrent layers, warm prefills with the server's
    chunk-boundary rule and stores checkpoints where the server would: at the last
    user message's start and at the end. Restores equal a cold run split the same way."""
    from tiercache.tiers.checkpoints import last_user_message_start, prefill_with_checkpoints

    model, tok = tiny_hybrid
    system = {"role": "system", "content": "You are a careful assistant. " * 6}
    history = [system, {"role": "user", "content": "First question about ships."},
               {"role": "assistant", "content": "Ships float."}]
    messages = history + [{"role": "user", "content": "And what about boats?"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n")
    d = tmp_path / "warm"
    res = jrun("warm", d, "--model", tiny_hybrid_path, "--prompts", prompts,
               "--prefill-step-size", "16", "--block-size", "8")
    assert res["warmed"] == 1
    toks = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    start = last_user_message_start(tok, messages)
    assert 8 <= start < len(toks) - 1
    with DiskStore(d) as store:
        ns = model_namespace(store, tiny_hybrid_path, model)
        cache, n = store.fetch(ns, toks, limit=len(toks) - 1)
        assert n == len(toks) - 1
        cold = make_prompt_cache(model)
        prefill_with_checkpoints(model, cold, toks[:-1], [start, len(toks) - 1], 16, offset=0)
        assert greedy_continue(model, cache, toks[-1:], 8) == greedy_continue(model, cold, toks[-1:], 8)
        # Another last question after the same history reuses the checkpoint.
        other = list(tok.apply_chat_template(history + [{"role": "user", "content": "Why?"}],
                                             add_generation_prompt=True, tokenize=True))
        assert store.longest_prefix(ns, other, limit=len(other) - 1).n_tokens == start


# --- alongside a running writer -----------------------------------------------------------------


WRITER = textwrap.dedent(
    """
    import sys, time, random
    sys.path.insert(0, {root!r})
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache
    from tiercache.store.disk import DiskStore
    from tiercache.store.namespaces import model_namespace
    model, tok = mlx_lm.load({model!r})
    store = DiskStore({store!r}, block_size={B})
    ns = model_namespace(store, {model!r}, model)
    rng = random.Random(1)
    print("ready", flush=True)
    i = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        toks = [rng.randrange(3, 500) for _ in range(rng.randrange(9, 40))]
        c = make_prompt_cache(model)
        model(__import__("mlx.core").core.array(toks)[None], cache=c)
        store.save(ns, toks, c)
        if i % 3 == 0:
            store.fetch(ns, toks)
            store.flush_touches()
        if i % 5 == 4:
            store.evict_to(store.total_bytes() * 3 // 4)
        i += 1
        print(i, flush=True)
    """
)


def test_commands_while_another_process_writes(filled, tmp_path, tiny_llama_path):
    d, ns, toks = filled
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT), model=str(tiny_llama_path), store=str(d), B=B))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for _ in range(3):  # let it write a few snapshots first
            proc.stdout.readline()
        n_before = None
        for _ in range(6):
            s = jrun("stats", d)
            assert s["total"]["prefixes"] >= 1
            rows = _ls(d, "--limit", "5")
            assert rows and all("id" in r for r in rows)
            v = jrun("verify", d)
            assert v["clean"], v
            run("ls", d, "--table")
            n_before = s["total"]["blocks"]
        assert proc.poll() is None, proc.stderr.read()
        # Still progressing: our readers never blocked the writer.
        got = proc.stdout.readline().strip()
        assert got.isdigit()
    finally:
        proc.kill()
        proc.wait()
    assert n_before is not None
    assert jrun("verify", d)["clean"]


# --- errors -----------------------------------------------------------------------------------


def test_errors_are_one_line(filled, tmp_path):
    d, _, _ = filled
    missing = tmp_path / "nope"
    for cmd in ("stats", "ls", "verify"):
        assert "no such directory" in one_line_error(run(cmd, missing, ok=False))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a tiercache store" in one_line_error(run("stats", empty, ok=False))
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(run("ls", afile, ok=False))
    assert "too short" in one_line_error(run("show", d, "abc", ok=False))
    assert "hex" in one_line_error(run("show", d, "zzzzzzzzzz", ok=False))
    assert "no stored prefix" in one_line_error(run("show", d, "0" * 32, ok=False))
    assert "no stored prefix" in one_line_error(run("export", d, "00000000", tmp_path / "o.safetensors", ok=False))
    assert "bad size" in one_line_error(run("evict", d, "--to", "lots", ok=False))
    assert "bad duration" in one_line_error(run("evict", d, "--older-than", "7 fortnights", ok=False))
    assert "namespace" in one_line_error(run("ls", d, "--namespace", "12345678", ok=False))


def test_newer_format_is_refused(filled):
    d, _, _ = filled
    env = lmdb.open(str(d / "index.lmdb"), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        fmt = json.loads(txn.get(b"format", db=meta))
        fmt["format_version"] = 99
        txn.put(b"format", json.dumps(fmt).encode(), db=meta)
    env.close()
    for cmd in ("stats", "ls", "verify"):
        err = one_line_error(run(cmd, d, ok=False))
        assert "99" in err and "newer" in err


def test_corrupt_index_is_refused(filled):
    d, _, _ = filled
    data = d / "index.lmdb" / "data.mdb"
    data.write_bytes(os.urandom(64 * 1024))
    for cmd in ("stats", "ls"):
        one_line_error(run(cmd, d, ok=False))
    one_line_error(run("verify", d, "--fix", ok=False))


def test_symlinked_index_is_refused(filled, tmp_path):
    d, _, _ = filled
    link = tmp_path / "linked"
    link.mkdir()
    (link / "index.lmdb").symlink_to(d / "index.lmdb")
    assert "symlink" in one_line_error(run("stats", link, ok=False))


def test_warm_renders_multipart_messages_like_the_server(tmp_path, tiny_llama_path, tiny_llama):
    # The server joins text parts of a message's content before the chat template;
    # warm handed the list to the template as is, so its tokens never matched a request.
    from tiercache.server.config import ServerConfig as Cfg
    from tiercache.server.engine import Engine

    model, tok = tiny_llama
    msgs = [{"role": "system", "content": [{"type": "text", "text": "You are "},
                                           {"type": "text", "text": "terse and kind."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name three rivers."}]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": msgs}) + "\n")
    d = tmp_path / "store"
    r = CliRunner().invoke(main, ["warm", str(d), "--model", str(tiny_llama_path),
                                 "--prompts", str(prompts), "--block-size", "16"])
    assert r.exit_code == 0, r.output
    engine = Engine(Cfg())
    engine.tokenizer = tok
    server_tokens = engine.chat_tokens(
        [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in msgs])
    with DiskStore(d) as store:
        ns = model_namespace(store, str(tiny_llama_path), model)
        plan = store.longest_prefix(ns, server_tokens, limit=len(server_tokens) - 1)
        assert plan.n_tokens == len(server_tokens) - 1


@pytest.mark.parametrize("line", [
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": ["hi"]},
    {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
])
def test_warm_bad_messages_are_one_line_errors(tmp_path, tiny_llama_path, line):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    r = CliRunner().invoke(main, ["warm", str(tmp_path / "s"), "--model", str(tiny_llama_path),
                                 "--prompts", str(prompts)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert "p.jsonl:1" in r.output

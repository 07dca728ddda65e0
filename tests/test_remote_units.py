"""Remote tier pieces on their own: the record codec and its verification, the
circuit breaker, URL checks, the server flags, and ``tiercache stats --remote-url``
against a real redis-server."""

from __future__ import annotations

import json

import pytest
import xxhash
from click.testing import CliRunner

from tiercache.remote.client import CircuitBreaker, check_url, redacted
from tiercache.remote.codec import (
    HEADER_SIZE,
    RemoteRecordError,
    decode,
    decode_verified,
    encode,
    parse_key,
    record_key,
)
from tiercache.server.config import parse_config
from tiercache.store.hashing import chain_root, next_hash, pack_tokens, packed_checkpoint_id
from tiercache.store.index import KIND_BLOCK, KIND_CHECKPOINT, KIND_TAIL, Record
from tiercache.tools.cli import main as cli

NS = bytes(range(16))
PAYLOAD = b"safetensors bytes" * 10


def _block(tokens=(5, 6, 7, 8), salt=None, payload=PAYLOAD):
    root = chain_root(NS, salt)
    packed = pack_tokens(list(tokens))
    rid = next_hash(root, packed)
    rec = Record(rid, KIND_BLOCK, NS, root, len(payload), xxhash.xxh3_64_intdigest(payload),
                 0.0, 0.0, 0, len(tokens), packed)
    return rec, root, packed


def _check(raw, rec, root, packed, kinds=(KIND_BLOCK,)):
    return decode_verified(raw, record_id=rec.id, namespace=NS, parent=root, tokens=packed,
                           position=rec.position, kinds=kinds)


def test_codec_round_trip_and_key_layout():
    rec, root, packed = _block()
    raw = encode(rec, PAYLOAD)
    assert len(raw) == HEADER_SIZE + len(packed) + len(PAYLOAD)
    rr = _check(raw, rec, root, packed)
    assert rr.payload == PAYLOAD and rr.record.tokens == packed and rr.record.parent == root
    key = record_key(NS, rec.id)
    assert key == f"tiercache:v1:{NS.hex()}:{rec.id.hex()}"
    assert parse_key(key) == (NS.hex(), rec.id.hex()) and parse_key("other:key") is None


def test_tail_and_checkpoint_ids_are_recomputed():
    root = chain_root(NS)
    packed = pack_tokens([9, 10, 11])
    cid = packed_checkpoint_id(root, packed)
    for kind in (KIND_TAIL, KIND_CHECKPOINT):
        rec = Record(cid, kind, NS, root, len(PAYLOAD), xxhash.xxh3_64_intdigest(PAYLOAD), 0, 0, 0, 3, packed)
        assert _check(encode(rec, PAYLOAD), rec, root, packed, kinds=(kind,)).record.kind == kind
        with pytest.raises(RemoteRecordError, match="expected"):
            _check(encode(rec, PAYLOAD), rec, root, packed, kinds=(KIND_BLOCK,))


@pytest.mark.parametrize("field,value,reason", [
    ("tokens", pack_tokens([5, 6, 7, 9]), "other tokens"),
    ("namespace", bytes(16), "namespace"),
    ("parent", bytes(16), "parent"),
    ("id", bytes(16), "record id"),
    ("position", 5, "other tokens"),
    ("checksum", 1, "checksum"),
])
def test_any_mismatch_is_rejected(field, value, reason):
    rec, root, packed = _block()
    bad = Record(**{**rec.__dict__, field: value})
    with pytest.raises(RemoteRecordError, match=reason):
        _check(encode(bad, PAYLOAD), rec, root, packed)


def test_self_consistent_record_for_other_tokens_is_rejected():
    # A hostile writer stores a valid record of other tokens under our key.
    rec, root, packed = _block()
    other, _, other_packed = _block(tokens=(1, 2, 3, 4))
    with pytest.raises(RemoteRecordError):
        _check(encode(other, PAYLOAD), rec, root, packed)
    # ...or claims our id with its tokens: the recomputed chain hash differs.
    forged = Record(**{**other.__dict__, "id": rec.id})
    with pytest.raises(RemoteRecordError, match="chain hash|other tokens"):
        decode_verified(encode(forged, PAYLOAD), record_id=rec.id, namespace=NS, parent=root,
                        tokens=other_packed, position=4, kinds=(KIND_BLOCK,))


@pytest.mark.parametrize("raw", [b"", b"TCRR", b"XXXX" + bytes(200)])
def test_garbage_values_are_rejected(raw):
    with pytest.raises(RemoteRecordError):
        decode(raw)


def test_truncated_and_flipped_values_are_rejected():
    rec, root, packed = _block()
    raw = encode(rec, PAYLOAD)
    with pytest.raises(RemoteRecordError, match="length"):
        _check(raw[:-1], rec, root, packed)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    with pytest.raises(RemoteRecordError, match="checksum"):
        _check(bytes(flipped), rec, root, packed)
    newer = bytearray(raw)
    newer[4] = 99  # a future record version is not read
    with pytest.raises(RemoteRecordError, match="version"):
        decode(bytes(newer))


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_half_opens_and_backs_off():
    clock = _Clock()
    b = CircuitBreaker(failures=3, cooldown=1.0, max_cooldown=4.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow() and b.opened == 1
    clock.t = 1.0
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # one trial at a time
    b.failure()  # trial failed: open again, cooldown doubled
    clock.t = 2.5
    assert not b.allow()
    clock.t = 3.0
    assert b.allow()
    b.failure()
    clock.t = 6.9
    assert not b.allow()  # 4 s now (capped)
    clock.t = 7.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "closed"  # the count started again


def test_urls():
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///tmp/redis.sock"):
        assert check_url(url) == url
    for url in ("http://h", "redis://", "unix://", "h:6379"):
        with pytest.raises(ValueError):
            check_url(url)
    assert redacted("redis://:secret@h:1/0") == "redis://:***@h:1/0"


def test_server_flags(tmp_path, capsys):
    cfg = parse_config(["--disk-dir", str(tmp_path / "d"), "--remote-url", "redis://127.0.0.1:6379/2",
                        "--remote-ttl", "60", "--remote-timeout-ms", "7"], env={})
    assert (cfg.remote_url, cfg.remote_ttl, cfg.remote_timeout_ms) == ("redis://127.0.0.1:6379/2", 60, 7.0)
    env = {"TIERCACHE_REMOTE_URL": "unix:///tmp/r.sock", "TIERCACHE_DISK_DIR": str(tmp_path / "e")}
    assert parse_config([], env=env).remote_url == "unix:///tmp/r.sock"
    for argv in (["--remote-url", "redis://h:1/0"],  # no disk dir
                 ["--disk-dir", str(tmp_path / "f"), "--remote-url", "memcached://h"],
                 ["--disk-dir", str(tmp_path / "f"), "--remote-ttl", "-1"],
                 ["--disk-dir", str(tmp_path / "f"), "--remote-timeout-ms", "0"]):
        with pytest.raises(SystemExit) as exc:
            parse_config(argv, env={})
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--remote-url needs --disk-dir" in err and "Traceback" not in err


def test_cli_stats_remote(redis_server):
    r = redis_server.client()
    rec, _, _ = _block()
    r.set(record_key(NS, rec.id), encode(rec, PAYLOAD))
    tail = Record(**{**rec.__dict__, "kind": KIND_TAIL, "id": bytes(range(1, 17))})
    r.set(record_key(NS, tail.id), encode(tail, PAYLOAD))
    r.set(record_key(bytes(16), bytes(16)), b"not a record")
    r.set("unrelated", b"x")
    res = CliRunner().invoke(cli, ["stats", "--remote-url", redis_server.url])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)["remote"]
    by_ns = {e["namespace"]: e for e in data["namespaces"]}
    assert by_ns[NS.hex()]["blocks"] == 1 and by_ns[NS.hex()]["tails"] == 1
    assert by_ns[NS.hex()]["bytes"] == 2 * len(encode(rec, PAYLOAD))
    assert by_ns[bytes(16).hex()]["foreign"] == 1
    assert data["total"]["records"] == 3
    table = CliRunner().invoke(cli, ["stats", "--remote-url", redis_server.url, "--table"])
    assert table.exit_code == 0 and NS.hex()[:12] in table.output
    down = CliRunner().invoke(cli, ["stats", "--remote-url", "redis://127.0.0.1:1/0"])
    assert down.exit_code != 0 and "cannot read" in down.output


def test_dropin_flags(capsys):
    from tiercache.server import mlx_lm_dropin as D

    opts, rest = D.parse_options(
        ["--disk-dir", "/tmp/x", "--remote-url", "rediss://h:6380/0", "--remote-ttl", "30",
         "--remote-timeout-ms", "5", "--model", "m"], environ={})
    assert (opts.remote_url, opts.remote_ttl, opts.remote_timeout_ms) == ("rediss://h:6380/0", 30, 5.0)
    assert rest == ["--model", "m"]
    assert D.main(["--remote-url", "redis://h:1/0"], hard_exit=False) == 2
    assert "--remote-url needs --disk-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.parse_options(["--disk-dir", "/tmp/x", "--remote-url", "ftp://h"], environ={})


def test_dropin_cache_gets_the_remote_tier(tmp_path, redis_server, monkeypatch):
    from tiercache.server import mlx_lm_dropin as D

    opts, _ = D.parse_options(
        ["--disk-dir", str(tmp_path / "d"), "--remote-url", redis_server.url, "--remote-ttl", "30"],
        environ={})
    monkeypatch.setitem(D._state, "opts", opts)
    cache = D._make_cache(4)
    try:
        st = cache.stats()["remote"]
        assert st["url"] == redis_server.url and st["ttl"] == 30 and st["breaker"] == "closed"
    finally:
        cache.close()

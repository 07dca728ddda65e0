"""The shared settings table: the server, the mlx_lm drop-in and the CLI agree."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from tiercache.errors import ConfigError
from tiercache.server.config import ServerConfig, build_parser, parse_config
from tiercache.server.mlx_lm_dropin import DROPIN_SETTINGS, parse_options
from tiercache.server.mlx_lm_dropin import build_parser as dropin_parser
from tiercache.settings import CACHE_SETTINGS, SETTINGS, parse_budget, parse_size
from tiercache.tools.cli import main as cli

ZERO_BUDGET = "0 is not a budget"


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("4G", 4 * 10**9), ("512M", 512 * 10**6),
    ("1048576", 1048576), (1024, 1024), ("1.5GB", 1_500_000_000), ("1.5 GiB", 3 * 2**29),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1", "12XB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(text)


def test_budget_none_and_zero():
    assert parse_budget("none") is None and parse_budget("None") is None
    assert parse_budget("2GB") == 2 * 10**9
    with pytest.raises(ConfigError, match=ZERO_BUDGET):
        parse_budget("0")


def _cli_warm_params(args, monkeypatch, env=None):
    """Parse `tiercache warm` flags with click itself (nothing is warmed)."""
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    warm = cli.commands["warm"]
    ctx = warm.make_context("warm", ["dir", "--model", ".", "--prompts", "p.jsonl", *args])
    return ctx.params


def _front_ends(args, monkeypatch, env=None):
    """Return (server, drop-in, CLI) values of the shared settings for the same input."""
    env = env or {}
    server = parse_config(args, env=env)
    dropin, _ = parse_options(args, env)
    return server, dropin, _cli_warm_params(args, monkeypatch, env)


def test_sizes_and_env_mean_the_same_everywhere(monkeypatch):
    server, dropin, cli_params = _front_ends(["--disk-bytes", "50GB", "--block-size", "64"],
                                             monkeypatch)
    assert server.disk_bytes == dropin.disk_bytes == cli_params["disk_bytes"] == 50 * 10**9
    assert server.block_size == dropin.block_size == cli_params["block_size"] == 64
    env = {"TIERCACHE_DISK_BYTES": "2GiB", "TIERCACHE_BLOCK_SIZE": "32"}
    server, dropin, cli_params = _front_ends([], monkeypatch, env)
    assert server.disk_bytes == dropin.disk_bytes == cli_params["disk_bytes"] == 2 * 2**30
    assert server.block_size == dropin.block_size == cli_params["block_size"] == 32
    # The flag wins over the variable, also when it says "no limit".
    server, dropin, cli_params = _front_ends(["--disk-bytes", "none"], monkeypatch, env)
    assert server.disk_bytes is dropin.disk_bytes is cli_params["disk_bytes"] is None


def test_unset_means_the_same_everywhere(monkeypatch):
    server, dropin, cli_params = _front_ends([], monkeypatch)
    assert server.disk_bytes is dropin.disk_bytes is cli_params["disk_bytes"] is None
    assert dropin.block_size is cli_params["block_size"] is None  # the store's own
    assert server.block_size == 256  # resolved: no store, so a new store's size
    assert server.prefill_step_size == cli_params["prefill_step_size"] == 2048


@pytest.mark.parametrize("env", [False, True])
def test_disk_bytes_zero_is_refused_everywhere(monkeypatch, capsys, env):
    args, environ = (["--disk-bytes", "0"], {}) if not env else ([], {"TIERCACHE_DISK_BYTES": "0"})
    where = "environment variable TIERCACHE_DISK_BYTES" if env else "--disk-bytes"
    for parse in (lambda: parse_config(args, env=environ), lambda: parse_options(args, environ)):
        with pytest.raises(SystemExit) as exc:
            parse()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and where in err and ZERO_BUDGET in err, err
    dir_args = ["warm", "dir", "--model", ".", "--prompts", "p.jsonl"]
    res = CliRunner().invoke(cli, dir_args + args, env=environ)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and where in res.output and ZERO_BUDGET in res.output


@pytest.mark.parametrize("flag,bad", [("--block-size", "0"), ("--block-size", "x"),
                                      ("--write-policy", "around"), ("--flush-timeout", "-1"),
                                      ("--writer-queue-bytes", "0"), ("--prewarm-bytes", "lots")])
def test_bad_values_are_one_line_and_exit_2(flag, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config([flag, bad], env={})
    assert exc.value.code == 2
    server_err = capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parse_options([flag, bad], {})
    assert exc.value.code == 2
    dropin_err = capsys.readouterr().err
    assert server_err.count("\n") == dropin_err.count("\n") == 1
    # The same message (after the program name) in both.
    assert server_err.split(": error: ")[1] == dropin_err.split(": error: ")[1]


def test_every_front_end_is_built_from_the_table():
    server_help, dropin_help = build_parser().format_help(), dropin_parser().format_help()
    for s in CACHE_SETTINGS:
        assert f"{s.flag} {s.metavar}" in server_help and s.env in server_help
        # The drop-in adds only what mlx_lm.server lacks (mlx_lm has --prompt-cache-*).
        assert (f"{s.flag} {s.metavar}" in dropin_help) == (s in DROPIN_SETTINGS)
    cli_opts = {p.opts[0]: p for p in cli.commands["warm"].params if p.opts[0].startswith("--")}
    for name in ("disk_bytes", "block_size", "prefill_step_size"):
        s = SETTINGS[name]
        assert cli_opts[s.flag].envvar == s.env and cli_opts[s.flag].type.setting is s
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    assert {s.name for s in CACHE_SETTINGS} <= fields
    assert all(s.env in s.help_text() for s in CACHE_SETTINGS)

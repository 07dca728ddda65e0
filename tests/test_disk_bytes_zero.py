"""``--disk-bytes 0`` means one thing everywhere: refused, with the same message."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tiercache.server.config import parse_config
from tiercache.server.mlx_lm_dropin import main as dropin_main
from tiercache.tools.cli import main as cli_main

MESSAGE = "must be greater than 0 (omit it for no budget)"


def test_server_refuses_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--disk-dir", str(tmp_path / "d"), "--disk-bytes", "0"])
    assert exc.value.code == 2 and MESSAGE in capsys.readouterr().err


def test_dropin_refuses_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        dropin_main(["--disk-dir", str(tmp_path / "d"), "--disk-bytes", "0"])
    assert exc.value.code == 2 and MESSAGE in capsys.readouterr().err


def test_cli_warm_refuses_zero(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hello"\n')
    res = CliRunner().invoke(cli_main, ["warm", str(tmp_path / "d"), "--model", str(tmp_path),
                                        "--prompts", str(prompts), "--disk-bytes", "0"])
    assert res.exit_code == 2 and MESSAGE in res.output
    assert not (tmp_path / "d").exists()  # nothing created

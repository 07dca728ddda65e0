"""The server's command line: its own flags plus the shared cache settings.

Every flag is a :class:`tiercache.settings.Setting`: the cache flags come from
:data:`tiercache.settings.CACHE_SETTINGS` (shared with the mlx_lm drop-in and
the CLI), the server-only ones from :data:`SERVER_SETTINGS` below. Each can
also be set through ``TIERCACHE_<FLAG_NAME>``; a flag given on the command line
wins over the environment. Bad values are refused with a single line on stderr
and exit status 2, never a traceback.

To add a server flag, add one :class:`~tiercache.settings.Setting` to
:data:`SERVER_SETTINGS` (or, if the drop-in or the CLI need it too, to
``CACHE_SETTINGS``): the parser, the environment variable, ``--help`` and the
:class:`ServerConfig` field all follow from it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tiercache.errors import ConfigError, TiercacheError
from tiercache.store.disk import DiskStore
from tiercache.store.layout import BLOCKS_DIR, CHECKPOINTS_DIR, DEFAULT_BLOCK_SIZE, INDEX_DIR
from tiercache.settings import (
    CACHE_SETTINGS,
    ENV_PREFIX,
    WRITE_POLICIES,
    OneLineArgumentParser,
    Setting,
    add_arguments,
    choice,
    config_class,
    parse_known,
    parse_port,
    parse_positive_int,
    parse_seconds,
    parse_size,
    parse_switch,
    parse_text,
)

__all__ = ["ENV_PREFIX", "WRITE_POLICIES", "ConfigError", "ServerConfig", "SERVER_SETTINGS",
           "build_parser", "parse_config", "parse_size", "validate_config"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_names(text) -> tuple[str, ...]:
    """Parse ``NAME[,ALIAS...]`` into a tuple of names (empty parts dropped).

    Raises:
        ConfigError: If no name is given.
    """
    if isinstance(text, tuple):
        return text
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    if not names:
        raise ConfigError(f"no model name in {text!r}")
    return names
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SERVER_SETTINGS: tuple[Setting, ...] = (
    Setting("--model", parse_text, None,
            "Local mlx-lm model folder or Hugging Face repo id; without it the built-in "
            "demo model is served (built on first run)", metavar="PATH_OR_REPO",
            shown_default="demo model"),
    Setting("--host", parse_text, "127.0.0.1", "Host address to bind", metavar="HOST"),
    Setting("--port", parse_port, 8080, "Port to listen on (0 = any free port)", metavar="PORT"),
    Setting("--max-tokens", parse_positive_int, 512,
            "Default maximum completion tokens per request", metavar="N"),
    Setting("--api-key", parse_text, None,
            "Require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route "
            "but /health", metavar="KEY",
            shown_default="none"),
    Setting("--log-level", choice(LOG_LEVELS, upper=True), "INFO", "Logging level",
            metavar="LEVEL"),
    Setting("--max-queue", parse_positive_int, 64,
            "Requests that may wait for the worker before new ones get 429", metavar="N"),
    Setting("--max-batch-size", parse_positive_int, 32,
            "Requests generated together in one continuous batch; more wait in the queue "
            "(1 = one at a time)", metavar="N"),
    Setting("--shutdown-timeout", parse_seconds, 10.0,
            "Seconds the running requests may go on after SIGTERM/SIGINT before they are "
            "cancelled; queued requests get 503 at once", metavar="SECONDS"),
    Setting("--served-model-name", parse_names, (),
            "Name clients use for the model, then aliases, comma-separated: NAME[,ALIAS...]; "
            "listed by /v1/models", metavar="NAMES", shown_default="the --model value"),
    Setting("--strict-model-name", parse_switch, False,
            "Refuse (404) requests naming a model other than the served name, its aliases or "
            "--model; by default any name is served by the loaded model", switch=True),
    Setting("--keep-billing-header", parse_switch, False,
            "Keep Claude Code's x-anthropic-billing-header system block in the rendered prompt "
            "(dropped by default: its per-request value breaks prefix caching)", switch=True),
)
ALL_SETTINGS: tuple[Setting, ...] = SERVER_SETTINGS + CACHE_SETTINGS

ServerConfig = config_class(
    "ServerConfig", ALL_SETTINGS,
    "Resolved server settings (one field per flag; see ``--help``).",
    __name__,
)


def build_parser(prog: str = "tiercache-server") -> OneLineArgumentParser:
    """Build the argument parser (defaults and env vars shown in help).

    Args:
        prog: Program name for usage and error lines.

    Returns:
        The parser; options not given leave no attribute (see :func:`parse_config`).
    """
    parser = OneLineArgumentParser(
        prog=prog,
        description="OpenAI-compatible MLX inference server on a persistent "
        "tiered (memory + disk) prefix KV cache.",
    )
    add_arguments(parser, ALL_SETTINGS)
    return parser


def parse_config(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    prog: str = "tiercache-server",
) -> ServerConfig:
    """Parse flags and environment variables into a :class:`ServerConfig`.

    Exits with status 2 and one line on stderr when a value is bad.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        env: Environment mapping (default ``os.environ``).
        prog: Program name for messages.

    Returns:
        The resolved configuration.
    """
    parser = build_parser(prog)
    values, unknown = parse_known(parser, ALL_SETTINGS, sys.argv[1:] if argv is None else argv,
                                  os.environ if env is None else env)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cfg = ServerConfig(**values)
    try:
        validate_config(cfg)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg


def validate_config(cfg: ServerConfig) -> None:
    """Check values that depend on each other or on the file system.

    Args:
        cfg: The configuration to check.

    Raises:
        ConfigError: With a one-line explanation.
    """
    if cfg.model is not None:
        looks_local = cfg.model.startswith((".", "/", "~")) or os.path.exists(cfg.model)
        if looks_local and not Path(cfg.model).expanduser().is_dir():
            raise ConfigError(f"--model: no model folder at {cfg.model!r}")
        if not looks_local and not _HF_REPO_RE.match(cfg.model):
            raise ConfigError(
                f"--model: {cfg.model!r} is neither a folder nor a Hugging Face repo id"
            )
    if cfg.disk_dir is not None:
        path = Path(cfg.disk_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--disk-dir: {cfg.disk_dir!r} exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"--disk-dir: cannot create {cfg.disk_dir!r}: {exc.strerror}")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"--disk-dir: {cfg.disk_dir!r} is not writable")
        cfg.block_size = _check_store(path, cfg.block_size)
        cfg.disk_dir = str(path)
    elif cfg.disk_bytes is not None:
        logging.getLogger(__name__).warning("--disk-bytes has no effect without --disk-dir")
    if cfg.remote_url is not None and cfg.disk_dir is None:
        raise ConfigError("--remote-url needs --disk-dir (remote hits are kept on local disk)")
    if cfg.block_size is None:
        cfg.block_size = DEFAULT_BLOCK_SIZE  # also the checkpoint spacing without a disk tier


def _check_store(path: Path, block_size: int | None) -> int | None:
    """Refuse a disk dir the cache could not open: foreign files, another block
    size, a newer format, a corrupt index (found now rather than after startup).

    Args:
        path: The disk dir (it exists).
        block_size: The block size asked for; ``None`` takes the store's own.

    Returns:
        The block size the store will use (``block_size`` for a new store).

    Raises:
        ConfigError: With the store's own one-line explanation.
    """
    if not (path / INDEX_DIR).exists():
        if any(p.name not in (BLOCKS_DIR, CHECKPOINTS_DIR) for p in path.iterdir()):
            raise ConfigError(f"--disk-dir: {str(path)!r} is not empty and is not a "
                              "tiercache store")
        return block_size
    try:
        with DiskStore(path, block_size=block_size, readonly=True, create=False) as store:
            return store.block_size
    except (TiercacheError, ValueError, OSError) as exc:  # a bad block_size is a ValueError
        detail = " ".join(str(exc).split())
        if "block size" in detail:
            detail += " (pass that --block-size, or use another --disk-dir)"
        raise ConfigError(f"--disk-dir: {detail}") from None


def main_error(message: str, prog: str = "tiercache-server") -> None:
    """Print one error line on stderr and exit with status 2.

    Args:
        message: What went wrong.
        prog: Program name prefix.
    """
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)

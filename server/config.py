"""Command-line flags, ``TIERCACHE_*`` environment variables and size parsing.

Every flag has a default shown in ``--help`` and can also be set through an
environment variable named ``TIERCACHE_<FLAG_NAME>`` (upper case, dashes
replaced by underscores). A flag given on the command line wins over the
environment. Bad values are refused with a single line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

ENV_PREFIX = "TIERCACHE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WRITE_POLICIES = ("through", "back")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BYTESIZE = TypeAdapter(ByteSize)


class ConfigError(ValueError):
    """A flag or environment variable has an unusable value."""


def parse_size(text: Any) -> int:
    """Parse a byte size such as ``8GB``, ``512MiB``, ``8G`` or ``1048576``.

    Uses pydantic's :class:`~pydantic.ByteSize`, whose decimal units agree
    with mlx_lm's spellings (``M`` = 10**6, ``G`` = 10**9) and which also
    accepts binary units (``KiB``, ``MiB``, ``GiB``).

    Args:
        text: The size as a string or integer.

    Returns:
        The size in bytes.

    Raises:
        argparse.ArgumentTypeError: If the value is not a non-negative size.
    """
    if isinstance(text, int):
        value: Any = text
    else:
        value = str(text).strip()
    try:
        size = int(_BYTESIZE.validate_python(value))
    except (ValidationError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (use e.g. 8GB, 512MiB, 4G or a plain number of bytes)"
        ) from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must not be negative")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _choice(options: Sequence[str], upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        value = value.upper() if upper else value.lower()
        if value not in options:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(options)})"
            )
        return value

    return parse


def _size_or_none(text: str) -> int | None:
    if str(text).strip().lower() in ("", "none"):
        return None
    return parse_size(text)


@dataclass
class ServerConfig:
    """Resolved server settings.

    Attributes:
        model: Local mlx-lm model folder or Hugging Face repo id; ``None``
            serves the built-in demo model.
        host: Address to bind.
        port: TCP port to bind (0 picks a free one).
        prompt_cache_bytes: Memory-tier byte budget (``None`` = unlimited).
        prompt_cache_size: Maximum number of sequences in the memory tier.
        disk_dir: Folder of the disk tier (``None`` disables it).
        disk_bytes: Disk-tier byte budget (``None`` = unlimited).
        block_size: Tokens per disk block.
        write_policy: ``through`` or ``back``.
        prewarm_bytes: Bytes of recent disk snapshots restored into memory at start.
        prefill_step_size: Tokens per prefill step.
        max_tokens: Default completion length for requests.
        api_key: Bearer key required on every route but ``/health`` when set.
        log_level: Python logging level name.
        max_queue: Requests allowed to wait for the worker before 429s.
        max_batch_size: Requests generated together in one continuous batch
            (1 = one at a time).
        flush_timeout: Seconds to wait for the disk writer at shutdown.
        writer_queue_bytes: Bound on snapshots waiting for the disk writer;
            beyond it the oldest pending writes are dropped (and counted).
    """

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    prompt_cache_bytes: int | None = None
    prompt_cache_size: int = 10
    disk_dir: str | None = None
    disk_bytes: int | None = None
    block_size: int = 256
    write_policy: str = "through"
    prewarm_bytes: int = 0
    prefill_step_size: int = 2048
    max_tokens: int = 512
    api_key: str | None = None
    log_level: str = "INFO"
    max_queue: int = 64
    max_batch_size: int = 32
    flush_timeout: float = 10.0
    writer_queue_bytes: int = 2 << 30


# (flag, parser, help). Defaults come from ServerConfig.
_FLAGS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--model", str, ("Local mlx-lm model folder or Hugging Face repo id; "
                      "without it the built-in demo model is served (built on first run)")),
    ("--host", str, "Host address to bind"),
    ("--port", _port, "Port to listen on (0 = any free port)"),
    ("--prompt-cache-bytes", _size_or_none, ("Memory-tier budget, e.g. 8GB, 512MiB, 4G "
                                             "or bytes (None = unlimited)")),
    ("--prompt-cache-size", _positive_int, "Maximum number of cached sequences in memory"),
    ("--disk-dir", str, "Folder for the disk tier; enables it (survives restarts)"),
    ("--disk-bytes", _size_or_none, "Disk-tier budget, e.g. 50GB (None = unlimited)"),
    ("--block-size", _positive_int, "Tokens per disk block"),
    ("--write-policy", _choice(WRITE_POLICIES), ("When entries reach disk: through "
                                                 "(on insert) or back (on demotion)")),
    ("--prewarm-bytes", parse_size, ("Bytes of the most recently used disk snapshots "
                                     "restored into memory in the background at start")),
    ("--prefill-step-size", _positive_int, "Tokens per prefill step"),
    ("--max-tokens", _positive_int, "Default maximum completion tokens per request"),
    ("--api-key", str, "Require 'Authorization: Bearer KEY' on every route but /health"),
    ("--log-level", _choice(LOG_LEVELS, upper=True), "Logging level"),
    ("--max-queue", _positive_int, ("Requests that may wait for the worker before "
                                    "new ones get 429")),
    ("--max-batch-size", _positive_int, ("Requests generated together in one continuous "
                                         "batch; more wait in the queue (1 = one at a time)")),
    ("--flush-timeout", _positive_float, "Seconds to wait for the disk writer at shutdown"),
    ("--writer-queue-bytes", parse_size, ("Bound on snapshots waiting for the disk writer; "
                                          "beyond it the oldest pending writes are dropped "
                                          "(counted in /metrics)")),
]


def env_name(flag: str) -> str:
    """Return the environment variable for a flag, e.g. ``TIERCACHE_PORT``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "tiercache-server") -> argparse.ArgumentParser:
    """Build the argument parser (defaults and env vars shown in help).

    Args:
        prog: Program name for usage and error lines.

    Returns:
        The parser. Defaults are ``None`` sentinels; see :func:`parse_config`.
    """
    parser = _OneLineParser(
        prog=prog,
        description="OpenAI-compatible MLX inference server on a persistent "
        "tiered (memory + disk) prefix KV cache.",
    )
    defaults = ServerConfig()
    for flag, kind, text in _FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        default = getattr(defaults, dest)
        shown = "demo model" if dest == "model" else ("None" if default is None else default)
        if dest == "api_key":
            shown = "None"
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            dest=dest,
            help=f"{text} (default: {shown}; env: {env_name(flag)})",
        )
    return parser


def parse_config(
    argv: Sequence[str] | None = None,
    env: dict | None = None,
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
    env = os.environ if env is None else env
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    cfg = ServerConfig()
    kinds = {flag.lstrip("-").replace("-", "_"): (flag, kind) for flag, kind, _ in _FLAGS}
    for f in fields(ServerConfig):
        flag, kind = kinds[f.name]
        value = getattr(ns, f.name)
        if value is None and env.get(env_name(flag), "") != "":
            raw = env[env_name(flag)]
            try:
                value = kind(raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"environment variable {env_name(flag)}: {exc}")
        if value is not None:
            setattr(cfg, f.name, value)
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
        _check_store(path, cfg.block_size)
        cfg.disk_dir = str(path)
    elif cfg.disk_bytes is not None:
        logging.getLogger(__name__).warning("--disk-bytes has no effect without --disk-dir")
    if cfg.prompt_cache_bytes == 0:
        raise ConfigError("--prompt-cache-bytes must be greater than 0")
    if cfg.disk_bytes == 0:
        raise ConfigError("--disk-bytes must be greater than 0")
    if cfg.writer_queue_bytes == 0:
        raise ConfigError("--writer-queue-bytes must be greater than 0")
    if cfg.api_key is not None and cfg.api_key.strip() == "":
        raise ConfigError("--api-key must not be empty")


def _check_store(path: Path, block_size: int) -> None:
    """Refuse a disk dir the cache could not open: foreign files, another block
    size, a newer format, a corrupt index (found now rather than after startup).

    Raises:
        ConfigError: With the store's own one-line explanation.
    """
    from tiercache.store.disk import (
        BLOCKS_DIR,
        CHECKPOINTS_DIR,
        INDEX_DIR,
        DiskStore,
        StoreError,
    )

    if not (path / INDEX_DIR).exists():
        if any(p.name not in (BLOCKS_DIR, CHECKPOINTS_DIR) for p in path.iterdir()):
            raise ConfigError(f"--disk-dir: {str(path)!r} is not empty and is not a "
                              "tiercache store")
        return
    try:
        DiskStore(path, block_size=block_size, readonly=True, create=False).close()
    except (StoreError, ValueError, OSError) as exc:
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

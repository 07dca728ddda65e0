"""Every setting the front-ends share, defined once.

A :class:`Setting` holds a flag's name, its parser (which also validates), its
default, its ``TIERCACHE_*`` environment variable and its help. The server
(``tiercache.server.config``), the mlx_lm drop-in
(``tiercache.server.mlx_lm_dropin``) and the CLI (``tiercache.tools.cli``)
build their command lines from these entries — argparse through
:func:`add_arguments` and :func:`parse_known`, click through
``tiercache.tools.options`` — so a value means the same thing everywhere.

Precedence is the same in every front-end: the command line, then the
environment variable, then the default. A bad value is a :class:`ConfigError`
whose message names the flag or the variable; the front-ends print it as one
line and exit with status 2.

Budgets (``--prompt-cache-bytes``, ``--disk-bytes``) take a size or ``none``
(no limit). ``0`` is refused: a zero budget would silently cache nothing (or,
on disk, evict everything at once), which is never what someone means.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ByteSize, TypeAdapter, ValidationError

from .errors import ConfigError

ENV_PREFIX = "TIERCACHE_"
WRITE_POLICIES = ("through", "back")
REDIS_SCHEMES = ("redis", "rediss", "unix")
_BYTESIZE = TypeAdapter(ByteSize)
_NO_LIMIT = ("none", "unlimited")


# --- parsers: text (or an already typed value) in, value out, ConfigError on bad input ----


def parse_size(text: Any) -> int:
    """Parse a byte size such as ``8GB``, ``512MiB``, ``4G``, ``1.5 GiB`` or ``1048576``.

    Uses pydantic's :class:`~pydantic.ByteSize`, whose decimal units agree with
    mlx_lm's spellings (``M`` = 10**6, ``G`` = 10**9) and which also accepts
    binary units (``KiB``, ``MiB``, ``GiB``).

    Args:
        text: The size as a string or an integer.

    Returns:
        The size in bytes (0 or more).

    Raises:
        ConfigError: If the value is not a non-negative size.
    """
    value = text if isinstance(text, int) else str(text).strip()
    try:
        size = int(_BYTESIZE.validate_python(value))
    except (ValidationError, ValueError, TypeError):
        raise ConfigError(
            f"bad size {text!r}: use e.g. 8GB, 512MiB, 4G or a number of bytes"
        ) from None
    if size < 0:
        raise ConfigError(f"bad size {text!r}: must not be negative")
    return size


def parse_positive_size(text: Any) -> int:
    """Parse a byte size that must be greater than 0.

    Raises:
        ConfigError: If the value is not a size, or is 0.
    """
    size = parse_size(text)
    if size == 0:
        raise ConfigError("must be greater than 0")
    return size


def parse_budget(text: Any) -> int | None:
    """Parse a byte budget: a size greater than 0, or ``none`` for no limit.

    Returns:
        The budget in bytes, or ``None`` for no limit.

    Raises:
        ConfigError: If the value is not a size, or is 0.
    """
    if text is None or str(text).strip().lower() in _NO_LIMIT:
        return None
    size = parse_size(text)
    if size == 0:
        raise ConfigError("0 is not a budget: give a size greater than 0, or 'none' for no limit")
    return size


def parse_positive_int(text: Any) -> int:
    """Parse an integer greater than 0.

    Raises:
        ConfigError: Otherwise.
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"bad integer {text!r}") from None
    if value <= 0:
        raise ConfigError(f"must be a positive integer, got {text!r}")
    return value


def parse_block_size(text: Any) -> int | None:
    """Parse a block size: a positive integer, or ``none`` for the store's own.

    Raises:
        ConfigError: Otherwise.
    """
    if text is None or str(text).strip().lower() == "none":
        return None
    return parse_positive_int(text)


def parse_seconds(text: Any) -> float:
    """Parse a number of seconds, 0 or more.

    Raises:
        ConfigError: Otherwise.
    """
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ConfigError(f"bad number {text!r}") from None
    if not value >= 0:  # also refuses NaN
        raise ConfigError(f"must not be negative, got {text!r}")
    return value


def parse_port(text: Any) -> int:
    """Parse a TCP port, 0 (any free port) to 65535.

    Raises:
        ConfigError: Otherwise.
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"bad port {text!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {text!r}")
    return value


def parse_text(text: Any) -> str:
    """Return the text itself; refuse an empty or blank one.

    Raises:
        ConfigError: If the text is blank.
    """
    value = str(text)
    if value.strip() == "":
        raise ConfigError("must not be empty")
    return value


def parse_path(text: Any) -> str:
    """Return a folder path with ``~`` expanded; refuse an empty one.

    Raises:
        ConfigError: If the text is blank.
    """
    return os.path.expanduser(parse_text(text))


def parse_switch(text: Any) -> bool:
    """Parse an on/off value (the flag itself takes none; its variable does).

    Raises:
        ConfigError: Unless the text is 1/0, true/false, yes/no or on/off.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"bad switch {text!r} (use 1/0, true/false, yes/no or on/off)")


def choice(options: Sequence[str], *, upper: bool = False) -> Callable[[Any], str]:
    """Return a parser that accepts one of ``options`` (case-insensitive).

    Args:
        options: The accepted values, in their canonical case.
        upper: Canonical case is upper (else lower).
    """

    def parse(text: Any) -> str:
        value = str(text).strip()
        value = value.upper() if upper else value.lower()
        if value not in options:
            raise ConfigError(f"bad choice {text!r} (choose from {', '.join(options)})")
        return value

    return parse


def parse_redis_url(text: Any) -> str | None:
    """Parse a Redis/Valkey URL (``redis://``, ``rediss://``, ``unix://``), or ``none``.

    Raises:
        ConfigError: For another scheme, or a URL without a host or socket path.
    """
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    url = str(text).strip()
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"remote URL must start with redis://, rediss:// or unix://, not {url!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"unix:// remote URL needs a socket path: {url!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"remote URL has no host: {url!r}")
    return url


def parse_non_negative_int(text: Any) -> int:
    """Parse an integer, 0 or more.

    Raises:
        ConfigError: Otherwise.
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"bad integer {text!r}") from None
    if value < 0:
        raise ConfigError(f"must not be negative, got {text!r}")
    return value


def parse_positive_ms(text: Any) -> float:
    """Parse a number of milliseconds greater than 0.

    Raises:
        ConfigError: Otherwise.
    """
    value = parse_seconds(text)
    if value == 0:
        raise ConfigError("must be greater than 0")
    return value


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One flag, defined once for every front-end.

    Attributes:
        flag: The long option, e.g. ``--disk-bytes``.
        parse: Turns the text given (flag or environment) into the value;
            raises :class:`ConfigError` when the text is unusable.
        default: The value when neither the flag nor the variable is given.
        help: One sentence for ``--help`` (default and variable are appended).
        metavar: Placeholder shown in usage lines.
        shown_default: How ``--help`` shows the default, when ``str(default)``
            would not say it well.
        switch: The flag takes no value and turns the setting on; its
            environment variable takes 1/0, true/false, yes/no or on/off.
    """

    flag: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    shown_default: str | None = None
    switch: bool = False

    @property
    def name(self) -> str:
        """Return the attribute name, e.g. ``disk_bytes``."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        """Return the environment variable, e.g. ``TIERCACHE_DISK_BYTES``."""
        return ENV_PREFIX + self.name.upper()

    def help_text(self) -> str:
        """Return the help line with the default and the variable appended."""
        shown = self.shown_default if self.shown_default is not None else self.default
        return f"{self.help} (default: {shown}; env: {self.env})"

    def parse_env(self, environ: Mapping[str, str]) -> tuple[bool, Any]:
        """Return ``(True, value)`` if the variable is set (and not empty), else ``(False, None)``.

        Raises:
            ConfigError: Naming the variable, when its value is unusable.
        """
        raw = environ.get(self.env, "")
        if raw == "":
            return False, None
        try:
            return True, self.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"environment variable {self.env}: {exc}") from None


CACHE_SETTINGS: tuple[Setting, ...] = (
    Setting("--prompt-cache-bytes", parse_budget, None,
            "Memory-tier budget, e.g. 8GB, 512MiB, 4G or bytes; 'none' = no limit, 0 is refused",
            metavar="SIZE", shown_default="none"),
    Setting("--prompt-cache-size", parse_positive_int, 10,
            "Most cached sequences held in memory", metavar="N"),
    Setting("--disk-dir", parse_path, None,
            "Folder of the disk tier; enables it (survives restarts)", metavar="DIR",
            shown_default="none, memory only"),
    Setting("--disk-bytes", parse_budget, None,
            "Disk-tier budget, e.g. 50GB; 'none' = no limit, 0 is refused",
            metavar="SIZE", shown_default="none"),
    Setting("--block-size", parse_block_size, None,
            "Tokens per disk block; must match an existing store", metavar="N",
            shown_default="the store's own, 256 for a new store"),
    Setting("--write-policy", choice(WRITE_POLICIES), "through",
            "When snapshots reach disk: through (on insert) or back (when memory evicts them)",
            metavar="|".join(WRITE_POLICIES)),
    Setting("--prewarm-bytes", parse_size, 0,
            "Bytes of the most recently used disk snapshots restored into memory in the "
            "background at start (0 = off)", metavar="SIZE"),
    Setting("--writer-queue-bytes", parse_positive_size, 2 << 30,
            "Bound on snapshots waiting for the disk writer; beyond it the oldest pending "
            "writes are dropped (and counted)", metavar="SIZE", shown_default="2GiB"),
    Setting("--flush-timeout", parse_seconds, 10.0,
            "Seconds to wait for the disk writer at shutdown", metavar="SECONDS"),
    Setting("--prefill-step-size", parse_positive_int, 2048,
            "Tokens per prefill step", metavar="N"),
    Setting("--remote-url", parse_redis_url, None,
            "Shared remote tier on Redis/Valkey: redis://[:password@]host:port/db, rediss:// (TLS) "
            "or unix:///path; needs --disk-dir", metavar="URL", shown_default="none, no remote tier"),
    Setting("--remote-ttl", parse_non_negative_int, 7 * 24 * 3600,
            "Seconds each remote key lives (0 = no expiry)", metavar="SECONDS"),
    Setting("--remote-timeout-ms", parse_positive_ms, 50.0,
            "Socket timeout of remote lookups in ms: a stuck Redis never delays a request longer",
            metavar="MS"),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in CACHE_SETTINGS}


def pick(names: Iterable[str]) -> tuple[Setting, ...]:
    """Return the shared settings called ``names`` (attribute names), in that order."""
    return tuple(SETTINGS[n] for n in names)


def resolve(
    settings: Iterable[Setting], given: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Return every setting's value: the command line, else the environment, else the default.

    Args:
        settings: The settings of one front-end.
        given: Values parsed from the command line, by name; only those given.
        environ: The environment (``os.environ``).

    Raises:
        ConfigError: When an environment variable holds an unusable value.
    """
    values = {}
    for s in settings:
        if s.name in given:
            values[s.name] = given[s.name]
            continue
        found, value = s.parse_env(environ)
        values[s.name] = value if found else s.default
    return values


def config_class(name: str, settings: Sequence[Setting], doc: str, module: str) -> type:
    """Return a dataclass with one field per setting, defaulting to the setting's default.

    Adding a setting to a front-end's table is then all it takes to add the field.

    Args:
        name: Class name.
        settings: Its fields, in order.
        doc: First paragraph of the class docstring (the fields are listed after it).
        module: ``__module__`` of the class (for pickling and reprs).
    """
    cls = make_dataclass(name, [(s.name, Any, field(default=s.default)) for s in settings])
    lines = [doc, "", "Attributes:"] + [f"    {s.name}: {s.help}." for s in settings]
    cls.__doc__ = "\n".join(lines)
    cls.__module__ = module
    return cls


# --- argparse adapter ----------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _argparse_type(setting: Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return setting.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = setting.name  # argparse names the type in some messages
    return convert


def add_arguments(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """Add one option per setting; an option not given leaves no attribute.

    Leaving no attribute (``argparse.SUPPRESS``) lets :func:`parse_known` tell
    "not given" from "given as none", so the environment only fills the gaps.
    """
    for s in settings:
        if s.switch:
            parser.add_argument(s.flag, dest=s.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=s.help_text())
            continue
        parser.add_argument(s.flag, dest=s.name, type=_argparse_type(s), default=argparse.SUPPRESS,
                            metavar=s.metavar, help=s.help_text())


def parse_known(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting],
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Parse ``argv`` with a parser built by :func:`add_arguments`, then fill in the rest.

    Exits through ``parser.error`` (one line, status 2 with
    :class:`OneLineArgumentParser`) when a flag or variable is unusable.

    Returns:
        ``(values by name, arguments the parser does not know)``.
    """
    settings = tuple(settings)
    ns, rest = parser.parse_known_args(list(argv))
    try:
        values = resolve(settings, vars(ns), os.environ if environ is None else environ)
    except ConfigError as exc:
        parser.error(str(exc))
    return values, rest

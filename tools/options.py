"""click options built from the shared settings table (:mod:`tiercache.settings`).

The CLI's cache flags (``--disk-bytes``, ``--block-size``, ``--prefill-step-size``)
are the same :class:`~tiercache.settings.Setting` entries the server and the
mlx_lm drop-in use: same parser, same validation, same default, same
``TIERCACHE_*`` variable. A bad value is one line on stderr and exit status 2.
"""

from __future__ import annotations

from typing import Any, Callable

import click
from click.core import ParameterSource

from tiercache.errors import ConfigError
from tiercache.settings import SETTINGS, Setting, parse_size

EXIT_ERROR = 2


class CliError(click.ClickException):
    """One-line error, exit code 2."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) or "error")


def _where(setting_flag: str, env: str | None, param, ctx) -> str:
    """Return what to blame in a message: the flag, or the variable it was read from."""
    if env and ctx is not None and param is not None and param.name:
        if ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
            return f"environment variable {env}"
    return setting_flag


class SettingType(click.ParamType):
    """A click type that parses with a setting's own parser."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.name = setting.metavar

    def convert(self, value: Any, param, ctx) -> Any:
        """Return the parsed value; raise a one-line :class:`CliError` on a bad one."""
        if not isinstance(value, str):
            return value  # the default, already typed
        try:
            return self.setting.parse(value)
        except ConfigError as exc:
            raise CliError(f"{_where(self.setting.flag, self.setting.env, param, ctx)}: {exc}") from None


class SizeType(click.ParamType):
    """A byte size parsed like every other size in tiercache (:func:`parse_size`)."""

    name = "SIZE"

    def convert(self, value: Any, param, ctx) -> int:
        """Return the size in bytes; raise a one-line :class:`CliError` on a bad one."""
        try:
            return parse_size(value)
        except ConfigError as exc:  # one clean line, not a usage dump
            flag = param.opts[0] if param is not None and param.opts else "size"
            raise CliError(f"{flag}: {exc}") from None


SIZE = SizeType()


def setting_option(name: str) -> Callable:
    """Return a click option decorator for the shared setting called ``name``."""
    s = SETTINGS[name]
    return click.option(s.flag, s.name, type=SettingType(s), default=s.default, envvar=s.env,
                        metavar=s.metavar, help=s.help_text())

"""``tiercache-mlx-lm-server``: mlx_lm.server with the tiered cache.

Runs ``mlx_lm.server.main()`` unchanged except that the ``LRUPromptCache``
it builds is a :class:`tiercache.TieredPromptCache`, so its prefix cache
gains a disk tier and survives restarts. Our own flags (``--disk-dir``,
``--disk-bytes``, ``--block-size``, ``--write-policy``, ``--prewarm-bytes``,
``--writer-queue-bytes``, ``--flush-timeout``, from the shared table in
:mod:`tiercache.settings`) are parsed first; every other flag is passed
through to mlx_lm.server untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from tiercache.settings import SETTINGS, OneLineArgumentParser, add_arguments, parse_known, pick

logger = logging.getLogger("tiercache.dropin")

_state: dict = {"cache": None, "opts": None}

# The cache settings this wrapper adds to mlx_lm.server's own flags; the rest of
# the shared table (--prompt-cache-bytes, --prompt-cache-size, --prefill-step-size)
# are mlx_lm.server's flags already and pass through to it.
DROPIN_SETTINGS = pick(("disk_dir", "disk_bytes", "block_size", "write_policy",
                        "prewarm_bytes", "writer_queue_bytes", "flush_timeout",
                        "remote_url", "remote_ttl", "remote_timeout_ms"))
_PROMPT_CACHE_BYTES = SETTINGS["prompt_cache_bytes"]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for the flags this wrapper adds (defaults and env vars in help)."""
    parser = OneLineArgumentParser(
        prog="tiercache-mlx-lm-server",
        description="mlx_lm.server with a persistent tiered (memory + disk) prompt cache. "
        "All other flags are mlx_lm.server's.",
        add_help=False,
        allow_abbrev=False,  # an abbreviation of an mlx_lm.server flag is mlx_lm's
    )
    add_arguments(parser, DROPIN_SETTINGS)
    return parser


def parse_options(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Parse our flags (and ``TIERCACHE_*`` variables) out of ``argv``.

    ``--prompt-cache-bytes`` is mlx_lm.server's flag and stays in the rest, but
    it is read here with the shared parser too, so it means what it means in
    ``tiercache-server`` (and ``TIERCACHE_PROMPT_CACHE_BYTES`` sets it).

    Exits with status 2 and one line on stderr when a value is bad.

    Returns:
        ``(our options, the arguments for mlx_lm.server)``.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser()
    values, rest = parse_known(parser, DROPIN_SETTINGS, argv, environ)
    peek = OneLineArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    add_arguments(peek, [_PROMPT_CACHE_BYTES])
    values.update(parse_known(peek, [_PROMPT_CACHE_BYTES], rest, environ)[0])
    if values.get("remote_url") and not values.get("disk_dir"):
        parser.error("--remote-url needs --disk-dir (remote hits are kept on local disk)")
    return argparse.Namespace(**values), rest


def _make_cache(max_size: int = 10, max_bytes: int = 1 << 63, **_ignored):
    """Stand-in for ``LRUPromptCache(...)`` inside mlx_lm.server."""
    from tiercache import TieredPromptCache

    opts = _state["opts"]
    if opts.prompt_cache_bytes is not None and max_bytes == 1 << 63:
        max_bytes = opts.prompt_cache_bytes
    cache = TieredPromptCache(
        max_size,
        max_bytes,
        disk_dir=opts.disk_dir,
        disk_bytes=opts.disk_bytes,
        block_size=opts.block_size,
        write_policy=opts.write_policy,
        prewarm_bytes=opts.prewarm_bytes,
        writer_queue_bytes=opts.writer_queue_bytes,
        remote_url=opts.remote_url,
        remote_ttl=opts.remote_ttl,
        remote_timeout_ms=opts.remote_timeout_ms,
    )
    _state["cache"] = cache
    logger.info("tiercache: prompt cache is TieredPromptCache (disk tier: %s)",
                opts.disk_dir or "off")
    return cache


def _patch(mlx_server) -> None:
    """Swap the cache class and register loaded models with the cache."""
    mlx_server.LRUPromptCache = _make_cache
    base = mlx_server.ModelProvider

    class ModelProvider(base):  # type: ignore[misc, valid-type]
        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            super()._load(model_path, adapter_path, draft_model_path)
            cache = _state["cache"]
            if cache is not None and self.model is not None:
                try:
                    # The adapter and the draft model change the KV / add cache
                    # layers: both are part of the namespace.
                    cache.register_model(
                        self.model_key,
                        model_path,
                        self.model,
                        adapter_path=adapter_path,
                        draft_model_path=draft_model_path,
                        draft_model=getattr(self, "draft_model", None),
                    )
                except Exception:
                    logger.exception("tiercache: register_model failed")

    mlx_server.ModelProvider = ModelProvider


def _sigterm(signum, frame):
    raise KeyboardInterrupt()


def main(argv: Sequence[str] | None = None, hard_exit: bool = True) -> int:
    """Run mlx_lm.server with the tiered cache.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        hard_exit: After a clean stop (cache flushed and closed), end the
            process with ``os._exit`` so native threads left by MLX cannot
            abort interpreter teardown ("terminate called without an active
            exception").

    Returns:
        Exit status (0 after SIGINT/SIGTERM once the cache is flushed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print("\nmlx_lm.server flags:\n")
    try:
        opts, rest = parse_options(argv)
    except SystemExit as exc:
        return int(exc.code or 2)
    _state["opts"] = opts

    import mlx_lm.server as mlx_server

    _patch(mlx_server)
    signal.signal(signal.SIGTERM, _sigterm)
    saved = sys.argv
    sys.argv = ["tiercache-mlx-lm-server"] + rest
    try:
        mlx_server.main()
    except KeyboardInterrupt:
        pass
    finally:
        sys.argv = saved
        cache = _state["cache"]
        if cache is not None:
            try:
                cache.close(flush_timeout=opts.flush_timeout)
            except Exception:
                logger.exception("tiercache: cache close failed")
    if hard_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``tiercache-mlx-lm-server``: mlx_lm.server with the tiered cache.

Runs ``mlx_lm.server.main()`` unchanged except that the ``LRUPromptCache``
it builds is a :class:`tiercache.TieredPromptCache`, so its prefix cache
gains a disk tier and survives restarts. Our own flags (``--disk-dir``,
``--disk-bytes``, ``--block-size``, ``--write-policy``, ``--prewarm-bytes``,
``--writer-queue-bytes``, ``--flush-timeout``) are parsed first; every other
flag is passed through to mlx_lm.server untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .config import ENV_PREFIX, WRITE_POLICIES, parse_size

logger = logging.getLogger("tiercache.dropin")

_state: dict = {"cache": None, "opts": None}


def _size_or_none(text: str) -> int | None:
    return None if str(text).strip().lower() in ("", "none") else parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    """Parser for the flags this wrapper adds (defaults shown, env vars read)."""
    def env(name: str, default):
        return os.environ.get(ENV_PREFIX + name, default)

    p = argparse.ArgumentParser(
        prog="tiercache-mlx-lm-server",
        description="mlx_lm.server with a persistent tiered (memory + disk) prompt cache. "
        "All other flags are mlx_lm.server's.",
        add_help=False,
    )
    p.add_argument("--disk-dir", default=env("DISK_DIR", None),
                   help="Disk-tier folder; enables it (default: None; env: TIERCACHE_DISK_DIR)")
    p.add_argument("--disk-bytes", type=_size_or_none, default=env("DISK_BYTES", None),
                   help="Disk-tier budget, e.g. 50GB (default: None = unlimited; "
                   "env: TIERCACHE_DISK_BYTES)")
    p.add_argument("--block-size", type=int, default=env("BLOCK_SIZE", "256"),
                   help="Tokens per disk block (default: 256; env: TIERCACHE_BLOCK_SIZE)")
    p.add_argument("--write-policy", choices=WRITE_POLICIES, default=env("WRITE_POLICY", "through"),
                   help="through|back (default: through; env: TIERCACHE_WRITE_POLICY)")
    p.add_argument("--prewarm-bytes", type=parse_size, default=env("PREWARM_BYTES", "0"),
                   help="Bytes of recent disk snapshots restored into memory at start "
                   "(default: 0; env: TIERCACHE_PREWARM_BYTES)")
    p.add_argument("--writer-queue-bytes", type=parse_size,
                   default=env("WRITER_QUEUE_BYTES", str(2 << 30)),
                   help="Bound on snapshots waiting for the disk writer (default: 2147483648; "
                   "env: TIERCACHE_WRITER_QUEUE_BYTES)")
    p.add_argument("--flush-timeout", type=float, default=env("FLUSH_TIMEOUT", "10.0"),
                   help="Seconds to wait for the disk writer at exit (default: 10.0; "
                   "env: TIERCACHE_FLUSH_TIMEOUT)")
    return p


def _peek_prompt_cache_bytes(argv: Sequence[str]) -> int | None:
    """Read mlx_lm's ``--prompt-cache-bytes`` without consuming it."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--prompt-cache-bytes", default=None)
    ns, _ = peek.parse_known_args(list(argv))
    if ns.prompt_cache_bytes is None:
        return None
    try:
        return parse_size(ns.prompt_cache_bytes)
    except argparse.ArgumentTypeError:
        return None  # mlx_lm reports its own error


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
    ours = build_parser()
    if "-h" in argv or "--help" in argv:
        ours.print_help()
        print("\nmlx_lm.server flags:\n")
    try:
        opts, rest = ours.parse_known_args(argv)
    except SystemExit as exc:
        return int(exc.code or 2)
    if opts.block_size <= 0:
        ours.exit(2, f"{ours.prog}: error: --block-size must be positive\n")
    if opts.disk_bytes == 0:  # one meaning everywhere: the server refuses 0 the same way
        ours.exit(2, f"{ours.prog}: error: --disk-bytes must be greater than 0 (omit it for no budget)\n")
    if opts.disk_dir:
        opts.disk_dir = os.path.expanduser(opts.disk_dir)
    opts.prompt_cache_bytes = _peek_prompt_cache_bytes(rest)
    _state["opts"] = opts

    import mlx_lm.server as mlx_server

    _patch(mlx_server)
    signal.signal(signal.SIGTERM, _sigterm)
    saved = sys.argv
    sys.argv = [ours.prog] + rest
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

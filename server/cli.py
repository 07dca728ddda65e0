"""``tiercache-server``: parse flags, run uvicorn, shut down cleanly.

SIGINT/SIGTERM stop accepting connections, answer queued requests 503 at once,
let the running request finish within ``--shutdown-timeout`` (then cancel it
with a clean error), flush the cache writer within ``--flush-timeout`` and exit 0.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

from .config import parse_config

# Seconds uvicorn waits for connections beyond --shutdown-timeout.
_GRACE_MARGIN = 5.0


class _Server:
    """Factory for a uvicorn server that exits 0 on SIGINT/SIGTERM."""

    @staticmethod
    def build(config, on_signal=None):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                super().handle_exit(sig, frame)
                if on_signal is not None:
                    # Not inside the signal handler: it may have interrupted
                    # the event loop while it held the worker's lock.
                    threading.Thread(target=on_signal, name="tiercache-signal",
                                     daemon=True).start()
                # uvicorn re-raises captured signals after shutdown, which
                # would turn a clean stop into "killed by SIGTERM".
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

        return Server(config)


def main(argv: Sequence[str] | None = None, hard_exit: bool = True) -> int:
    """Run the server until a signal arrives.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        hard_exit: Once uvicorn has stopped (the lifespan has stopped the
            worker and flushed and closed the cache), end the process with
            ``os._exit`` so native threads left by MLX cannot abort
            interpreter teardown ("terminate called without an active
            exception", seen as exit status -6), as the mlx_lm drop-in does.

    Returns:
        Process exit status (also passed to ``sys.exit`` when run as a script).
    """
    cfg = parse_config(argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from .app import create_app
    from .listen import BindError, bind_listeners, listen_urls

    # Bind before the app exists: the model loads at startup, and a busy port
    # must be refused before that, with one line and exit 2 like any bad flag.
    try:
        sockets = bind_listeners(cfg.host, cfg.port)
    except BindError as exc:
        sys.stderr.write(f"tiercache-server: error: {exc}\n")
        return 2
    # uvicorn logs its address only for sockets it bound itself.
    logging.getLogger("tiercache.server").info(
        "listening on %s (press CTRL+C to quit)", ", ".join(listen_urls(sockets)))

    state = {"exit": 0, "server": None}

    def on_load_failed(exc: BaseException) -> None:
        state["exit"] = 1
        server = state["server"]
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, on_load_failed=on_load_failed)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level.lower(),
        access_log=False,
        # The worker answers every request within shutdown_timeout; uvicorn's own
        # deadline (which cancels handlers mid-response) only backs that up.
        timeout_graceful_shutdown=cfg.shutdown_timeout + _GRACE_MARGIN,
        lifespan="on",
    )
    server = _Server.build(config, on_signal=app.state.begin_shutdown)
    state["server"] = server
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    if not server.started and state["exit"] == 0:
        # uvicorn could not start (message already logged).
        state["exit"] = 1
    if hard_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(state["exit"])
    return state["exit"]


if __name__ == "__main__":
    sys.exit(main())

"""A server subprocess on 127.0.0.1, for the tests and the fault and load tools."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict:
    """Return the environment for a child Python: this checkout importable, no API key.

    Args:
        extra: Variables to add or override.
    """
    env = dict(os.environ)
    env.pop("TIERCACHE_API_KEY", None)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    """One server subprocess bound to 127.0.0.1 on a free port.

    Args:
        args: Server flags (``--model``, ``--disk-dir``...), without ``--host``/``--port``.
        log_path: Where stdout and stderr go (``None``: discarded).
        module: ``tiercache.server.cli`` or ``tiercache.server.mlx_lm_dropin``.
        env: Extra environment variables.
    """

    def __init__(self, args: Sequence[str], log_path: Path | None = None, *,
                 module: str = "tiercache.server.cli", env: Mapping[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = open(self.log_path if self.log_path is not None else os.devnull, "ab")
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=subprocess_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        """Return ``http://127.0.0.1:PORT`` (the same as :attr:`url`)."""
        return self.url

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.proc.pid

    def log(self) -> str:
        """Return everything the process printed so far (empty without a log file)."""
        if self.log_path is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> bool:
        """Wait for ``GET /health`` to answer 200.

        Returns:
            True once healthy; False if the process died or time ran out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def kill9(self) -> None:
        """Send SIGKILL: no shutdown path runs (crash tests)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` (SIGKILL if it hasn't exited after ``timeout``) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(args: Sequence[str], log_path: Path | None = None, *,
                 module: str = "tiercache.server.cli", env: Mapping[str, str] | None = None,
                 timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
    """Start a server and wait until it is healthy.

    Raises:
        RuntimeError: With the server's output, if it died or never got healthy.
    """
    srv = ServerProcess(args, log_path, module=module, env=env)
    if not srv.wait_healthy(timeout):
        code = srv.proc.poll()
        srv.stop(signal.SIGKILL)
        what = f"exited with {code}" if code is not None else f"not healthy after {timeout}s"
        raise RuntimeError(f"server {what}:\n{srv.log()}")
    return srv

"""Start and stop real server processes on 127.0.0.1 for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + old if old else "")
    env.pop("TIERCACHE_API_KEY", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class ServerProcess:
    """A server subprocess whose output goes to a log file.

    Args:
        module: ``server.cli`` or ``server.mlx_lm_dropin``.
        args: Command-line arguments (without ``--host``/``--port``).
        log_path: Where stdout and stderr go.
        env: Extra environment variables.
    """

    def __init__(self, module: str, args: Sequence[str], log_path: Path,
                 env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port),
               *args]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        """Return everything the process printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until ``GET /health`` answers 200 (fails if the process dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.base_url + "/health", timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status."""
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


def start_server(args: Sequence[str], log_path: Path, env: dict | None = None,
                 module: str = "tiercache.server.cli") -> ServerProcess:
    """Start a server and wait until it is healthy."""
    srv = ServerProcess(module, args, log_path, env)
    try:
        srv.wait_healthy()
    except Exception:
        srv.stop(signal.SIGKILL)
        raise
    return srv


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def disk_entries(base_url: str, headers: dict | None = None) -> int:
    """Entries on the disk tier according to ``/v1/cache/stats``."""
    stats = httpx.get(base_url + "/v1/cache/stats", headers=headers, timeout=10).json()
    disk = (stats.get("tiers") or {}).get("disk") or {}
    return int(disk.get("entries") or 0)


"""A real ``redis-server`` on a free loopback port, for the remote-tier tests.

The server keeps nothing on disk (``--save ""``, no AOF), so a stop and start
on the same port is a restarted, empty Redis, as after a crash or a failover.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_BIN = shutil.which("redis-server")
MISSING = (
    "redis-server is not installed (Debian: apt-get install -y redis-server; "
    ".ci/run installs it): the remote-tier tests need a real Redis"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1.

    Args:
        workdir: folder for its log (and nothing else: persistence is off).
        maxmemory: e.g. ``"64mb"``; eviction is ``allkeys-lru`` as the README advises.
    """

    def __init__(self, workdir: Path, maxmemory: str = "256mb"):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        """Starts the server and waits until it answers PING."""
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--maxmemory", self.maxmemory,
             "--maxmemory-policy", "allkeys-lru", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit {self.proc.poll()})")
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        """A plain client for the test to read, write and poison keys."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

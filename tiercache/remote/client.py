"""A fault-tolerant Redis/Valkey client for the remote tier.

Every call is bounded and never raises: a down, slow or restarted server is a
miss (lookups) or a dropped push (writes), counted. Two connection pools: lookups
run with a socket timeout of a few milliseconds (a stuck server never holds a
request longer), pushes (on a background thread) with a longer one. redis-py's
own retries are off: the :class:`CircuitBreaker` decides when to try again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("tiercache.remote")

URL_SCHEMES = ("redis", "rediss", "unix")

# Returns ``{index, value}`` of the first key that exists, in the order given, so
# a probe for the longest tail transfers one value, not every candidate's.
_FIRST_EXISTING = """
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v then return {i, v} end
end
return false
"""


def check_url(url: str) -> str:
    """Returns ``url`` if it is a Redis URL we accept.

    Raises:
        ValueError: for another scheme or a URL without a host or socket path.
    """
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"remote URL must start with redis://, rediss:// or unix://, not {url!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"unix:// remote URL needs a socket path: {url!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"remote URL has no host: {url!r}")
    return url


def redacted(url: str) -> str:
    """The URL without its password (for logs and stats)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class CircuitBreaker:
    """Stops calling a failing server for a while.

    ``closed``: calls go through. After ``failures`` consecutive failures it
    opens: calls are refused at once for ``cooldown`` seconds. Then it is
    ``half_open``: one trial call goes through; success closes it, failure opens
    it again with the cooldown doubled (up to ``max_cooldown``): the reconnect
    backoff.

    Args:
        failures: consecutive failures that open the breaker.
        cooldown: first open period, seconds.
        max_cooldown: longest open period, seconds.
        clock: monotonic clock (tests).
    """

    def __init__(self, failures: int = 3, cooldown: float = 1.0, max_cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        if failures < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("need failures >= 1 and 0 < cooldown <= max_cooldown")
        self.failures = failures
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._cooldown = cooldown
        self._open_until = 0.0
        self._state = "closed"
        self._trial = False
        self.opened = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        with self._lock:
            if self._state == "open" and self._clock() >= self._open_until:
                return "half_open"
            return self._state

    def allow(self) -> bool:
        """True if a call may go out now (claims the half-open trial)."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open" and self._clock() >= self._open_until:
                self._state, self._trial = "half_open", False
            if self._state == "half_open" and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._cooldown = self.base_cooldown
            self._state, self._trial = "closed", False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state == "half_open":
                self._cooldown = min(self._cooldown * 2, self.max_cooldown)
                self._open(self._cooldown)
            elif self._state == "closed" and self._consecutive >= self.failures:
                self._open(self._cooldown)

    def _open(self, seconds: float) -> None:
        self._state, self._trial = "open", False
        self._open_until = self._clock() + seconds
        self.opened += 1


class RemoteClient:
    """Bounded, breaker-guarded calls to one Redis/Valkey server.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path/to.sock``.
        timeout_ms: socket and connect timeout of lookups.
        write_timeout_ms: socket and connect timeout of pushes and scans.
        breaker: shared by lookups and pushes (a dead server is dead for both).
    """

    def __init__(self, url: str, *, timeout_ms: float = 50.0, write_timeout_ms: float = 2000.0,
                 breaker: CircuitBreaker | None = None):
        self.url = check_url(url)
        self.breaker = breaker or CircuitBreaker()
        self._read = self._make(timeout_ms / 1000.0)
        self._write = self._make(write_timeout_ms / 1000.0)
        self._first_existing = self._read.register_script(_FIRST_EXISTING)
        self._lock = threading.Lock()
        self.counters = {
            "calls": 0, "errors": 0, "timeouts": 0, "skipped": 0,
            "bytes_in": 0, "bytes_out": 0, "seconds": 0.0,
        }
        self._last_error_log = 0.0

    def _make(self, timeout: float) -> redis.Redis:
        return redis.Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )

    def _count(self, **deltas) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] += v

    def _call(self, fn: Callable[[], object], what: str):
        """Runs ``fn`` if the breaker allows; None when refused or failed."""
        if not self.breaker.allow():
            self._count(skipped=1)
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except (redis.RedisError, OSError) as e:
            self.breaker.failure()
            timeout = isinstance(e, (redis.TimeoutError, TimeoutError))
            self._count(calls=1, errors=1, timeouts=int(timeout), seconds=time.perf_counter() - t0)
            now = time.monotonic()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                log.warning("remote tier %s failed (%s: %s); serving from local tiers",
                            what, type(e).__name__, e)
            return None
        self.breaker.success()
        self._count(calls=1, seconds=time.perf_counter() - t0)
        return out

    def available(self) -> bool:
        """False while the breaker refuses calls (lookups skip the remote at once)."""
        return self.breaker.state != "open"

    def mget(self, keys: Sequence[str]) -> list | None:
        """Values of ``keys`` in one round trip (None per missing key); None on failure."""
        if not keys:
            return []
        out = self._call(lambda: self._read.mget(keys), "lookup")
        if out is not None:
            self._count(bytes_in=sum(len(v) for v in out if v is not None))
        return out

    def first_existing(self, keys: Sequence[str]) -> tuple[int, bytes] | None:
        """``(index, value)`` of the first key of ``keys`` that exists, in one round
        trip; None when none exists or on failure."""
        if not keys:
            return None
        out = self._call(lambda: self._first_existing(keys=list(keys)), "probe")
        if not out:
            return None
        i, value = out
        self._count(bytes_in=len(value))
        return int(i) - 1, value

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl: int | None) -> bool:
        """Stores values in one pipeline; ``ttl`` seconds each (None: no expiry)."""
        if not items:
            return True

        def run():
            pipe = self._write.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=ttl)
            return pipe.execute()

        ok = self._call(run, "push") is not None
        if ok:
            self._count(bytes_out=sum(len(v) for _, v in items))
        return ok

    def delete(self, keys: Sequence[str]) -> int:
        """Deletes keys (the CLI); how many existed."""
        out = self._call(lambda: self._write.delete(*keys), "delete") if keys else 0
        return int(out or 0)

    def scan(self, pattern: str, count: int = 1000):
        """Yields ``(key, value length, first header bytes)`` for every key matching
        ``pattern``, pipelining STRLEN and GETRANGE per SCAN page.

        Raises:
            redis.RedisError: the server can't be reached (the CLI reports it).
        """
        cursor = 0
        while True:
            cursor, keys = self._write.scan(cursor=cursor, match=pattern, count=count)
            if keys:
                pipe = self._write.pipeline(transaction=False)
                for k in keys:
                    pipe.strlen(k)
                    pipe.getrange(k, 0, 5)
                res = pipe.execute()
                for j, k in enumerate(keys):
                    yield k, int(res[2 * j]), res[2 * j + 1]
            if cursor == 0:
                return

    def ping(self) -> bool:
        return bool(self._call(lambda: self._read.ping(), "ping"))

    def close(self) -> None:
        for c in (self._read, self._write):
            try:
                c.close()
            except Exception:
                pass

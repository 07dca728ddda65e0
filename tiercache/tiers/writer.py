"""Background writer: persists snapshots without ever making the caller wait.

Thread safety with MLX: the writer thread never runs an MLX operation (MLX graph
evaluation is not meant to be driven from two threads at once). On the caller's
(generation) thread, :func:`tiercache.store.layers.to_host` evaluates every array and takes
zero-copy numpy views through *new* ``mx.array`` handles. The caller may keep
writing into its own cache: MLX slice assignment rebinds only the caller's handle
and copies the buffer because our handle still holds it, so the bytes the writer
reads never change under it. Reading an evaluated buffer through the buffer
protocol is plain memory access and is safe from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("tiercache.tiers.writer")


@dataclass(eq=False)  # identity: comparing snapshots (numpy views) is meaningless
class WriteJob:
    """One snapshot to persist."""

    namespace: bytes
    tokens: tuple
    snapshot: list
    salt: Any
    nbytes: int
    queued_at: float = field(default_factory=time.monotonic)


class BackgroundWriter:
    """A single thread draining a byte-bounded FIFO of :class:`WriteJob`.

    When a new job doesn't fit, the *oldest* pending jobs are dropped and counted:
    with prefix dedup the newest snapshot usually contains what the old ones held.

    Args:
        save: ``save(namespace, tokens, snapshot, salt)``, run on the writer thread.
        max_queue_bytes: bound on the bytes of pending snapshots.
        idle: called every ``idle_interval`` seconds when the queue is empty
            (flushing access times, for instance).
    """

    def __init__(
        self,
        save: Callable[[bytes, tuple, list, Any], Any],
        max_queue_bytes: int = 1 << 30,
        idle: Callable[[], None] | None = None,
        idle_interval: float = 2.0,
    ):
        self._save = save
        self._idle = idle
        self._idle_interval = idle_interval
        self.max_queue_bytes = max_queue_bytes
        self._queue: collections.deque[WriteJob] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._current: WriteJob | None = None  # the job being saved, still a lookup source
        self._stop = False
        self.queue_bytes = 0
        self.counters = {"submitted": 0, "written": 0, "dropped_writes": 0, "dropped_bytes": 0, "errors": 0}
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name="tiercache-writer", daemon=True)
        self._thread.start()

    def submit(self, job: WriteJob) -> bool:
        """Queues a job; never blocks. Returns False if the job itself was dropped."""
        with self._cond:
            if self._stop:
                return False
            self.counters["submitted"] += 1
            if job.nbytes > self.max_queue_bytes:
                self._count_drop(job)
                return False
            while self._queue and self.queue_bytes + job.nbytes > self.max_queue_bytes:
                self._drop_oldest()
            self._queue.append(job)
            self.queue_bytes += job.nbytes
            self._cond.notify()
            return True

    def _drop_oldest(self) -> None:
        """Drops the oldest pending job (lock held), releasing its bytes."""
        job = self._queue.popleft()
        self.queue_bytes -= job.nbytes
        self._count_drop(job)

    def _count_drop(self, job: WriteJob) -> None:
        self.counters["dropped_writes"] += 1
        self.counters["dropped_bytes"] += job.nbytes

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    if not self._cond.wait(self._idle_interval):
                        break
                if self._stop and not self._queue:
                    return
                job = self._queue.popleft() if self._queue else None
                if job is not None:
                    self.queue_bytes -= job.nbytes
                    self._busy = True
                    self._current = job
            if job is None:
                self._run_idle()
                continue
            try:
                self._save(job.namespace, job.tokens, job.snapshot, job.salt)
                self.counters["written"] += 1
            except Exception as e:  # a full disk must never stop the server
                self.counters["errors"] += 1
                now = time.monotonic()
                if now - self._last_error_log > 30:
                    self._last_error_log = now
                    log.warning("disk write failed (serving from memory): %s", e)
            finally:
                with self._cond:
                    # Only now, after the save committed (or failed), does the
                    # snapshot stop being a pending one: a lookup that misses it
                    # here finds it on disk.
                    self._busy = False
                    self._current = None
                    self._cond.notify_all()
            # Drop our views now: while they live, the snapshot's MLX buffers stay
            # shared and the caller's next in-place write would copy them whole.
            job = None

    def _run_idle(self) -> None:
        if self._idle is None:
            return
        try:
            self._idle()
        except Exception as e:
            log.debug("writer idle task failed: %s", e)

    def pending_jobs(self) -> list[WriteJob]:
        """The jobs not yet committed, newest first (the one being saved included)."""
        with self._cond:
            jobs = list(self._queue)
            if self._current is not None:
                jobs.insert(0, self._current)
        jobs.reverse()
        return jobs

    def pending_bytes(self) -> int:
        """Bytes of the snapshots not yet committed (queued and being saved)."""
        with self._cond:
            return self.queue_bytes + (self._current.nbytes if self._current is not None else 0)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued job is written. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 0.5))
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Drains within ``timeout``, then stops; what is left is dropped and counted."""
        done = self.flush(timeout)
        with self._cond:
            self._stop = True
            while self._queue:
                self._drop_oldest()
            self._cond.notify_all()
        self._thread.join(timeout=max(1.0, timeout or 1.0))
        return done and not self._thread.is_alive()

    def is_alive(self) -> bool:
        """True while the writer thread runs (after close: still inside a save)."""
        return self._thread.is_alive()

"""The single generation worker thread and its bounded request queue.

MLX state is single-threaded, so one thread loads the model and runs every
generation and cache operation. HTTP handlers submit :class:`Job` objects
and read their events from an ``asyncio.Queue``; control calls (cache reset)
jump the queue.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .engine import Engine, GenParams

logger = logging.getLogger("tiercache.server")

_ids = itertools.count(1)


class QueueFull(Exception):
    """The bounded request queue is full (HTTP 429)."""


class NotAccepting(Exception):
    """The worker is loading, failed, or shutting down (HTTP 503)."""


class Job:
    """One generation request travelling between HTTP and the worker.

    Args:
        params: What to generate.
        loop: The event loop whose handler awaits :attr:`events`.
    """

    def __init__(self, params: GenParams, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()  # set once the worker is done with it
        self.id = params.request_id or f"req-{next(_ids)}"
        params.request_id = self.id

    def emit(self, event: tuple) -> None:
        """Hand an event to the HTTP side (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is listening any more
            self._cancelled.set()

    def cancel(self) -> None:
        """Ask the worker to stop this job as soon as possible."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled."""
        return self._cancelled.is_set()


class Worker:
    """Loads the model then serves jobs on its own thread.

    Jobs run in one continuous batch (:mod:`server.batching`) when the model
    allows it and ``max_batch_size`` > 1, else one at a time.

    Args:
        engine: The engine the thread drives.
        max_queue: Jobs allowed to wait (excluding the running ones).
        on_load_failed: Called (from the worker thread) if loading fails.
        max_batch_size: Jobs allowed to run together.
    """

    def __init__(
        self,
        engine: Engine,
        max_queue: int,
        on_load_failed: Callable[[BaseException], None] | None = None,
        max_batch_size: int = 1,
    ):
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.on_load_failed = on_load_failed
        self.state = "loading"
        self.load_error: str | None = None
        self._jobs: collections.deque[Job] = collections.deque()
        self._control: collections.deque[tuple] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="tiercache-worker", daemon=True)

    # ------------------------------------------------------------- public
    def start(self) -> None:
        """Start the worker thread (it loads the model first)."""
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and jobs are accepted."""
        return self.state == "ready" and not self._stopping

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, not counting the running ones."""
        return len(self._jobs)

    @property
    def running(self) -> int:
        """Jobs running (the current batch size)."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return bool(self._running)

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            NotAccepting: While loading, after a failed load or when stopping.
            QueueFull: When ``max_queue`` jobs are already waiting.
        """
        with self._cond:
            if not self.ready:
                raise NotAccepting(self._why_not())
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._jobs)} requests are queued")
            self._jobs.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread before the next queued job.

        Raises:
            NotAccepting: If the worker is not ready.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.ready:
                raise NotAccepting(self._why_not())
            self._control.append((fn, fut))
            self._cond.notify()
        return fut

    def begin_shutdown(self, timeout: float) -> None:
        """Stop accepting, fail queued jobs now, bound the running ones. Returns at once.

        Queued jobs get a :class:`NotAccepting` error event (HTTP 503). The running
        jobs (the whole batch) may finish within ``timeout`` seconds; then each
        one still running gets the same error event, first, so its client is
        answered even if the generation step under way takes a while to notice
        the cancel that follows.

        Args:
            timeout: Seconds the running jobs may still take.
        """
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            controls = list(self._control)
            self._control.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in pending:
            job.cancel()
            job.emit(("error", NotAccepting("the server is shutting down")))
        for _, fut in controls:
            fut.set_exception(NotAccepting("the server is shutting down"))
        if running:
            threading.Thread(target=self._deadline, args=(running, timeout),
                             name="tiercache-shutdown", daemon=True).start()

    @staticmethod
    def _deadline(jobs: list[Job], timeout: float) -> None:
        end = time.monotonic() + timeout
        late = [job for job in jobs if not job.finished.wait(max(0.0, end - time.monotonic()))]
        for job in late:
            logger.warning("shutdown: cancelling request %s after %.1fs", job.id, timeout)
            job.emit(("error",
                      NotAccepting("the server is shutting down: the request was cancelled")))
            job.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, cancel queued and running jobs, join the thread.

        Args:
            timeout: Seconds to wait for the running job to wind down.
        """
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            self._jobs.clear()
            controls = list(self._control)
            self._control.clear()
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        for job in pending:
            job.cancel()
            job.emit(("error", NotAccepting("the server is shutting down")))
        for _, fut in controls:
            fut.set_exception(NotAccepting("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ private
    def _why_not(self) -> str:
        if self._stopping:
            return "the server is shutting down"
        if self.state == "failed":
            return f"the model failed to load: {self.load_error}"
        return "the model is still loading"

    def _run(self) -> None:
        try:
            self.engine.load()
        except BaseException as exc:  # report and stay alive for /health
            self.state = "failed"
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("model failed to load: %s", self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed(exc)
            return
        self.state = "ready"
        from .batching import make_scheduler

        scheduler = make_scheduler(self.engine, self.max_batch_size)
        if scheduler is not None:
            scheduler.run(self)
        else:
            self._serve_one_at_a_time()
        self.state = "stopped"

    def _serve_one_at_a_time(self) -> None:
        while True:
            item = self.take(wait=True)
            if item is None or item[0] == "stop":
                break
            if item[0] == "control":
                self.run_control(item[1])
                continue
            self.serve_alone(item[1])

    def take(self, wait: bool, job: bool = True) -> tuple[str, Any] | None:
        """Pop the next control call or job (worker thread).

        Control calls come first. A popped job counts as running until
        :meth:`finished` is called for it.

        Args:
            wait: Block until there is something (or the worker stops).
            job: Whether a job may be popped (False: control calls only).

        Returns:
            ``("stop", None)``, ``("control", (fn, future))``, ``("job", job)``
            or ``None`` when nothing is waiting and ``wait`` is False.
        """
        with self._cond:
            while wait and not self._stopping and not self._control and not (
                    job and self._jobs):
                self._cond.wait()
            if self._stopping:
                return ("stop", None)
            if self._control:
                return ("control", self._control.popleft())
            if job and self._jobs:
                popped = self._jobs.popleft()
                self._running.append(popped)
                return ("job", popped)
            return None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping

    def finished(self, job: Job) -> None:
        """Mark a job popped by :meth:`take` as no longer running."""
        with self._cond:
            if job in self._running:
                self._running.remove(job)
        job.finished.set()

    @staticmethod
    def run_control(payload: tuple) -> None:
        """Run one control call popped by :meth:`take`."""
        fn, fut = payload
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def serve_alone(self, job: Job) -> None:
        """Serve one job through :meth:`Engine.generate`, then mark it finished."""
        try:
            if not job.cancelled:
                self.engine.generate(job.params, job.emit, lambda j=job: j.cancelled)
            else:
                job.emit(("error", NotAccepting("request cancelled")))
        except Exception as exc:
            logger.exception("generation failed for %s", job.id)
            job.emit(("error", exc))
        finally:
            self.finished(job)

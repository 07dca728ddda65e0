"""Continuous batching on the worker thread, on mlx-lm's ``BatchGenerator``.

Between two steps of the batch the scheduler runs control calls and admits
queued jobs (up to ``--max-batch-size`` running at once). Each admitted job
gets its own prompt cache from the tiered cache and joins the generator with
the tokens that cache does not hold; the generator prefills those in bounded
steps (``--prefill-step-size`` tokens) interleaved with one decode step of the
running requests, as ``mlx_lm.server`` does. Every generated token goes to the
job's :class:`server.output.RequestOutput`. When a job finishes or is
cancelled its cache leaves the batch and is inserted into the tiered cache
under exactly the tokens it holds, before any further job is admitted (so a
follow-up request sees it).

Models whose cache layers mlx-lm cannot batch, and models with non-trimmable
layers (their prompts are prefilled with checkpoints at exact chunk
boundaries, see ``tiercache.tiers.checkpoints``), keep the sequential path.
So does a job that must run alone (a seeded sampler: the random state is
shared by the batch; logits processors, for penalties and ``logit_bias``,
when the installed mlx-lm cannot give each batch row its own); the batch
drains first. Both paths build samplers and processors with
:func:`server.engine.make_token_sampler` and
:func:`server.engine.make_token_processors`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .output import RequestOutput

if TYPE_CHECKING:
    from .engine import Engine, GenParams

logger = logging.getLogger("tiercache.server")

PREFILL_BATCH_SIZE = 8
"""Prompts prefilled together at most (``mlx_lm.server --prompt-concurrency``)."""


def batching_unavailable(engine: Engine) -> str | None:
    """Say why the loaded model's requests cannot share a batch, if they can't.

    Args:
        engine: An engine whose model is loaded.

    Returns:
        A short reason, or ``None`` when the model can be batched.
    """
    from mlx_lm.models.cache import make_prompt_cache

    layers = make_prompt_cache(engine.model)
    unmergeable = sorted({type(c).__name__ for c in layers if not hasattr(c, "merge")})
    if unmergeable:
        return f"mlx-lm cannot batch its cache layers ({', '.join(unmergeable)})"
    if not engine.trimmable:
        return ("its cache layers are not trimmable, so prompts are prefilled with "
                "checkpoints at exact chunk boundaries, one request at a time")
    return None


def make_scheduler(engine: Engine, max_batch_size: int) -> BatchScheduler | None:
    """Return a batch scheduler, or ``None`` (with a log line) for the sequential path.

    Args:
        engine: An engine whose model is loaded.
        max_batch_size: Requests allowed to run together.
    """
    if max_batch_size <= 1:
        logger.info("continuous batching off (--max-batch-size %d): one request at a time",
                    max_batch_size)
        return None
    why = batching_unavailable(engine)
    if why is not None:
        logger.info("continuous batching off for this model: %s", why)
        return None
    logger.info("continuous batching on: up to %d requests per batch", max_batch_size)
    return BatchScheduler(engine, max_batch_size)


def per_row_processors() -> bool:
    """Whether mlx-lm's ``BatchGenerator`` takes logits processors per request."""
    import inspect

    from mlx_lm.generate import BatchGenerator

    return "logits_processors" in inspect.signature(BatchGenerator.insert).parameters


def runs_alone(p: GenParams) -> bool:
    """Whether a request must not share a batch.

    A seeded random sampler needs the random state to itself; logits
    processors need per-request support in mlx-lm's ``BatchGenerator``.
    """
    from .engine import make_token_processors

    if p.seed is not None and p.temperature > 0:
        return True
    return bool(make_token_processors(p)) and not per_row_processors()


@dataclass
class _Running:
    """A job in the batch: its generator uid and its output."""

    job: Any  # a server.worker.Job (not imported: the worker imports this module)
    uid: int
    output: RequestOutput


class BatchScheduler:
    """Runs queued jobs in one continuous batch on the worker thread.

    Args:
        engine: The loaded engine.
        max_batch_size: Requests allowed to run together.
    """

    def __init__(self, engine: Engine, max_batch_size: int):
        from mlx_lm.generate import make_stop_sequences

        self.engine = engine
        self.max_batch_size = max_batch_size
        self.running: dict[int, _Running] = {}
        self.alone: Any = None  # a server.worker.Job that must run alone
        self.worker: Any = None  # the server.worker.Worker being served
        self.generator: Any = None
        # The generator finishes a row on an end-of-sequence token by itself.
        self._eos = make_stop_sequences(engine.tokenizer)

    # ------------------------------------------------------------ the loop
    def run(self, worker: Any) -> None:
        """Serve jobs from ``worker`` until it stops and the batch is empty."""
        self.worker = worker
        self.generator = self._new_generator()
        try:
            while self._admit():
                self._leave_cancelled()
                if self.running:
                    self._step()
        finally:
            self.generator.close()

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            self.engine.model,
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=min(PREFILL_BATCH_SIZE, self.max_batch_size),
            prefill_step_size=self.engine.cfg.prefill_step_size,
        )

    def _admit(self) -> bool:
        """Run control calls and admit waiting jobs; block while idle.

        Returns:
            False once the worker stops and nothing is left running.
        """
        worker = self.worker
        while True:
            if not self.running and self.alone is not None:
                job, self.alone = self.alone, None
                worker.serve_alone(job)
                continue
            room = self.alone is None and len(self.running) < self.max_batch_size
            item = worker.take(wait=not self.running, job=room)
            if item is None:
                return True
            kind, payload = item
            if kind == "stop":
                if self.alone is not None:  # cancelled by stop(): answers an error
                    job, self.alone = self.alone, None
                    worker.serve_alone(job)
                return bool(self.running)
            if kind == "control":
                worker.run_control(payload)
            elif runs_alone(payload.params):
                self.alone = payload
            else:
                self._join(payload)

    def _join(self, job: Any) -> None:
        """Fetch a job's prompt cache and insert the job into the generator."""
        from mlx_lm.models.cache import make_prompt_cache

        from .engine import make_token_processors, make_token_sampler
        if job.cancelled:
            self.worker.serve_alone(job)  # answers the cancelled job and releases it
            return
        engine, p = self.engine, job.params
        try:
            output = engine.new_output(p, job.emit)
            fetched = engine.fetch(p)
            output.start(fetched)
            cache = fetched.prompt_cache
            if cache is None:
                cache = make_prompt_cache(engine.model)
            extra = {}
            processors = make_token_processors(p)
            if processors:  # runs_alone() sent it down the sequential path otherwise
                extra["logits_processors"] = [processors]
            (uid,) = self.generator.insert(
                [fetched.rest],
                max_tokens=[p.max_tokens],
                caches=[cache],
                all_tokens=[list(p.tokens[:fetched.cached])],
                samplers=[make_token_sampler(p)],
                stop_sequences=[self._eos],
                **extra,
            )
        except Exception as exc:
            logger.exception("could not start %s", job.id)
            job.emit(("error", exc))
            self.worker.finished(job)
            return
        self.running[uid] = _Running(job, uid, output)

    def _step(self) -> None:
        """Run one generator step (a decode step and/or a prefill chunk)."""
        try:
            _, generated = self.generator.next()
        except Exception as exc:
            logger.exception("batch step failed; failing its %d requests", len(self.running))
            self._fail_all(exc)
            return
        metrics = self.engine.metrics
        if generated and metrics is not None:
            metrics.batch_size.observe(len(generated))
        for r in generated:
            run = self.running.get(r.uid)
            if run is None:
                continue
            done = run.output.feed(r.token)
            if r.finish_reason is not None:  # the generator already dropped the row
                self._end(run, r.prompt_cache, r.all_tokens, None)
            elif done:
                self._leave(run, None)

    # -------------------------------------------------------- leaving
    def _leave_cancelled(self) -> None:
        for run in [r for r in self.running.values() if r.job.cancelled]:
            self._leave(run, "cancelled")

    def _leave(self, run: _Running, reason: str | None) -> None:
        """Take a job's cache out of the generator and end the job."""
        try:
            caches = self.generator.remove([run.uid], return_prompt_caches=True)
        except Exception:  # the job still ends; only its cache is lost
            logger.exception("could not extract the cache of %s", run.job.id)
            caches = {}
        cache, tokens = caches.get(run.uid, (None, None))
        self._end(run, cache, tokens, reason)

    def _end(self, run: _Running, cache: list | None, tokens: list[int] | None,
             reason: str | None) -> None:
        """Finish a job's output, insert what it computed and release the job."""
        self.running.pop(run.uid, None)
        try:
            run.output.finish(reason)
            fetched = run.output.fetched
            # ``tokens`` is exactly what ``cache`` holds; a job cancelled before
            # its prefill started holds nothing new.
            if cache is not None and tokens and len(tokens) > fetched.cached:
                self.engine.insert_computed(list(tokens), cache, run.job.params.salt)
        finally:
            self.worker.finished(run.job)

    def _fail_all(self, exc: Exception) -> None:
        """Fail every running job and start over with a fresh generator."""
        for run in list(self.running.values()):
            run.job.emit(("error", exc))
            self.worker.finished(run.job)
        self.running.clear()
        self.generator.close()
        self.generator = self._new_generator()

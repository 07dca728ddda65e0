"""When to restore a prefix from disk instead of computing it: a cost model.

A lookup may find a short prefix in memory and a longer one on disk. A disk
restore reads the whole stored prefix (its block files, not only the part
memory lacks); the alternative computes the tokens memory lacks. The disk wins
when its read is expected to take less time::

    disk_bytes / disk_bytes_per_second  <  (disk_tokens - memory_tokens) / prefill_tokens_per_second

When memory holds nothing, any disk hit is taken (nothing in memory to keep).

Both rates are running averages: total amount over total seconds, where each
observation first discounts the older evidence by ``exp(-seconds / horizon)``,
so the rates follow roughly the last ``horizon`` seconds spent restoring or
prefilling. They start from defaults worth :data:`SEED_SECONDS` of evidence,
so a few tiny (overhead-dominated) observations don't swing them. Restores feed
the disk rate themselves (:class:`tiercache.tiers.tiered.TieredPromptCache`);
prefill timings come from whoever runs the model, through
:meth:`PromotionCostModel.observe_prefill` (the server does after each request).
"""

from __future__ import annotations

import math
import threading

DEFAULT_DISK_BYTES_PER_SECOND = 500e6
"""Below any SSD's sequential read, and half of a cold-page-cache restore on
this project's slow VM (1.0 GB/s): a conservative start."""

DEFAULT_PREFILL_TOKENS_PER_SECOND = 1000.0
"""A 7-8B model on Apple Silicon prefills a few hundred to ~1000 tokens/s;
small models are faster, and the server measures the real rate from its first requests."""

SEED_SECONDS = 1.0
"""How much evidence (seconds of restoring or prefilling) a default counts as."""

HORIZON_SECONDS = 60.0
"""Seconds of observed work after which old evidence weighs ``1/e``."""

MIN_PREFILL_TOKENS = 32
"""Shorter prefills are ignored: they time one model step's fixed cost (an exact
hit leaves one token, fed with the first decode step), not the prefill rate."""


class RunningRate:
    """A rate (amount per second) averaged over recent observed seconds.

    Args:
        seed_rate: The rate before any observation (> 0).
        seed_seconds: How many seconds of evidence the seed counts as.
        horizon: Seconds of observed work after which old evidence weighs ``1/e``.
    """

    def __init__(self, seed_rate: float, seed_seconds: float = SEED_SECONDS,
                 horizon: float = HORIZON_SECONDS):
        if seed_rate <= 0 or seed_seconds <= 0 or horizon <= 0:
            raise ValueError("seed_rate, seed_seconds and horizon must be > 0")
        self.horizon = horizon
        self.seed_seconds = seed_seconds
        self._amount = seed_rate * seed_seconds
        self._seconds = seed_seconds

    @property
    def value(self) -> float:
        """Return the current rate (amount per second)."""
        return self._amount / self._seconds

    def reset(self, rate: float) -> None:
        """Forget all evidence and restart from ``rate`` (worth ``seed_seconds``)."""
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"a rate must be a positive number, not {rate!r}")
        self._amount, self._seconds = rate * self.seed_seconds, self.seed_seconds

    def observe(self, amount: float, seconds: float) -> None:
        """Add one observation: ``amount`` done in ``seconds``; nonsense is ignored."""
        if not (amount > 0 and seconds > 0 and math.isfinite(amount) and math.isfinite(seconds)):
            return
        keep = math.exp(-seconds / self.horizon)
        self._amount = self._amount * keep + amount
        self._seconds = self._seconds * keep + seconds


class PromotionCostModel:
    """Decide whether a longer disk prefix beats a shorter memory one.

    Thread-safe: restores may be observed on a prewarm thread while the
    generation thread decides.

    Args:
        disk_bytes_per_second: Starting disk restore rate.
        prefill_tokens_per_second: Starting prefill rate.
    """

    def __init__(self, disk_bytes_per_second: float = DEFAULT_DISK_BYTES_PER_SECOND,
                 prefill_tokens_per_second: float = DEFAULT_PREFILL_TOKENS_PER_SECOND):
        self._lock = threading.Lock()
        self._disk = RunningRate(disk_bytes_per_second)
        self._prefill = RunningRate(prefill_tokens_per_second)

    @property
    def disk_bytes_per_second(self) -> float:
        """Return the current disk restore rate estimate."""
        with self._lock:
            return self._disk.value

    @property
    def prefill_tokens_per_second(self) -> float:
        """Return the current prefill rate estimate."""
        with self._lock:
            return self._prefill.value

    def set_rates(self, *, disk_bytes_per_second: float | None = None,
                  prefill_tokens_per_second: float | None = None) -> None:
        """Replace the estimates (e.g. from a benchmark), forgetting what was observed.

        Raises:
            ValueError: A rate is not a positive number.
        """
        with self._lock:
            if disk_bytes_per_second is not None:
                self._disk.reset(disk_bytes_per_second)
            if prefill_tokens_per_second is not None:
                self._prefill.reset(prefill_tokens_per_second)

    def observe_restore(self, nbytes: int, seconds: float) -> None:
        """Record a disk restore of ``nbytes`` that took ``seconds``."""
        with self._lock:
            self._disk.observe(nbytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Record a prefill of ``tokens`` tokens that took ``seconds``.

        Prefills of fewer than :data:`MIN_PREFILL_TOKENS` tokens are ignored.
        """
        if tokens < MIN_PREFILL_TOKENS:
            return
        with self._lock:
            self._prefill.observe(tokens, seconds)

    def restore_seconds(self, nbytes: int) -> float:
        """Return the expected time to restore ``nbytes`` from disk."""
        return nbytes / self.disk_bytes_per_second

    def compute_seconds(self, tokens: int) -> float:
        """Return the expected time to prefill ``tokens`` tokens."""
        return tokens / self.prefill_tokens_per_second

    def prefer_disk(self, memory_tokens: int, disk_tokens: int, disk_bytes: int) -> bool:
        """Whether to restore the disk prefix rather than use the memory one.

        Args:
            memory_tokens: Tokens the memory tier offers (0: none).
            disk_tokens: Tokens the disk prefix restores.
            disk_bytes: Bytes a restore of the disk prefix reads (all its files).

        Returns:
            True when the disk prefix is longer and, if memory offers anything,
            reading it is expected to be faster than computing the difference.
        """
        if disk_tokens <= memory_tokens:
            return False
        if memory_tokens == 0:
            return True
        return self.restore_seconds(disk_bytes) < self.compute_seconds(disk_tokens - memory_tokens)

    def snapshot(self) -> dict:
        """Return the current estimates (for stats)."""
        return {"disk_bytes_per_second": round(self.disk_bytes_per_second),
                "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 1)}

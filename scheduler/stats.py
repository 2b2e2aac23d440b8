"""Per-model statistics, kept cheaply on the hot path.

Recording is a few integer additions and one store into a ring buffer; the
percentiles are only computed when a snapshot asks for them.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np

WINDOW = 2048  # latencies kept for percentiles (the most recent ones)
RATE_WINDOW_S = 10.0  # throughput_rps / error_rps: answers per second over about this long
SAMPLE_EVERY_S = 0.5  # the counters are sampled at most this often (each tick and each snapshot)


class AnswerRates:
    """Answered and failed requests per second over the last ``RATE_WINDOW_S``, from counter
    samples: what an operator reads as "req/s" (the eviction policy's slow EWMA is another thing).

    Samples are (time, answered, failed) taken off the hot path; a rate is the counters' growth
    since the newest sample at least ``window`` old (or the oldest one, early on) divided by the
    time between.  ``now`` is a monotonic time, passed in so a test can drive the clock."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=int(4 * window / SAMPLE_EVERY_S) + 2)

    def sample(self, now: float, answered: int, failed: int) -> None:
        if not self._samples or now - self._samples[-1][0] >= SAMPLE_EVERY_S:
            self._samples.append((now, answered, failed))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()  # the second sample is old enough to be the base: drop the first

    def rates(self, now: float, answered: int, failed: int) -> tuple[float, float]:
        """(answered per second, failed per second) as of the newest sample (taken now when the
        last is ``SAMPLE_EVERY_S`` old): the figure holds still between samples, so two reads a
        moment apart agree (an ETag over /v1/models stays put); zeros before any span."""
        self.sample(now, answered, failed)
        t0, a0, f0 = self._samples[0]
        t1, a1, f1 = self._samples[-1]
        span = t1 - t0
        if span < SAMPLE_EVERY_S:
            return 0.0, 0.0
        return max(0, a1 - a0) / span, max(0, f1 - f0) / span


class ModelStats:
    def __init__(self) -> None:
        self.success = 0
        self.failures: Counter[str] = Counter()  # error kind -> count
        self.inference_count = 0  # samples run on the device
        self.execution_count = 0  # batches run on the device
        self.queue_ns = 0
        self.compute_ns = 0
        self.batch_sizes: Counter[int] = Counter()
        self.last_inference = 0.0
        self.cache_hits = 0
        self.cache_misses = 0
        self._lat = np.zeros(WINDOW, dtype=np.float64)  # seconds
        self._lat_n = 0
        self._pcts: tuple[int, dict[str, float | None]] = (0, {"p50": None, "p95": None, "p99": None})
        self.request_ns = 0  # summed end-to-end time of the successful requests (Triton's "success" duration)
        self.answers = AnswerRates()

    def sample_rates(self, now: float | None = None) -> tuple[float, float]:
        """(throughput_rps, error_rps) now: answers (success and failure) and failures per second."""
        failed = sum(self.failures.values())
        return self.answers.rates(time.monotonic() if now is None else now, self.success + failed, failed)

    def record_latency(self, seconds: float) -> None:
        self.request_ns += int(seconds * 1e9)
        self._lat[self._lat_n % WINDOW] = seconds
        self._lat_n += 1

    def record_batch(self, samples: int, queue_ns: int, compute_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += samples
        self.batch_sizes[samples] += 1
        self.queue_ns += queue_ns
        self.compute_ns += compute_ns
        self.last_inference = time.time()

    def fail(self, kind: str, n: int = 1) -> None:
        self.failures[kind] += n

    def latency_ms(self) -> dict[str, float | None]:
        """p50/p95/p99 over the last WINDOW requests, recomputed only when a request was recorded
        since the last call (every snapshot asks for every model's: an idle model costs nothing)."""
        seen, pcts = self._pcts
        if seen != self._lat_n:
            n = min(self._lat_n, WINDOW)
            p = np.percentile(self._lat[:n], [50, 95, 99]) * 1000.0
            pcts = {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}
            self._pcts = (self._lat_n, pcts)
        return dict(pcts)

    def to_dict(self) -> dict[str, Any]:
        throughput, errors = self.sample_rates()
        return {
            "throughput_rps": throughput,
            "error_rps": errors,
            "success": self.success,
            "fail": sum(self.failures.values()),
            "failures": dict(self.failures),
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "request_ms_total": self.request_ns / 1e6,
            "queue_ms_total": self.queue_ns / 1e6,
            "compute_ms_total": self.compute_ns / 1e6,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "last_inference": self.last_inference or None,
            "latency_ms": self.latency_ms(),
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }

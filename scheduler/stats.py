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

# Latency histograms that add up across processes (a fleet's nodes): bucket i holds latencies in
# [LAT_MIN_S * LAT_RATIO**i, LAT_MIN_S * LAT_RATIO**(i+1)); a percentile read from one is within
# half a bucket (about 4.5 %) of the exact one.
LAT_MIN_S = 1e-6
LAT_RATIO = 2 ** (1 / 8)
LAT_BUCKETS = 8 * 30  # 1 us .. about 18 minutes; slower or faster latencies land in the end buckets


def latency_hist(seconds: np.ndarray) -> dict[int, int]:
    """The sparse histogram (bucket -> count) of these latencies: what each node reports so the
    fleet's percentiles are computed over every node's requests (``hist_percentiles``)."""
    if not len(seconds):
        return {}
    idx = np.floor(np.log(np.maximum(seconds, LAT_MIN_S) / LAT_MIN_S) / np.log(LAT_RATIO)).astype(np.int64)
    buckets, counts = np.unique(np.clip(idx, 0, LAT_BUCKETS - 1), return_counts=True)
    return {int(b): int(c) for b, c in zip(buckets, counts)}


def merge_hists(hists: list[dict[int, int]]) -> dict[int, int]:
    out: Counter[int] = Counter()
    for h in hists:
        out.update({int(k): int(v) for k, v in h.items()})  # JSON made the keys strings on the way
    return dict(out)


def hist_percentiles(hist: dict[int, int]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds from a histogram (``latency_hist``): the geometric middle of
    the bucket the percentile falls in; all None for an empty one."""
    total = sum(hist.values())
    if not total:
        return {"p50": None, "p95": None, "p99": None}
    buckets = sorted(hist)
    cum = np.cumsum([hist[b] for b in buckets])
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        b = buckets[int(np.searchsorted(cum, q * total, side="left"))]
        out[name] = LAT_MIN_S * LAT_RATIO ** (b + 0.5) * 1000.0
    return out


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
        self._hist: tuple[int, dict[int, int]] = (0, {})
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

    def latency_hist(self) -> dict[int, int]:
        """The last WINDOW latencies as a histogram that adds up across nodes (a fleet's merged
        percentiles), recomputed only when a request was recorded since the last call."""
        seen, hist = self._hist
        if seen != self._lat_n:
            hist = latency_hist(self._lat[:min(self._lat_n, WINDOW)])
            self._hist = (self._lat_n, hist)
        return hist

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

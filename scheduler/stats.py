"""Per-model statistics, kept cheaply on the hot path.

Recording is a few integer additions and one store into a ring buffer; the
percentiles are only computed when a snapshot asks for them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

WINDOW = 2048  # latencies kept for percentiles (the most recent ones)


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
        return {
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

"""A model's request queue: priority levels, bounded size, deadlines, batch formation.

Levels 1..N, 1 most urgent, FIFO within a level.  ``take_batch`` forms the
next batch the way Triton's dynamic batcher does: highest level first, oldest
first, up to ``max_batch_size`` samples; requests whose deadline has passed
are removed and answered with a deadline error instead of being run.
Requests whose non-batch dimensions differ from the batch's first request
wait for a later batch (grouping), so a concatenated batch is always valid.

This module is pure bookkeeping on the event loop: no torch calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class Request:
    """One inference request waiting for (or inside) a batch."""

    __slots__ = ("tensors", "size", "future", "level", "deadline", "enqueued", "group", "outputs", "cache_key",
                 "metric", "metric_mean")

    def __init__(
        self, tensors: list[Any], size: int, future: Any, level: int, deadline: float, enqueued: float,
        group: Any, outputs: tuple[str, ...] | None = None,
    ):
        self.tensors = tensors
        self.size = size  # samples along dim 0 (1 without batching)
        self.future = future
        self.level = level
        self.deadline = deadline
        self.enqueued = enqueued
        self.group = group  # non-batch shapes when they can vary, else None
        self.outputs = outputs  # the outputs the caller asked for (None: all)
        self.cache_key: bytes | None = None
        self.metric: str | None = None  # an output whose mean a split's arm tracks (the worker computes it)
        self.metric_mean: float | None = None


class RequestQueue:
    def __init__(self, levels: int, max_size: int):
        self._levels: list[deque[Request]] = [deque() for _ in range(levels)]
        self.max_size = max_size
        self.size = 0  # requests queued
        self.samples = 0  # samples queued (a request may carry several)
        self.earliest_deadline = float("inf")

    def __len__(self) -> int:
        return self.size

    def full(self) -> bool:
        return self.size >= self.max_size

    def push(self, req: Request) -> None:
        self._levels[req.level - 1].append(req)
        self.size += 1
        self.samples += req.size
        if req.deadline < self.earliest_deadline:
            self.earliest_deadline = req.deadline

    def oldest_enqueued(self) -> float:
        """When the request that would lead the next batch was queued."""
        for level in self._levels:
            if level:
                return level[0].enqueued
        return float("inf")

    def take_batch(self, max_samples: int, now: float, expire: Callable[[Request], None]) -> list[Request]:
        """Remove and return the next batch; expired requests go to expire()."""
        batch: list[Request] = []
        samples = 0
        group = None
        for level in self._levels:
            if not level:
                continue
            skipped: list[Request] = []
            while level and samples < max_samples:
                req = level.popleft()
                if req.deadline <= now:
                    self.size -= 1
                    self.samples -= req.size
                    expire(req)
                    continue
                if batch and (req.group != group or samples + req.size > max_samples):
                    # a different shape group, or too big for what is left: next batch
                    skipped.append(req)
                    if samples + req.size > max_samples and req.group == group:
                        break
                    continue
                if not batch:
                    group = req.group
                batch.append(req)
                samples += req.size
                self.size -= 1
                self.samples -= req.size
            if skipped:
                level.extendleft(reversed(skipped))
            if samples >= max_samples:
                break
        if self.size == 0:
            self.earliest_deadline = float("inf")
        return batch

    def expire(self, now: float, expire: Callable[[Request], None]) -> float:
        """Answer every request whose deadline passed; return the next deadline."""
        earliest = float("inf")
        for level in self._levels:
            if not level:
                continue
            keep = deque()
            for req in level:
                if req.deadline <= now:
                    self.size -= 1
                    self.samples -= req.size
                    expire(req)
                else:
                    keep.append(req)
                    if req.deadline < earliest:
                        earliest = req.deadline
            level.clear()
            level.extend(keep)
        self.earliest_deadline = earliest
        return earliest

    def drain(self) -> list[Request]:
        """Remove and return everything queued (used when a model goes away)."""
        out: list[Request] = []
        for level in self._levels:
            out.extend(level)
            level.clear()
        self.size = 0
        self.samples = 0
        self.earliest_deadline = float("inf")
        return out

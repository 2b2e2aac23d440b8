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
    """One inference request waiting for (or inside) a batch, or a run of requests (rows).

    A front end's chunk (``Engine.submit_rows``) is queued as ONE entry: its
    requests' rows stacked in ``tensors``, ``parts`` the row count of each
    request and ``ids`` their places in the chunk.  It is answered as one
    (``future``), and counts as ``count`` requests wherever requests are
    counted (the queue's bound, in-flight, statistics)."""

    __slots__ = ("tensors", "size", "future", "level", "deadline", "enqueued", "group", "outputs", "cache_key",
                 "metric", "metric_mean", "parts", "ids", "cache_keys", "count")

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
        self.parts: list[int] | None = None  # rows of each request of a chunk (None: one request)
        self.ids: list[int] | None = None  # with parts: each request's place in its chunk
        self.cache_keys: list[bytes] | None = None  # with parts: each request's cache key
        self.count = 1  # requests this entry answers

    def rows_of(self, first: int, end: int) -> Request:
        """The requests ``first``..``end - 1`` of a chunk as an entry of their own (views, no copy)."""
        parts = self.parts
        assert parts is not None and self.ids is not None
        start = sum(parts[:first])
        stop = start + sum(parts[first:end])
        piece = Request([t[start:stop] for t in self.tensors], stop - start, None, self.level, self.deadline,
                        self.enqueued, self.group, self.outputs)
        piece.parts = parts[first:end]
        piece.ids = self.ids[first:end]
        piece.cache_keys = self.cache_keys[first:end] if self.cache_keys is not None else None
        piece.count = end - first
        return piece


class RequestQueue:
    def __init__(self, levels: int, max_size: int):
        self._levels: list[deque[Request]] = [deque() for _ in range(levels)]
        self.max_size = max_size
        self.size = 0  # requests queued (a chunk counts as its requests)
        self.samples = 0  # samples queued (a request may carry several)
        self.earliest_deadline = float("inf")

    def __len__(self) -> int:
        return self.size  # requests: a chunk counts each of its requests

    def full(self) -> bool:
        return self.size >= self.max_size

    def push(self, req: Request) -> None:
        self._levels[req.level - 1].append(req)
        self.size += req.count
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
                    self.size -= req.count
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
                self.size -= req.count
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
            keep: deque[Request] = deque()
            for req in level:
                if req.deadline <= now:
                    self.size -= req.count
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

"""A batch's pieces: the helpers that cut a batch's outputs back into its requests' rows,
cache each row under its own key, and take an arm's metric means on the worker thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cache import ResultCache
from .queueing import Request
from .tensors import output_mean


def cache_rows(cache: ResultCache, req: Request, outs: dict[str, Any], owner: tuple[str, str]) -> None:
    """Store each request of a chunk under its own key: its rows of the chunk's outputs."""
    assert req.parts is not None and req.cache_keys is not None
    start = 0
    for key, rows in zip(req.cache_keys, req.parts):
        cache.put(key, {o: v[start:start + rows] for o, v in outs.items()}, owner)
        start += rows


def concat_objects(parts: list[Any]) -> Any:
    return np.concatenate(parts)


def metric_means(batch: list[Request], per_request: list[dict[str, Any]]) -> None:
    """For each request of a split's arm that tracks an output: that output's mean, here on the
    worker thread rather than on the event loop (it grows with the output's size)."""
    for req, outs in zip(batch, per_request):
        if req.metric is not None:
            req.metric_mean = output_mean(outs.get(req.metric))


def split_objects(value: Any, sizes: list[int]) -> list[Any]:
    return np.split(value, np.cumsum(sizes)[:-1])


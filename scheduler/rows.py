"""How a chunk's requests are cut into queue entries: pure decisions on row counts.

A chunk is many requests for one model, version, priority level and timeout
whose inputs arrive stacked (``Engine.submit_rows``): request ``k`` holds
``parts[k]`` rows.  It stays one queue entry where it can; it is cut only
where a promise needs it, always at request boundaries (a request's rows are
never spread over two batches):

* ``pieces``: at most ``limit`` rows (``max_batch_size``) per entry;
* ``runs``: the requests the result cache did not answer, as contiguous runs
  (each run a view of the stacked rows, no copy);
* ``part_views``: one request's own tensors again, for a path that serves
  requests one by one (a routed name, a rate limit, a reroute).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def pieces(parts: Sequence[int], limit: int, first: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Ranges [a, b) of requests ``first``..``end`` whose rows fit ``limit`` each, in order.
    Every single request must fit (its own batch limit was checked)."""
    end = len(parts) if end is None else end
    out: list[tuple[int, int]] = []
    start, rows = first, 0
    for k in range(first, end):
        if rows and rows + parts[k] > limit:
            out.append((start, k))
            start, rows = k, 0
        rows += parts[k]
    if start < end:
        out.append((start, end))
    return out


def runs(places: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted places as ranges [a, b) of consecutive places: [0, 1, 3] -> [(0, 2), (3, 4)]."""
    out: list[tuple[int, int]] = []
    for k in places:
        if out and out[-1][1] == k:
            out[-1] = (out[-1][0], k + 1)
        else:
            out.append((k, k + 1))
    return out


def offsets(parts: Sequence[int]) -> list[int]:
    """Where each request's rows start, and the total last: [2, 1] -> [0, 2, 3]."""
    out = [0]
    for n in parts:
        out.append(out[-1] + n)
    return out


def part_views(inputs: Mapping[str, Any], parts: Sequence[int]) -> list[dict[str, Any]]:
    """Each request's tensors by name: views of the stacked ones (no copy)."""
    at = offsets(parts)
    return [{name: t[at[k]:at[k + 1]] for name, t in inputs.items()} for k in range(len(parts))]

"""Where a model version goes in the fleet: a pure function of what each node reports.

The controller calls ``place`` when a front end finds no engine core holding a
version (a miss) and when the operator loads a version cluster-wide; front
ends call ``pick`` for every request.  Nothing here does I/O, reads a clock
or holds state, so every rule is tested on plain values (tests/test_cluster.py).

Rules, in order:

1. A node already holding the version needs no load: it comes first.
2. Among the others, a node whose engine core has room for the version's
   estimated footprint (free budget summed over its managed devices, or its
   free host memory on a CPU-only node), most room first, then least
   outstanding work.
3. Then nodes that would have to evict: the one whose cheapest resident
   (lowest keep-value, ``policy.keep_value``) costs least to lose.
4. Replicas spread: each node holds at most one of a version's ``count``
   replicas here (a node's own engine core spreads the replicas it holds
   over its devices, ``scheduler/replicas.py``).

Dead nodes and excluded ones (a request's retry avoids the node that failed it)
never take anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeView:
    """One node as its engine core last reported it."""

    node: str
    alive: bool = True
    free_bytes: int = 0  # room for a new model: free budget on its devices (host memory on a CPU node)
    outstanding: int = 0  # requests queued or in flight on its engine core
    holds: frozenset[str] = field(default_factory=frozenset)  # "name:version" keys READY there
    cheapest_keep: float | None = None  # lowest keep-value among its evictable residents (None: none)


def place(key: str, need_bytes: int, nodes: Iterable[NodeView], count: int = 1,
          exclude: Sequence[str] = ()) -> list[str]:
    """Up to ``count`` distinct nodes for version ``key`` (fewer when fewer are alive), best first."""
    live = [n for n in nodes if n.alive and n.node not in exclude]

    def rank(n: NodeView) -> tuple:
        if key in n.holds:
            return (0, n.outstanding, 0.0, n.node)
        if n.free_bytes >= need_bytes:
            return (1, -n.free_bytes, n.outstanding, n.node)
        keep = n.cheapest_keep if n.cheapest_keep is not None else float("inf")
        return (2, keep, n.outstanding, n.node)

    return [n.node for n in sorted(live, key=rank)[:max(0, count)]]


def pick(holders: Sequence[tuple[str, int]], exclude: Sequence[str] = ()) -> str | None:
    """The holder with the least outstanding work (``(node, outstanding)`` pairs); ties to the
    first listed.  None when every holder is excluded."""
    best: tuple[str, int] | None = None
    for node, load in holders:
        if node in exclude:
            continue
        if best is None or load < best[1]:
            best = (node, load)
    return None if best is None else best[0]

"""Replicas of one model version: which one takes a request, and how many there should be.

A version with ``replicas = k`` keeps k ``ModelInstance``s loaded, each with its
own worker thread, and on managed devices each on a device of its own (the
engine places them by the usual budget and keep-value rules, with the
devices its siblings hold taken out).  The first instance is the version's
*primary*: the registry, routing, swaps, splits and canaries see only it, and
the engine applies loads, unloads, evictions and pins to the whole set
(``Engine._ensure_loaded`` / ``_unload_locked``).  The replicas share the
primary's ``ModelStats`` (one version, one set of counters) and the result
cache's entries (same name and version).

The decisions are pure functions: ``least_loaded`` on the request path,
``replica_target`` on the janitor's tick for a version whose ``max_replicas``
lets it grow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# Scale up when requests waited, on average over the last tick, more than this share of the
# version's latency target: the replicas it has keep up no longer, and one more worker (on
# its own device) takes a queue's share before the target is missed.
SCALE_UP_WAIT_SHARE = 0.25
# ... or when the most urgent replica's oldest request is this urgent (policy.urgency: 1 is a
# request that has waited its whole latency target at base priority).
SCALE_UP_URGENCY = 1.0
# An extra replica idle this long (seconds) is unloaded when the version has no keep_alive.
DEFAULT_IDLE_S = 60.0


class Replica(Protocol):
    """What ``least_loaded`` reads of a ModelInstance."""

    replica: int
    state: str
    in_flight: int

    @property
    def queued(self) -> int: ...


R = TypeVar("R", bound=Replica)


def least_loaded(replicas: Sequence[R]) -> R:
    """The READY replica with the least work (queued + in flight); ties to the lowest number,
    so light traffic stays on the first replicas and the last ones go idle (and can scale
    down).  With none READY, the primary: its own state answers the request."""
    best: R | None = None
    best_load = 0
    for r in replicas:
        if r.state != "READY":
            continue
        load = r.queued + r.in_flight
        if best is None or load < best_load:
            best, best_load = r, load
    return best if best is not None else replicas[0]


@dataclass(frozen=True)
class Load:
    """One version's measured load over the last tick, for ``replica_target``."""

    replicas: int  # replicas READY or loading now
    mean_wait_s: float  # mean queue wait of the samples run since the last tick
    urgency: float  # the highest policy.urgency among its replicas now
    latency_target_s: float
    idle_s: float  # how long the least used extra replica has had no request (0: none)


def replica_target(load: Load, minimum: int, maximum: int, keep_alive_s: float | None) -> int:
    """How many replicas the version should have after this tick: one step at a time.

    Up by one when requests queue (measured mean wait past ``SCALE_UP_WAIT_SHARE`` of the
    latency target, or a replica's oldest request this urgent); down by one when an extra
    replica has been idle past ``keep_alive`` (``DEFAULT_IDLE_S`` without one).  Never
    below ``minimum`` (``replicas``) nor above ``maximum`` (``max_replicas``).
    """
    n = load.replicas
    if n < minimum:
        return minimum
    if n < maximum and (load.mean_wait_s > SCALE_UP_WAIT_SHARE * load.latency_target_s
                        or load.urgency >= SCALE_UP_URGENCY):
        return n + 1
    idle_limit = keep_alive_s if keep_alive_s is not None else DEFAULT_IDLE_S
    if n > minimum and load.idle_s > idle_limit:
        return n - 1
    return min(n, maximum)

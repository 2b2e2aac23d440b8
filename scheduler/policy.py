"""The engine's memory and scheduling decisions, as pure functions.

Nothing here touches a device, a clock or a lock: every function takes what
it needs (measured figures and ``now``) and returns a decision, so the same
code runs in the engine, in ``bench/pressure.py``'s virtual-time replay and
in the tests.  This module must not import torch.

Keep-value: which resident model to evict
=========================================

When a load needs room, we evict the models whose residence is worth least
per byte they hold.  The keep-value of a resident model is::

    keep_value     = effective_rate × reload_seconds / GiB held × priority_weight
    effective_rate = max(request_rate, recency_floor) + RATE_EPSILON
    recency_floor  = ln 2 / FLOOR_HALF_LIFE_S × 2 ** (-(now - last_used) / FLOOR_HALF_LIFE_S)

Units: ``request_rate`` is requests per second (a time-decayed EWMA, see
``Ewma``), ``reload_seconds`` the measured time to load the model again, and
the product ``rate × reload_seconds`` is the device time per second that
keeping the model saves (each request that would otherwise miss costs one
reload) — "load-seconds per second".  Divided by the GiB it holds, it is the
saving per GiB of budget, so the value compares models of any size on one
scale; ``priority_weight`` lets an operator tilt it (priority 1 counts double
the default).  The recency floor is the rate an EWMA would report for a
single request at ``last_used``: it keeps a just-used model (whose rate has
not been folded in yet) from scoring 0, and fades with the same half-life as
the rate.  ``RATE_EPSILON`` keeps long-idle models ordered by cost per byte.

This is GreedyDual-Size-Frequency in spirit (Cherkasova 1998: priority =
frequency × cost / size, aged): frequency is the decayed rate (the decay is
GDSF's aging), cost is the measured reload time, size is the bytes held.

Why reload seconds and not bytes.  When reload time is proportional to the
bytes, the value is the rate alone (evicting by ascending rate is the online
form of Belady's rule).  Measured reload times add what bytes do not see: a
model whose weights wait in the host tier reloads ~40× faster than from its
file, so it is the cheaper one to evict, and a source that is slow for its
size is kept longer.  ``estimated_reload_seconds`` is the prior before a
model's first load (0.04 s + 2 GB/s, fitted on the H100).

What else was tried — other rate estimators, staleness ceilings, GDSF with
an inflation clock, a knapsack victim set, other churn guards and margins —
and what each measured on ``bench/pressure.py`` is in ``docs/benchmarks.md``
("Eviction policy: what was tried").

It beats the policies the popular servers ship:

* Ollama evicts the first idle runner by shortest keep-alive: neither size
  nor popularity aware, so models thrash with room to spare.
* Ray Serve multiplexing is LRU by model COUNT: a 12 GiB and a 0.5 GiB model
  take one "slot" each, so it either wastes memory or goes out of memory.
* ModelMesh is LRU by bytes: memory-safe, but recency only — one request to a
  cold model pushes out a hot one, and a big cold model costs no more to keep
  than a small one.

``bench/pressure.py`` replays Zipf traces with popularity shifts against the
last two and Belady's offline rule.  On its default trace (40 models, ~4× a
40 GiB budget, Zipf 1.0) this policy loads 17–24% fewer GiB than LRU by
bytes and 1.18–1.34× what Belady's clairvoyant rule loads, over seeds 0–7
(``docs/benchmarks.md``).

Choosing victims (``plan_eviction``)
====================================

1. If ``free_bytes >= need_bytes`` nothing is evicted (an empty plan).
2. Pinned models and busy ones (queued or in-flight work) are never victims;
   if the others cannot cover the shortfall even together: ``None``.
3. Churn guard.  A model resident for less than ``min_residency_s`` is
   "young".  A load may be one half of a swap loop when the incoming model
   is a returner: used within the last ``min_residency_s`` — it was resident
   a moment ago and wants back in, the pattern of models evicting each other
   (Ollama's thrash, its issues #10948/#12783/#8903).  Against a returner,
   a young model is protected if it came in as a returner itself; one that
   came in as a newcomer's load (``Residency.loaded_as_newcomer``: it had not
   been used for ``min_residency_s`` when it was loaded) is an ordinary
   candidate.  Even a protected one goes if the returner is worth more than
   ``CHURN_MARGIN``× its keep-value (a clear winner does not wait for a
   loser).  When the caller does not say what comes in (``incoming`` is
   None: assume the worst) every young model is protected.  If only
   protected models could make room: ``None`` — the caller waits, at most
   until the young models mature (``earliest_room`` says when), instead of
   thrashing.
   Why this stops loops of any length.  A model is a newcomer at most once
   per ``min_residency_s`` of silence, so once each model of a loop has come
   in once, every load in it is a returner's and every young model in it came
   in as one: a swap then needs a model resident ``min_residency_s`` —
   at most one swap per slot per ``min_residency_s``, however fast the
   requests go round: two models on a budget that fits one, N models on N−1
   slots, N models on one.  A young model that came in as a newcomer and is
   evicted by a returner finds, when it comes back, a returner in its place:
   protected.  (Protecting a young model only from the model it displaced,
   or from models evicted after it was loaded, lets three models round-robin
   on one slot thrash at every request: each returner finds a resident loaded
   after it left.)  So that a model waiting for the guard stays a returner,
   a refused request counts as a use (``memory.make_room`` stamps
   ``last_used``; ``bench/pressure.py`` counts a waiting request).
   The margin is a hysteresis: any margin above 1 stops the two-model loop
   (each side's new request moves its rate by only a little).
   A newcomer (not used within ``min_residency_s``) cannot be half of such a
   loop, so for it young models are ordinary candidates: protecting them
   would keep one-off loads around at the expense of older, hotter models.
   ModelMesh has a cruder form of this: a full node refuses a load while
   even its least recently used model is younger than a minimum age.
   (The engine must therefore describe the incoming model by its use BEFORE
   the request that triggers the load: a ``last_used`` of now makes every
   load look like a returner.)
4. Admission: if ``incoming_value`` (the keep-value the incoming model would
   have, same function and units) is given, only models worth no more than it
   (``keep_value <= incoming_value``) may be victims; if those cannot cover
   the shortfall: ``None`` — every way to make room would throw out something
   worth more per byte than what comes in.  A caller that must serve the
   request eventually raises the incoming value as its requests queue (their
   count feeds the rate) or, after a bounded wait, retries with
   ``incoming_value=None``.
5. Among the eligible models: take them by ascending keep-value (ties: the
   bigger first, then key) until the shortfall is covered, then drop again
   any victim, most valuable first, that the others already cover — so a
   small model taken early is spared when a bigger one taken later suffices
   alone.

Urgency: which ready batch runs next on a shared device
=======================================================

::

    pressure = min(oldest_wait_s / latency_target_s × lateness, PRESSURE_CAP)
    lateness = clamp(p95_s / latency_target_s, 1, LATENESS_CAP)  (1 if p95 unknown)
    urgency  = priority_weight(base_priority) × pressure
               + min(since_last_run_s, oldest_wait_s) / aging_s

``pressure`` is how far the oldest queued request has gone towards its
model's latency target (1.0 = at the target); a model whose measured p95 is
already over the target is pushed harder (up to ``LATENESS_CAP``×).  The
priority weight scales it.  Pressure is capped, and aging is not: a model with
ready work that has not run for ``t`` seconds gains ``t / aging_s``, so it
overtakes any other model after at most
``priority_weight(1) × PRESSURE_CAP × aging_s`` seconds (8 s with the
defaults) — nobody starves, even under overload.  Aging counts only time the
model has had work waiting (``min`` with the oldest wait), so a model that
was idle does not jump the queue with its first request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GiB = float(2**30)

# The half-life the engine's request-rate EWMA should use (and the bench uses):
# long enough to count a few requests of the models at the edge of the budget,
# short enough to follow a popularity change within minutes.
RATE_HALF_LIFE_S = 300.0
# The recency floor fades with this half-life (see keep_value).
FLOOR_HALF_LIFE_S = RATE_HALF_LIFE_S
# A young model is evicted for a returning model only if that one is worth this many times more.
CHURN_MARGIN = 1.25
# Keeps keep_value > 0 for long-idle models: ~one request per day.
RATE_EPSILON = 1e-5
# The engine's reload estimate before a model's first measured load (see estimated_reload_seconds).
RELOAD_OVERHEAD_S = 0.04
RELOAD_BYTES_PER_S = 2e9
# The priority that weighs 1.0 (the config's default priority).
NEUTRAL_PRIORITY = 2
# urgency(): pressure saturates at 4× the target; p95 lateness at 2×.
PRESSURE_CAP = 4.0
LATENESS_CAP = 2.0

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------- EWMA


class Ewma:
    """A time-decayed moving average, with a half-life in seconds.

    Two uses, one decay rule (a sample's weight halves every ``half_life_s``):

    * values (latency, load time): ``update(sample, now)`` keeps the decayed
      weighted mean of the samples; ``value`` reads it.  The constructor's
      ``value`` is a prior (an estimate) that the first sample replaces.
      Samples at the same instant weigh the same.
    * rates (requests per second): ``add_event(now, count)`` adds events to a
      decayed count ``C``; ``rate(now) = C(now) × ln 2 / half_life_s``.  For a
      steady Poisson stream of rate λ, E[C] = λ × half_life_s / ln 2, so the
      estimate is unbiased once the stream has run a few half-lives; after the
      stream stops it halves every ``half_life_s``.

    Time never runs backwards here: a ``now`` earlier than the last one
    counts as the last one.
    """

    __slots__ = ("_count", "_prior", "_sum", "_t", "_tc", "_weight", "half_life_s")

    def __init__(self, half_life_s: float, value: float = 0.0):
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self._prior = float(value)
        self._sum = 0.0  # decayed Σ w·x
        self._weight = 0.0  # decayed Σ w
        self._t: float | None = None
        self._count = 0.0  # decayed event count (rate mode)
        self._tc: float | None = None

    def _decay(self, dt: float) -> float:
        return float(2.0 ** (-max(0.0, dt) / self.half_life_s))

    def update(self, sample: float, now: float) -> float:
        """Fold one value sample in at time ``now``; returns the new mean."""
        if self._t is not None:
            d = self._decay(now - self._t)
            self._sum *= d
            self._weight *= d
        if self._t is None or now > self._t:
            self._t = now
        self._sum += float(sample)
        self._weight += 1.0
        return self.value

    @property
    def value(self) -> float:
        """The decayed mean of the samples (the prior until the first one)."""
        if self._weight <= 0.0:
            return self._prior
        return self._sum / self._weight

    def add_event(self, now: float, count: float = 1.0) -> None:
        """Count ``count`` events at ``now`` (0 just advances the clock)."""
        if self._tc is not None:
            self._count *= self._decay(now - self._tc)
        if self._tc is None or now > self._tc:
            self._tc = now
        self._count += float(count)

    def rate(self, now: float) -> float:
        """Events per second at ``now``, decayed since the last event."""
        if self._tc is None:
            return 0.0
        return self._count * self._decay(now - self._tc) * _LN2 / self.half_life_s


# --------------------------------------------------------------------------- keep-value


@dataclass(frozen=True)
class Residency:
    """What the policy needs to know about one resident model (all measured)."""

    key: str  # "name:version"
    bytes: int  # held on the device
    request_rate: float  # EWMA requests per second
    reload_seconds: float  # measured load time (or the estimate before the first load)
    base_priority: int  # 1 most urgent .. N
    pinned: bool
    busy: bool  # queued or in-flight work
    loaded_at: float  # same clock as `now`
    last_used: float  # same clock as `now`
    # Its current residence began with a newcomer's load (``not churn_risk(incoming, ...)`` when it was
    # loaded): the churn guard does not protect it from a returner.  False (protected) when unknown.
    loaded_as_newcomer: bool = False


def priority_weight(base_priority: int) -> float:
    """``2 ** (NEUTRAL_PRIORITY - p)``: priority 1 → 2.0, 2 → 1.0, 3 → 0.5, 4 → 0.25.

    Each level more urgent doubles a model's keep-value and its urgency; the
    config's default priority (2) is neutral.  Levels below 1 count as 1.
    """
    p = max(1, int(base_priority))
    return 2.0 ** (NEUTRAL_PRIORITY - p)


def estimated_reload_seconds(nbytes: int) -> float:
    """A reload's seconds before one is measured: ``RELOAD_OVERHEAD_S + bytes / RELOAD_BYTES_PER_S``.

    The intercept is the H100 measurement in the module docstring; 2 GB/s is
    a local NVMe read (a reload from the page cache or the host tier is
    faster, and its measured time replaces this after the first load).
    """
    return RELOAD_OVERHEAD_S + max(0, int(nbytes)) / RELOAD_BYTES_PER_S


def recency_floor(idle_s: float) -> float:
    """Requests per second an EWMA would report for one request ``idle_s`` ago."""
    return float(_LN2 / FLOOR_HALF_LIFE_S * 2.0 ** (-max(0.0, idle_s) / FLOOR_HALF_LIFE_S))


def effective_rate(r: Residency, now: float) -> float:
    """``max(request_rate, recency_floor(now - last_used)) + RATE_EPSILON`` (req/s)."""
    return max(max(0.0, r.request_rate), recency_floor(now - r.last_used)) + RATE_EPSILON


def keep_value(r: Residency, now: float) -> float:
    """Load-seconds per second saved per GiB held, weighted by priority.

    ``effective_rate × reload_seconds / (bytes / GiB) × priority_weight``;
    higher means more worth keeping.  Monotonic: up with the rate and the
    reload cost, down with the bytes held.
    """
    gib = max(1, r.bytes) / GiB
    return effective_rate(r, now) * max(0.0, r.reload_seconds) / gib * priority_weight(r.base_priority)


def lost_value(r: Residency, now: float) -> float:
    """What evicting ``r`` costs: keep_value × GiB = rate × reload_seconds × weight."""
    return keep_value(r, now) * (max(1, r.bytes) / GiB)


# --------------------------------------------------------------------------- eviction


@dataclass(frozen=True)
class EvictionPlan:
    victims: tuple[str, ...]
    freed_bytes: int
    reason: str  # why these, with the values, for events and the console


def _mature(r: Residency, now: float, min_residency_s: float) -> bool:
    return now - r.loaded_at >= min_residency_s


def churn_risk(incoming: Residency | None, now: float, min_residency_s: float) -> bool:
    """Whether loading ``incoming`` may be one half of a swap loop (so young models are protected).

    True when the incoming model is unknown (None: assume the worst) or was
    itself used within the last ``min_residency_s`` — it was resident a
    moment ago and wants back in, the pattern of two models evicting each
    other.  A model not used for longer than that is a newcomer: it cannot be
    part of such a loop, and a young model may make room for it like any other.
    """
    if min_residency_s <= 0:
        return False
    return incoming is None or now - incoming.last_used < min_residency_s


def plan_eviction(
    resident: Sequence[Residency],
    need_bytes: int,
    free_bytes: int,
    now: float,
    min_residency_s: float = 30.0,
    incoming_value: float | None = None,
    incoming: Residency | None = None,
) -> EvictionPlan | None:
    """The models to evict so that ``need_bytes`` fit, or None if that cannot be done now.

    See the module docstring for the rules (never pinned or busy, churn
    guard, admission by ``incoming_value``, lowest keep-value first).  The
    returned plan frees at least ``need_bytes - free_bytes``; an empty plan
    means it fits already.

    ``incoming`` is the model to be loaded, described like a resident one
    (its rate, reload cost, bytes and ``last_used``; ``loaded_at`` and
    ``loaded_as_newcomer`` are ignored).  Pass it: it lets the churn guard
    tell a model coming back after a recent eviction (protect the young)
    from a newcomer (do not).  Without it every young model is protected.
    Remember ``not churn_risk(incoming, now, min_residency_s)`` for the
    model that is loaded and pass it back as its ``loaded_as_newcomer``
    while it is resident: a returner may evict a young model that came in
    as a newcomer.
    """
    if need_bytes <= free_bytes:
        return EvictionPlan((), 0, f"fits: {free_bytes / GiB:.2f} GiB free, {need_bytes / GiB:.2f} GiB needed")
    shortfall = need_bytes - free_bytes
    movable = [r for r in resident if not r.pinned and not r.busy]
    if sum(r.bytes for r in movable) < shortfall:
        return None  # pinned and busy models hold too much: wait for work to drain
    values = {r.key: keep_value(r, now) for r in movable}
    candidates = movable
    protected = 0
    if churn_risk(incoming, now, min_residency_s):
        # A young model goes only for a returner worth CHURN_MARGIN× more (never for an unknown one),
        # unless it came in as a newcomer: a one-off load is no half of a loop (rule 3).
        bar = -math.inf if incoming is None else keep_value(incoming, now) / CHURN_MARGIN
        candidates = [
            r for r in movable
            if _mature(r, now, min_residency_s) or values[r.key] < bar
            or (incoming is not None and r.loaded_as_newcomer)
        ]
        protected = len(movable) - len(candidates)
        if sum(r.bytes for r in candidates) < shortfall:
            return None  # churn guard: only protected young models could make room
    eligible = candidates
    if incoming_value is not None:
        eligible = [r for r in candidates if values[r.key] <= incoming_value]
        if sum(r.bytes for r in eligible) < shortfall:
            return None  # every way to make room evicts something worth more than the newcomer

    # Greedy by ascending keep-value (ties: bigger first, then key), then prune.
    order = sorted(eligible, key=lambda r: (values[r.key], -r.bytes, r.key))
    chosen: list[Residency] = []
    freed = 0
    for r in order:
        if freed >= shortfall:
            break
        chosen.append(r)
        freed += r.bytes
    for r in sorted(chosen, key=lambda r: (-values[r.key], r.bytes, r.key)):
        if freed - r.bytes >= shortfall:
            chosen.remove(r)
            freed -= r.bytes

    chosen.sort(key=lambda r: (values[r.key], r.key))
    parts = ", ".join(
        f"{r.key} value {values[r.key]:.3g} ({effective_rate(r, now):.3g} req/s × {r.reload_seconds:.3g} s "
        f"/ {r.bytes / GiB:.2f} GiB × {priority_weight(r.base_priority):g})"
        for r in chosen
    )
    reason = (
        f"need {shortfall / GiB:.2f} GiB more; evicting the lowest keep-value: {parts}; "
        f"freed {freed / GiB:.2f} GiB; {len(eligible) - len(chosen)} other candidate(s) kept"
    )
    if incoming_value is not None:
        reason += f"; incoming value {incoming_value:.3g}"
    if protected:
        reason += f"; {protected} younger than {min_residency_s:g} s protected by the churn guard"
    return EvictionPlan(tuple(r.key for r in chosen), freed, reason)


def earliest_room(
    resident: Sequence[Residency],
    need_bytes: int,
    free_bytes: int,
    now: float,
    min_residency_s: float = 30.0,
) -> float | None:
    """By when the churn guard lets ``plan_eviction`` make room (admission aside).

    ``now`` if no eviction is needed; otherwise the time by which enough
    movable models have matured, counting every young model as protected (so
    a plan may come earlier, never later); None if pinned and busy models hold
    too much (that depends on work draining, not on time).
    """
    shortfall = need_bytes - free_bytes
    if shortfall <= 0:
        return now
    movable = sorted((r for r in resident if not r.pinned and not r.busy), key=lambda r: r.loaded_at)
    freed = 0
    for r in movable:  # oldest first: they mature first
        freed += r.bytes
        if freed >= shortfall:
            return max(now, r.loaded_at + min_residency_s)
    return None


def explain(r: Residency, now: float) -> dict[str, Any]:
    """The keep-value's inputs and output, JSON-able, for the snapshot and the console."""
    return {
        "key": r.key,
        "bytes": int(r.bytes),
        "gib": round(r.bytes / GiB, 4),
        "request_rate": r.request_rate,
        "recency_floor": recency_floor(now - r.last_used),
        "effective_rate": effective_rate(r, now),
        "reload_seconds": r.reload_seconds,
        "base_priority": r.base_priority,
        "priority_weight": priority_weight(r.base_priority),
        "keep_value": keep_value(r, now),
        "lost_value": lost_value(r, now),
        "pinned": r.pinned,
        "busy": r.busy,
        "resident_s": max(0.0, now - r.loaded_at),
        "idle_s": max(0.0, now - r.last_used) if r.last_used > -math.inf else None,  # None: never used
        "loaded_as_newcomer": r.loaded_as_newcomer,  # the churn guard does not protect it from a returner
        "formula": "(max(request_rate, recency_floor) + epsilon) × reload_seconds / GiB × priority_weight",
        "units": "load-seconds saved per second per GiB held",
    }


# --------------------------------------------------------------------------- urgency


def urgency(
    oldest_wait_s: float,
    latency_target_s: float,
    p95_s: float | None,
    base_priority: int,
    since_last_run_s: float,
    aging_s: float = 1.0,
) -> float:
    """How urgently a model's ready batch should get the shared device (higher first).

    ``priority_weight × min(oldest_wait / target × lateness, PRESSURE_CAP)
    + min(since_last_run, oldest_wait) / aging_s``, where lateness is
    ``clamp(p95 / target, 1, LATENESS_CAP)`` (1 while p95 is unknown).  See
    the module docstring for why, and the starvation bound.
    """
    wait = max(0.0, oldest_wait_s)
    target = max(float(latency_target_s), 1e-9)
    lateness = 1.0
    if p95_s is not None and p95_s > target:
        lateness = min(p95_s / target, LATENESS_CAP)
    pressure = min(wait / target * lateness, PRESSURE_CAP)
    aging = min(max(0.0, since_last_run_s), wait) / max(float(aging_s), 1e-9)
    return priority_weight(base_priority) * pressure + aging


def pick_next(candidates: Sequence[tuple[str, float]]) -> str | None:
    """The key with the highest urgency; ties go to the smallest key (deterministic)."""
    best: tuple[str, float] | None = None
    for key, u in candidates:
        if best is None or u > best[1] or (u == best[1] and key < best[0]):
            best = (key, u)
    return None if best is None else best[0]


def torch_threads(configured: int | None = None) -> int:
    """Intra-op threads for one model's worker thread (``[server] torch_threads``).

    ``configured`` wins when given (0: leave torch's default, every core).  Otherwise
    one, on the GPU (a forward there is kernel launches) and on the CPU alike: each
    model has its own worker thread already, and an OpenMP team per worker spins on
    the cores the event loop needs.  Measured with tiny-mlp at c=64 (docs/benchmarks.md):
    on 2 cores 1 thread served 10.6k req/s at 95 µs of CPU each, torch's default 8.6–9.0k
    at 160 µs; on 16 cores 1 thread 5.7–6.5k at 159–181 µs, 7 threads 5.4–5.7k at ~1.2 ms,
    torch's 16 3.6–3.9k at ~2.8 ms.  A big model on the CPU alone may want more: set it.
    """
    return 1 if configured is None else configured


def frontend_workers(cores: int) -> int:
    """Front-end processes for ``--serve`` (``[server] workers``) on a machine with ``cores``.

    Each front end takes a core's worth of HTTP and V2 work off the engine
    core's event loop, which keeps one core (and its model worker threads
    more).  With two cores or fewer there is no core to give them: the
    single process serves as much as the machine can (measured on 2 cores:
    ``bench/http.py --quick``).  Above that, half the cores, at most 8
    (docs/benchmarks.md has the H200 host's figures).
    """
    if cores <= 2:
        return 0
    return max(1, min(8, cores // 2))


def ipc_spin_us(cores: int, workers: int) -> float:
    """How long front ends and the engine core stay awake after a message at low load
    (``[server] ipc_spin_us`` when not set).  Staying awake trades a busy core for the
    wake-ups of two idle processes per request, and on hosts where waking is slow it decides
    throughput too: on an H100 host whose server had 11 cores for 8 front ends, 400 us took
    c=256 through the front ends from 11,481 to 38,523 req/s and c=1 from +178 to +134 us
    over one process (on another, 16 cores: c=1 +517 to +60 us).  It needs a core per front
    end, one for the engine core's loop, one for its model threads and one to spare.  Short
    of that, polling takes CPU from the work (on the 2-core machine, one front end's c=1 got
    slower with it)."""
    return 400.0 if cores >= workers + 3 else 0.0

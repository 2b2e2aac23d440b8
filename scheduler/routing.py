"""Versions, A/B splits and canaries: the routing policy as pure functions.

Nothing here touches torch, a clock, a lock or the event loop: ``versions.py``
(the engine's ``Versions``) owns the routing state, calls these functions to
decide, and passes in whatever they need (uniform draws, times, arm
statistics).

Routing a request
=================

A request that names a version goes to that version, whatever the split.  A
request without one goes to the model name's *active* version, unless the
name has a split (weights over versions, set by ``Engine.set_split`` or by a
canary): then one arm is drawn by weight.  ``Table`` holds the weights as
cumulative bounds in [0, 1) in the order they were given (for a canary:
baseline first, canary last), and ``Table.choose(u)`` is one bisect.  ``u``
is ``random()`` for an anonymous request, or ``sticky_u(name, routing_key)``
(blake2b of the name and key, as a fraction of 2**64) when the client sends
a routing key: the same key lands in the same bucket, hence on the same arm,
while the weights are unchanged.  Because the canary is the last bucket, a
key already on the canary stays there as its share rises.

Versions with weight 0 are listed but get nothing.  *Shadow* versions get a
copy of every routed request (fire and forget: the answer is recorded in the
shadow arm's metrics and dropped; its errors never reach the client).

Per-arm metrics (``ArmStats``): answers, errors, a 512-answer latency window
(p50/p95) and the mean of one numeric output (``metric_output``: the mean
of all its elements per answer, averaged over answers).  Every failed answer
counts as an error, whatever its kind.

Canary
======

``steps`` are increasing percentages in (0, 100] that end at 100; the canary
arm gets ``steps[step]`` percent and the baseline (the version active when
the canary started) the rest.  The controller (one task per canary, in
``versions.py``) wakes when an error lands on the canary arm and at least
every ``check_interval(interval_s)`` seconds, and asks ``canary_verdict``:

* error rate: rolled back as soon as ``errors / max(requests, min_requests)
  > max_error_rate`` -- before ``min_requests`` answers this is a lower bound
  of the rate the step will end with, so a burst of failures is acted on at
  once, never a single unlucky error;
* p95: once the canary arm and the baseline each have ``min_requests``
  answers in the current step, rolled back when
  ``canary p95 / max(baseline p95, P95_FLOOR_MS) > max_p95_ratio``.  The
  floor (1 ms) keeps sub-millisecond scheduling noise from rolling back a
  model that is only "twice as slow" at 0.2 ms.

A step lasts at least ``interval_s``, and longer while the canary arm (or the
baseline) has fewer than ``min_requests`` answers in it: a canary without
traffic waits instead of being promoted unjudged (``next_step``).  Each step
starts with fresh arm metrics.  Reaching 100 ends in a swap (the engine's
normal swap path: the new version becomes active, the split is cleared, the
old version drains and is unloaded); state ``promoted``.  A broken bound sets
the share to 0 (the split is cleared: requests go to the active version
again), state ``rolled_back`` with the reason.  ``Engine.stop_canary``
aborts: share 0, state ``aborted``.

Restart rule (what the store holds and what comes back)
=======================================================

The store holds each name's active version, its split (weights, shadow,
metric_output) and its canary record (version, baseline, steps, step, share,
state, interval, bounds, times, reason); arm metrics are in memory only.

* A split comes back as it was.  Versions no longer registered are dropped
  from its weights and shadow (a ``restore_failed`` warning says so); if no
  positive weight is left, the weights are cleared.
* A canary that was running (or promoting: the swap had not switched yet,
  since the switch and the ``promoted`` record are one transaction) resumes
  at the step it had reached, with the same share, once its version is
  loaded again; its step timer and its arm metrics restart at that moment
  (until then requests go to the active version).  If its version or its
  baseline is gone, or the baseline is no longer the active version, it is
  marked ``rolled_back`` with that reason (and stored so).  If loading its
  version fails, it is rolled back with the load's reason.
* Finished canaries (promoted, rolled_back, aborted) come back for display.
* A swap interrupted by a crash: the switch (active version, split cleared,
  audit row) is one transaction, so the process comes back either with the
  old version active (as if the swap never started) or with the new one.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, ModelNotFound

DEFAULT_STEPS = (5, 25, 50, 100)
LATENCY_WINDOW = 512  # answers kept per arm for p50/p95
P95_FLOOR_MS = 1.0  # the baseline p95 a ratio is taken against is at least this
CHECK_MAX_S = 1.0  # the controller judges at least this often (and on each canary error)

RUNNING, STARTING, PROMOTING = "running", "starting", "promoting"
PROMOTED, ROLLED_BACK, ABORTED = "promoted", "rolled_back", "aborted"
LIVE_STATES = (STARTING, RUNNING, PROMOTING)  # a canary in one of these holds the name


# ---------------------------------------------------------------- choosing an arm

class Table:
    """Positive weights as cumulative upper bounds in (0, 1], in the order given."""

    __slots__ = ("versions", "bounds")

    def __init__(self, weights: Mapping[str, float]):
        pos = [(v, float(w)) for v, w in weights.items() if w > 0]
        total = sum(w for _, w in pos)
        if not pos or not total > 0:
            raise ValueError("a split needs at least one positive weight")
        acc = 0.0
        bounds = []
        for _, w in pos:
            acc += w
            bounds.append(acc / total)
        bounds[-1] = 1.0
        self.versions = tuple(v for v, _ in pos)
        self.bounds = tuple(bounds)

    def choose(self, u: float) -> str:
        """The arm whose bucket holds u (u in [0, 1))."""
        i = bisect.bisect_right(self.bounds, u)
        versions = self.versions
        return versions[i] if i < len(versions) else versions[-1]


def choose_arm(weights: Mapping[str, float], u: float) -> str:
    """The version that u (uniform in [0, 1)) falls on, by weight; weight 0 never."""
    return Table(weights).choose(u)


def sticky_u(name: str, key: str) -> float:
    """A stable draw in [0, 1) for (model name, routing key): same key, same bucket."""
    digest = hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# ---------------------------------------------------------------- checking input

def version_arg(value: Any, field: str = "version") -> str:
    """A version as the engine keys it ("2"), from "2" or 2."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{field}: expected a version such as \"2\", got {value!r}")
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"{field}: expected a positive integer version such as \"2\", got {value!r}")
    return str(int(text))


def _known(name: str, version: str, versions: Iterable[str], field: str) -> None:
    versions = list(versions)
    if version not in versions:
        known = ", ".join(sorted(versions, key=int))
        raise ModelNotFound(f"{field}: model '{name}' has no version '{version}' (versions: {known})")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_weights(name: str, weights: Any, versions: Iterable[str]) -> dict[str, float | int]:
    """Weights keyed by registered version, each ≥ 0, summing to > 0 ({} clears the split)."""
    if not isinstance(weights, Mapping):
        raise InputError(f"weights: expected an object mapping version to weight, e.g. {{\"1\": 90, \"2\": 10}}, "
                         f"got {type(weights).__name__}")
    versions = list(versions)
    out: dict[str, float | int] = {}
    for key, w in weights.items():
        v = version_arg(key, "weights")
        field = f"weights.{v}"
        _known(name, v, versions, field)
        if v in out:
            raise InputError(f"{field}: version {v} is given twice")
        if not _number(w):
            raise InputError(f"{field}: expected a number ≥ 0, got {w!r}")
        if w < 0:
            raise InputError(f"{field}: expected a number ≥ 0, got {w!r} (a weight cannot be negative)")
        out[v] = w
    if out and not sum(out.values()) > 0:
        raise InputError(f"weights: expected weights summing to a positive number, got {dict(out)} "
                         "(use {} to clear the split)")
    return out


def validate_shadow(name: str, shadow: Any, versions: Iterable[str], weights: Mapping[str, float],
                    active: str | None) -> list[str]:
    """Shadow versions: registered, distinct, none of them an arm that already gets traffic."""
    if shadow is None:
        return []
    if isinstance(shadow, (str, bytes)) or not isinstance(shadow, Sequence):
        raise InputError(f"shadow: expected a list of versions, e.g. [\"3\"], got {shadow!r}")
    versions = list(versions)
    out: list[str] = []
    for i, s in enumerate(shadow):
        v = version_arg(s, f"shadow[{i}]")
        _known(name, v, versions, f"shadow[{i}]")
        if v in out:
            raise InputError(f"shadow[{i}]: version {v} is listed twice")
        if weights.get(v, 0) > 0:
            raise InputError(f"shadow[{i}]: version {v} also has weight {weights[v]} in weights; a version is "
                             "either an arm (its answers returned) or a shadow (answers recorded, never returned)")
        if not weights and v == active:
            raise InputError(f"shadow[{i}]: version {v} is the active version, which already gets the traffic")
        out.append(v)
    return out


def validate_metric_output(metric_output: Any, outputs_by_version: Mapping[str, Sequence[str] | None]) -> str | None:
    """The numeric output whose mean per arm is tracked; each arm that declares outputs must have it."""
    if metric_output is None:
        return None
    if not isinstance(metric_output, str) or not metric_output:
        raise InputError(f"metric_output: expected an output name, got {metric_output!r}")
    for v, names in outputs_by_version.items():
        if names is not None and metric_output not in names:
            raise InputError(f"metric_output: version {v} has no output '{metric_output}' "
                             f"(outputs: {', '.join(names)})")
    return metric_output


def validate_canary(steps: Any, interval_s: Any, max_error_rate: Any, max_p95_ratio: Any,
                    min_requests: Any) -> dict[str, Any]:
    """The canary's plan, checked: {"steps", "interval_s", "bounds": {...}}."""
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise InputError(f"steps: expected a list of percentages such as {list(DEFAULT_STEPS)}, got {steps!r}")
    steps = list(steps)
    expected = f"increasing percentages in (0, 100] ending at 100, e.g. {list(DEFAULT_STEPS)}"
    if not steps:
        raise InputError(f"steps: expected {expected}, got []")
    for i, s in enumerate(steps):
        if not _number(s) or not 0 < s <= 100:
            raise InputError(f"steps[{i}]: expected a percentage in (0, 100], got {s!r}")
        if i and s <= steps[i - 1]:
            raise InputError(f"steps: expected {expected}, got {steps} (step {i} does not increase)")
    if steps[-1] != 100:
        raise InputError(f"steps: expected {expected}, got {steps} (the last step must be 100)")
    if not _number(interval_s) or not interval_s > 0:
        raise InputError(f"interval_s: expected a number of seconds > 0, got {interval_s!r}")
    if not _number(max_error_rate) or not 0 <= max_error_rate <= 1:
        raise InputError(f"max_error_rate: expected a fraction from 0 to 1 (0.05 = 5%), got {max_error_rate!r}")
    if not _number(max_p95_ratio) or not max_p95_ratio >= 1:
        raise InputError(f"max_p95_ratio: expected a number ≥ 1 (canary p95 / baseline p95), got {max_p95_ratio!r}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise InputError(f"min_requests: expected an integer ≥ 1, got {min_requests!r}")
    return {
        "steps": [s if isinstance(s, int) or not float(s).is_integer() else int(s) for s in steps],
        "interval_s": float(interval_s),
        "bounds": {"max_error_rate": float(max_error_rate), "max_p95_ratio": float(max_p95_ratio),
                   "min_requests": min_requests},
    }


# ---------------------------------------------------------------- arm metrics

class ArmStats:
    """One version's answers under the router: counts, a latency window, a metric's mean."""

    __slots__ = ("requests", "errors", "_lat", "_n", "metric_sum", "metric_n")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self._lat = np.zeros(LATENCY_WINDOW, dtype=np.float64)  # seconds
        self._n = 0
        self.metric_sum = 0.0
        self.metric_n = 0

    def ok(self, seconds: float, metric: float | None = None) -> None:
        self.requests += 1
        self._lat[self._n % LATENCY_WINDOW] = seconds
        self._n += 1
        if metric is not None:
            self.metric_sum += metric
            self.metric_n += 1

    def fail(self) -> None:
        self.requests += 1
        self.errors += 1

    def to_dict(self) -> dict[str, Any]:
        n = min(self._n, LATENCY_WINDOW)
        p50 = p95 = None
        if n:
            p = np.percentile(self._lat[:n], [50, 95]) * 1000.0
            p50, p95 = float(p[0]), float(p[1])
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "p50_ms": p50,
            "p95_ms": p95,
            "mean_output": self.metric_sum / self.metric_n if self.metric_n else None,
        }


# ---------------------------------------------------------------- canary decisions

@dataclass
class Canary:
    """A canary's plan and progress (what the store holds; times are wall-clock seconds)."""

    version: str
    baseline: str
    steps: list[float | int]
    interval_s: float
    bounds: dict[str, Any]
    step: int = 0
    share: float | int = 0
    state: str = STARTING
    started: float | None = None
    step_started: float | None = None
    reason: str | None = None
    # not stored: the monotonic time the current step started (None: not applied yet)
    step_mono: float | None = field(default=None, compare=False)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def weights(self) -> dict[str, float | int]:
        """The split a canary at this share puts in force: baseline first, canary last."""
        return {self.baseline: 100 - self.share, self.version: self.share}

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "baseline": self.baseline, "steps": list(self.steps), "step": self.step,
                "share": self.share, "state": self.state, "interval_s": self.interval_s,
                "bounds": dict(self.bounds), "started": self.started, "step_started": self.step_started,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Canary:
        return cls(version=str(d["version"]), baseline=str(d["baseline"]), steps=list(d["steps"]),
                   interval_s=float(d["interval_s"]), bounds=dict(d["bounds"]), step=int(d["step"]),
                   share=d["share"], state=str(d["state"]), started=d.get("started"),
                   step_started=d.get("step_started"), reason=d.get("reason"))


def check_interval(interval_s: float) -> float:
    """How often the controller judges the bounds between errors: a quarter step, at most 1 s."""
    return max(0.01, min(interval_s / 4.0, CHECK_MAX_S))


def enough_evidence(arm: Mapping[str, Any], baseline: Mapping[str, Any], bounds: Mapping[str, Any]) -> bool:
    """Both arms have min_requests answers in this step: the step may be judged and left."""
    need = bounds["min_requests"]
    return bool(arm["requests"] >= need and baseline["requests"] >= need)


def canary_verdict(arm: Mapping[str, Any], baseline: Mapping[str, Any],
                   bounds: Mapping[str, Any]) -> tuple[str, str]:
    """("rollback", why) the moment a bound is broken, else ("ok", how it stands).

    arm / baseline: ``ArmStats.to_dict()`` of the canary and baseline arms in
    the current step; bounds: max_error_rate, max_p95_ratio, min_requests.
    """
    n, errors, need = arm["requests"], arm["errors"], bounds["min_requests"]
    max_rate = bounds["max_error_rate"]
    if errors and errors / max(n, need) > max_rate:
        return ("rollback", f"error rate {errors}/{n} ({errors / n:.1%}) is above max_error_rate {max_rate:.1%}"
                + ("" if n >= need else f" even if the rest of its first {need} requests succeed"))
    if not enough_evidence(arm, baseline, bounds):
        return ("ok", f"judging after {need} requests per arm: canary {n}, baseline {baseline['requests']}")
    p_arm, p_base = arm.get("p95_ms"), baseline.get("p95_ms")
    ratio_txt = ""
    if p_arm is not None and p_base is not None:
        ratio = p_arm / max(p_base, P95_FLOOR_MS)
        if ratio > bounds["max_p95_ratio"]:
            return ("rollback", f"p95 {p_arm:.2f} ms is {ratio:.2f}x the baseline's {p_base:.2f} ms "
                                f"(max_p95_ratio {bounds['max_p95_ratio']:g})")
        ratio_txt = f", p95 ratio {ratio:.2f} ≤ {bounds['max_p95_ratio']:g}"
    return ("ok", f"within bounds: error rate {errors / n:.1%} ≤ {max_rate:.1%}{ratio_txt}")


def next_step(steps: Sequence[float], step: int, elapsed_s: float, interval_s: float, enough: bool) -> int:
    """The step to be at: the next one once this one has lasted interval_s and was judged."""
    if elapsed_s >= interval_s and enough and step + 1 < len(steps):
        return step + 1
    return step

"""Versions of one model name: hot swap, A/B splits, shadow copies and canaries.

Why this module exists
======================

The engine (``engine.py``) owns which models exist and which are loaded;
this module owns how a model name's requests *without a version* are routed
among its versions, and the operations that change that: ``swap``,
``set_split`` and the canary.  It is its own module because that is a
separate job with its own state, its own lock and its own background tasks,
and mixing it into the engine made the engine twice its size.  The rules
(weighted buckets, sticky keys, input checks, canary verdicts, the restart
rule) are pure functions in ``routing.py``; the state and the flows that
apply them are here; the engine keeps its public methods (``swap``,
``set_split``, ``start_canary``, ``stop_canary``, ``routing``,
``infer(routing_key=...)``) as one-line delegations.

State and locks (one owner each)
================================

* ``Versions`` owns every ``Route`` (a name's split, shadow versions, metric
  output, per-arm metrics, the swap under way, the current or last canary
  and its controller task), ``routed`` (the names whose version-less
  requests go through the router: the hot path's one dict lookup) and
  ``protected`` (both sides of a swap under way, which the engine never
  evicts or expires).
* Routing changes only under ``Versions._lock`` (the route lock), which is
  never held across a load, so a split or a rollback never waits behind a
  slow load.  A swap's switch holds the engine's control lock *and* the route
  lock, control first; nothing takes them in the other order.
* ``ModelEntry.active`` lives in the engine's registry (the engine sets it
  when a name's first version is registered and when the store is restored);
  after start only a swap's switch changes it, through ``set_active``, under
  both locks.
* From the engine this class uses ``VersionHost`` and nothing else: the
  registry read by name (``entry``, ``instance``), ``events``, ``store``,
  ``closing``, the control lock (``control``, ``control_when_settled``),
  ``ensure_loaded``, ``unload_locked``, ``set_active`` (a swap's switch) and
  ``serve`` (one request on one version).  The engine hands it an adapter
  (``engine.EngineForVersions``); no engine private is reached from here.

The flows
=========

Request without a version (``Engine.infer`` → ``infer_routed`` when the name
is in ``routed``): pick the arm (one ``random()`` or one hash of the routing
key, ``routing.Table.choose``), fire the shadow copies (least urgent level,
bounded by ``SHADOW_MAX_INFLIGHT``, answers only counted), serve on the arm,
record the answer in the arm's metrics; an error on a canary arm wakes its
controller.  A version-less request whose version went away before it ran
(swapped out and draining, or unloaded) is routed once more (``reroute``).

Hot swap (``swap``), phases as ``routing()["swap"]["phase"]`` shows them:

1. refused (``Conflict``) while another swap or a live canary holds the name,
   or when the version is already active; else ``route.swap`` is set
   (phase ``loading``) and both versions are protected from eviction;
2. ``loading``: the new version is loaded and warmed beside the old one
   (evicting others if the budget needs it); a failure leaves the old
   serving (``swap_failed`` event, audit row, the error raised);
3. ``switching``: under both locks the store is written first (active
   version, split cleared, audit row: one transaction), then ``entry.active``
   and the split change in one synchronous step;
4. ``draining``: the old version finishes its queued and in-flight work and
   is unloaded (``Engine._unload_locked``); then ``swap_done``.

A/B split (``set_split``): weights, shadow and metric output are checked
(``routing.validate_*``), refused during a swap or a live canary, stored,
then put in force at once (``_apply_split``: a request sees the old table or
the new one, never half of each).  Nothing is loaded; an arm loads on its
first request.

Canary (``start_canary``): the version is loaded first (a failure starts
nothing), then the first step's split is stored and applied and a controller
task (``_canary_loop``) judges the bounds at least every
``routing.check_interval`` and on each error of the canary arm: it steps up
(``_canary_advance``), promotes at 100% through the swap above
(``_canary_promote``) or rolls back (``_canary_end``: share 0 in memory first,
then the store and the event).  ``stop_canary`` aborts it.

Restart rule: ``restore`` brings splits and canaries back from the store by
the rule written in ``routing.py``'s docstring (a running canary resumes at
its step once its version is loaded again, or is rolled back with the
reason); ``resume`` starts the resumed canaries' controllers once the engine
has started; ``stop`` stops the controllers at close without a verdict, so
they resume at the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from random import random
from typing import TYPE_CHECKING, Any, Protocol

from . import routing
from .errors import Conflict, EngineError, InputError, ModelNotFound, ModelUnavailable
from .instance import READY, UNLOADED, UNLOADING, InferResult, ModelInstance
from .routing import DEFAULT_STEPS, Canary
from .store import KEEP
from .tensors import output_mean

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from .events import EventBus
    from .lifecycle import ModelEntry
    from .serving import Inputs
    from .store import Store


class VersionHost(Protocol):
    """What ``Versions`` may ask of the engine: a narrow, typed face instead of its privates."""

    events: EventBus

    @property
    def store(self) -> Store | None: ...

    @property
    def closing(self) -> bool: ...

    def entry(self, name: str) -> ModelEntry | None:
        """The registry's entry for ``name`` (read only: change it through the calls below)."""

    def instance(self, name: str, version: str | None = None) -> ModelInstance:
        """The version (the active one when None); ModelNotFound otherwise."""

    def control(self) -> AbstractAsyncContextManager[Any]:
        """The engine's control lock (residency, routing's switch)."""

    def control_when_settled(self, inst: ModelInstance) -> AbstractAsyncContextManager[Any]:
        """The control lock, at a moment when ``inst`` has no load under way."""

    async def ensure_loaded(self, inst: ModelInstance) -> None: ...

    async def unload_locked(self, inst: ModelInstance) -> None:
        """Unload (drain, free) ``inst``; the caller holds the control lock."""

    def set_active(self, name: str, version: str) -> None:
        """A swap's switch: ``version`` serves the name's version-less requests from now on."""

    async def serve(self, inst: ModelInstance, inputs: Inputs, priority: int | None, timeout_ms: float | None,
                    outputs: Sequence[str] | None, metric: str | None = None) -> InferResult:
        """One request on one version (lazy load, validation, cache, rate limit, queue)."""

log = logging.getLogger("modelconsole.engine")

# dropped (counted in routing()'s "shadow_dropped") rather than queued without bound.
SHADOW_MAX_INFLIGHT = 1024


@dataclass(eq=False)
class Route:
    """A model name's routing beyond "its active version": split, shadow copies,
    a swap under way, a canary, and the per-arm metrics of the router."""

    name: str
    weights: dict[str, float | int] = field(default_factory=dict)  # in the order given; {} = no split
    shadow: tuple[str, ...] = ()
    metric_output: str | None = None
    table: routing.Table | None = None  # the positive weights, compiled; None = no split
    arms: dict[str, routing.ArmStats] = field(default_factory=dict)
    swap: dict[str, Any] | None = None  # {"from", "to", "phase", "started"} while a swap runs
    canary: Canary | None = None  # the current or last canary
    task: asyncio.Task | None = None  # the canary's controller
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # an error on a canary arm: judge now
    shadow_inflight: int = 0
    shadow_dropped: int = 0
    tasks: set = field(default_factory=set)  # shadow copies in flight (held so they are not collected)

    def arm(self, version: str) -> routing.ArmStats:
        arm = self.arms.get(version)
        if arm is None:
            arm = self.arms[version] = routing.ArmStats()
        return arm

    def shown(self) -> bool:
        return bool(self.weights or self.shadow or self.canary is not None or self.swap is not None)


def _metric_mean(res: InferResult, name: str | None) -> float | None:
    """The tracked output's mean: the worker thread computed it, except for a cache hit."""
    if name is None:
        return None
    return res.metric if res.metric is not None else output_mean(res.outputs.get(name))


class Versions:
    """The routing of every model name's version-less requests, and swap, split and canary."""

    def __init__(self, host: VersionHost):
        self._host = host
        self.events = host.events
        self._lock = asyncio.Lock()  # the route lock: every routing change holds it
        self._routes: dict[str, Route] = {}  # names with a split, shadow, swap or canary (current or last)
        self.routed: dict[str, Route] = {}  # the names whose version-less requests go through the router
        self.protected: set[str] = set()  # both sides of a swap under way: never evicted or expired

    @property
    def _store(self) -> Any:
        return self._host.store

    @property
    def _closing(self) -> bool:
        return self._host.closing

    # ------------------------------------------------------------ start / stop

    async def restore(self) -> list[Route]:
        """Splits and canaries from the store, by the restart rule in routing.py's docstring.
        Returns the routes whose canary resumes (their controllers start with the engine)."""
        splits = await self._store.splits()
        canaries = await self._store.canaries()
        resume = []
        for name in sorted(set(splits) | set(canaries)):
            entry = self._host.entry(name)
            if entry is None:
                continue  # the model itself is gone (its restore already said why)
            route = self._route(name)
            stored = splits.get(name) or {"weights": {}, "shadow": [], "metric_output": None}
            weights = {str(v): w for v, w in (stored.get("weights") or {}).items() if str(v) in entry.versions}
            shadow = [str(v) for v in stored.get("shadow") or [] if str(v) in entry.versions]
            gone = sorted({str(v) for v in (stored.get("weights") or {})} - set(weights)
                          | {str(v) for v in stored.get("shadow") or []} - set(shadow))
            if gone:
                self.events.publish("restore_failed", f"{name}: the stored split names versions that are no "
                                    f"longer registered ({', '.join(gone)}); they were left out",
                                    model=name, level="warning")
            if not any(w > 0 for w in weights.values()):
                weights = {}
            canary = None
            if name in canaries:
                try:
                    canary = routing.Canary.from_dict(canaries[name])
                except (KeyError, TypeError, ValueError) as e:
                    self.events.publish("restore_failed", f"{name}: the stored canary could not be read: {e}",
                                        model=name, level="error")
            if canary is not None and canary.live:
                canary.state = routing.RUNNING  # "promoting" had not switched yet: the same step again
                why = None
                if canary.version not in entry.versions:
                    why = f"its version {canary.version} is no longer registered after a restart"
                elif canary.baseline not in entry.versions:
                    why = f"its baseline version {canary.baseline} is no longer registered after a restart"
                elif entry.active != canary.baseline:
                    why = (f"its baseline version {canary.baseline} is no longer the active version "
                           f"({entry.active}) after a restart")
                weights = {}  # a resuming canary applies its share once its version is loaded again
                if why is None:
                    canary.step_mono = None
                    resume.append(route)
                else:
                    canary.state, canary.share, canary.reason = routing.ROLLED_BACK, 0, why
                    await self._store.update_routing(
                        name, "restart", "canary_rollback", canary.version, {"reason": why},
                        split=self._split_record(weights, shadow, stored.get("metric_output")),
                        canary=canary.to_dict(), result="rolled_back", detail=why)
                    self.events.publish("canary_rolled_back", f"{name}: canary of version {canary.version} "
                                        f"rolled back: {why}", model=name, version=canary.version,
                                        level="error", data={"reason": why, "canary": canary.to_dict()})
            route.canary = canary
            self._apply_split(route, weights, shadow, stored.get("metric_output"))
        return resume

    def resume(self, routes: Sequence[Route]) -> None:
        """Start the controllers of the canaries ``restore`` resumed (the engine has started)."""
        loop = asyncio.get_running_loop()
        for route in routes:
            if route.canary is not None:  # restore resumes only routes with a canary
                route.task = loop.create_task(self._canary_loop(route, route.canary))

    async def stop(self, timeout: float) -> None:
        """At close: canary controllers stop where they are, with no verdict (their state stays
        stored: they resume at the next start).  Those still running after ``timeout`` are cancelled."""
        for route in self._routes.values():
            route.wake.set()
        controllers = [r.task for r in self._routes.values() if r.task is not None and not r.task.done()]
        if controllers:
            _, pending = await asyncio.wait(controllers, timeout=timeout)
            for task in pending:
                task.cancel()

    async def wait_shadows(self, timeout: float = 5.0) -> None:
        """At close, after every model drained: let the shadow copies' tasks finish."""
        shadows = [t for r in self._routes.values() for t in r.tasks]
        if shadows:  # their requests were answered by the drain; the tasks only record the answers
            await asyncio.wait(shadows, timeout=timeout)

    # ------------------------------------------------------------ observation

    def snapshot(self) -> dict[str, Any]:
        """Every name whose routing is more than "its active version" (split, shadow, swap, canary)."""
        return {n: self.routing(n) for n in sorted(self._routes) if self._routes[n].shown()}

    # ------------------------------------------------------------ swap, split, canary

    def _entry(self, name: str) -> ModelEntry:
        entry = self._host.entry(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return entry

    @staticmethod
    def _version_of(entry: ModelEntry, version: str, field: str = "version") -> ModelInstance:
        inst = entry.versions.get(version)
        if inst is None:
            known = ", ".join(sorted(entry.versions, key=int))
            raise ModelNotFound(f"{field}: model '{entry.name}' has no version '{version}' (versions: {known})")
        return inst

    def _route(self, name: str) -> Route:
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = Route(name)
        return route

    def _apply_split(self, route: Route, weights: Mapping[str, float | int], shadow: Sequence[str],
                     metric_output: str | None, *, reset_arms: bool = False, keep_arms: bool = False) -> None:
        """Put weights/shadow in force (route lock held, or at start).  Synchronous: a request
        sees the old routing or the new one, never half of each."""
        route.weights = dict(weights)
        route.shadow = tuple(shadow)
        route.metric_output = metric_output
        route.table = routing.Table(weights) if weights else None
        if reset_arms:
            route.arms = {}
        elif not keep_arms:
            keep = set(weights) | set(shadow)
            active = self._entry(route.name).active
            if not weights and active is not None:
                keep.add(active)
            route.arms = {v: a for v, a in route.arms.items() if v in keep}
        if route.table is not None or route.shadow:
            self.routed[route.name] = route
        else:
            self.routed.pop(route.name, None)

    @staticmethod
    def _split_record(weights: Mapping[str, Any], shadow: Sequence[str],
                      metric_output: str | None) -> dict[str, Any] | None:
        """What the store keeps for a split (None: nothing to keep)."""
        if not weights and not shadow:
            return None
        return {"weights": dict(weights), "shadow": list(shadow), "metric_output": metric_output}

    def _check_free(self, name: str, doing: str) -> None:
        """Conflict while a swap or a live canary holds the name's routing (route lock held)."""
        route = self._routes.get(name)
        if route is None:
            return
        if route.swap is not None:
            raise Conflict(f"model '{name}': a swap from version {route.swap['from']} to {route.swap['to']} "
                           f"is in progress ({route.swap['phase']}); {doing} after it ends")
        c = route.canary
        if c is not None and c.live:
            raise Conflict(f"model '{name}': a canary of version {c.version} is {c.state} (step {c.step + 1} of "
                           f"{len(c.steps)}, {c.share}% of traffic); stop it before you {doing}")

    def holds(self, name: str, version: str | None = None) -> str | None:
        """Why the name's routing needs ``version`` (None: any of its versions) — a swap under
        way, a live canary, a split, a shadow — or None: what a delete must hear first."""
        route = self._routes.get(name)
        if route is None:
            return None
        sw = route.swap
        if sw is not None and (version is None or version in (sw["from"], sw["to"])):
            return f"a swap from version {sw['from']} to {sw['to']} is in progress"
        c = route.canary
        if c is not None and c.live and (version is None or version in (c.version, c.baseline)):
            return f"a canary of version {c.version} over version {c.baseline} is {c.state}"
        if version is None:
            if route.weights or route.shadow:
                return "it has a split (clear it with PUT …/split {\"weights\": {}})"
            return None
        if route.weights.get(version, 0) > 0:
            return f"it takes {route.weights[version]:g} of the split's weight (change the split first)"
        if version in route.shadow:
            return "it is a shadow arm of the split (change the split first)"
        return None

    def forget(self, name: str, version: str | None = None) -> None:
        """A deleted version (None: the whole name) leaves the routing's records."""
        route = self._routes.get(name)
        if route is None:
            return
        if version is None:
            del self._routes[name]
            self.routed.pop(name, None)
            return
        route.arms.pop(version, None)

    def routing(self, name: str) -> dict[str, Any]:
        """How a model name routes requests without a version, and each arm's metrics."""
        entry = self._entry(name)
        route = self._routes.get(name)
        if route is None:
            return {"name": name, "active": entry.active, "weights": {}, "shadow": [], "metric_output": None,
                    "swap": None, "canary": None, "arms": {}, "shadow_dropped": 0}
        return {
            "name": name,
            "active": entry.active,
            "weights": dict(route.weights),
            "shadow": list(route.shadow),
            "metric_output": route.metric_output,
            "swap": dict(route.swap) if route.swap is not None else None,
            "canary": route.canary.to_dict() if route.canary is not None else None,
            "arms": {v: route.arms[v].to_dict() for v in sorted(route.arms, key=int)},
            "shadow_dropped": route.shadow_dropped,
        }

    async def swap(self, name: str, version: str | int, actor: str = "api") -> dict[str, Any]:
        """Hot swap: load and warm ``version`` beside the active one, switch routing
        atomically, let the old version finish its queued and in-flight work, unload it.

        A new version that fails to load or warm leaves the old one serving: a
        ``swap_failed`` event, and the LoadFailed / InsufficientMemory raised.
        """
        entry = self._entry(name)
        v = routing.version_arg(version)
        new = self._version_of(entry, v)
        async with self._lock:
            self._check_free(name, "swap")
            if entry.active == v:
                raise Conflict(f"version: model '{name}' version {v} is already active")
            route = self._route(name)
            route.swap = {"from": entry.active, "to": v, "phase": "loading", "started": time.time()}
        return await self._swap(entry, route, new, actor)

    async def _swap(self, entry: ModelEntry, route: Route, new: ModelInstance, actor: str,
                    canary: Canary | None = None) -> dict[str, Any]:
        """The swap itself (route.swap already set by the caller, under the route lock)."""
        name = entry.name
        swap = route.swap
        assert swap is not None, "the caller sets route.swap"
        old_v = swap["from"]
        old = entry.versions.get(old_v) if old_v is not None else None
        started = time.monotonic()
        guard = {new.key} | ({old.key} if old is not None else set())
        self.protected |= guard
        data = {"actor": actor, "from": old_v, "to": new.version}
        self.events.publish("swap_started", f"{name}: swap v{old_v} -> v{new.version} started: loading "
                            f"v{new.version} beside v{old_v}", model=name, version=new.version,
                            data=dict(data, phase="loading"))
        try:
            try:
                switched = False
                for _ in range(3):  # an operator may unload the new version between load and switch
                    await self._host.ensure_loaded(new)
                    if swap["phase"] == "loading":
                        swap["phase"] = "switching"
                        self.events.publish("swap_loaded", f"{name}: v{new.version} loaded and warm in "
                                            f"{time.monotonic() - started:.2f}s; switching", model=name,
                                            version=new.version, data=dict(data, phase="switching"))
                    async with self._host.control():
                        if new.state != READY:
                            continue
                        async with self._lock:
                            promoted = None
                            if canary is not None:
                                promoted = dataclasses.replace(
                                    canary, state=routing.PROMOTED, share=100, step=len(canary.steps) - 1,
                                    reason=f"promoted: version {new.version} took all traffic")
                            if self._store is not None:
                                await self._store.update_routing(
                                    name, actor, "swap", new.version, {"from": old_v, "to": new.version},
                                    active=new.version, split=None,
                                    canary=promoted.to_dict() if promoted is not None else KEEP)
                            # the switch: from here a request without a version goes to the new one
                            self._host.set_active(name, new.version)
                            self._apply_split(route, {}, (), None, reset_arms=canary is None, keep_arms=True)
                            if promoted is not None and canary is not None:
                                canary.state, canary.share, canary.step, canary.reason = (
                                    promoted.state, promoted.share, promoted.step, promoted.reason)
                            swap["phase"] = "draining"
                        switched = True
                        break
                if not switched:
                    raise ModelUnavailable(f"model {new.key} was unloaded while the swap was switching to it")
            except Exception as e:
                message = e.message if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
                self.events.publish("swap_failed", f"{name}: swap v{old_v} -> v{new.version} failed; "
                                    f"v{old_v} keeps serving: {message}", model=name, version=new.version,
                                    level="error", data=dict(data, reason=message))
                raise  # Engine.swap writes the failure's audit row
            self.events.publish("swap_switched", f"{name}: requests now go to v{new.version}; v{old_v} finishes "
                                "its queued and in-flight requests", model=name, version=new.version,
                                data=dict(data, phase="draining"))
            if old is not None and old is not new:
                async with self._host.control_when_settled(old):
                    await self._host.unload_locked(old)
        finally:
            self.protected -= guard
            route.swap = None
        seconds = time.monotonic() - started
        self.events.publish("swap_done", f"{name}: swap v{old_v} -> v{new.version} done in {seconds:.2f}s",
                            model=name, version=new.version, data=dict(data, phase="done", seconds=seconds))
        return {"name": name, "from": old_v, "to": new.version, "seconds": seconds}

    async def set_split(self, name: str, weights: Mapping[str, float | int], *, shadow: Sequence[str] | None = None,
                        metric_output: str | None = None, actor: str = "api") -> dict[str, Any]:
        """A/B split: requests without a version are routed by weight among the listed versions;
        ``shadow`` versions get a copy of each routed request (answers recorded, never returned);
        ``metric_output`` is the numeric output whose mean per arm is tracked.  ``{}`` clears the
        weights (back to the active version).  Loads nothing: arms load on their first request."""
        entry = self._entry(name)
        async with self._lock:
            w = routing.validate_weights(name, weights, entry.versions)
            sh = routing.validate_shadow(name, shadow, entry.versions, w, entry.active)
            arms = [v for v, x in w.items() if x > 0] if w else [v for v in (entry.active,) if v is not None]
            mo = routing.validate_metric_output(metric_output, {
                v: [s.name for s in outs] if (outs := entry.versions[v].outputs) else None
                for v in arms + sh})
            self._check_free(name, "change the split")
            record = self._split_record(w, sh, mo)
            params = {"weights": w, "shadow": sh, "metric_output": mo}
            if self._store is not None:
                await self._store.update_routing(name, actor, "split", None, params, split=record)
            self._apply_split(self._route(name), w, sh, mo if record is not None else None)
        if record is None:
            text = "split cleared: requests go to the active version"
        else:
            text = ("split " + ", ".join(f"v{v}={x:g}" for v, x in w.items()) if w else "no split") + \
                (f"; shadow {', '.join('v' + v for v in sh)}" if sh else "")
        self.events.publish("split", f"{name}: {text}", model=name, data=dict(params, actor=actor))
        return self.routing(name)

    async def start_canary(self, name: str, version: str | int, *, steps: Sequence[float] = DEFAULT_STEPS,
                           interval_s: float = 60.0, max_error_rate: float = 0.05, max_p95_ratio: float = 2.0,
                           min_requests: int = 20, actor: str = "api") -> dict[str, Any]:
        """Ramp ``version``'s share of the traffic without a version step by step, rolling
        back the moment a bound is broken and ending in a swap at 100% (routing.py has the rules).
        The version is loaded and warmed first; a load failure is raised and starts nothing."""
        entry = self._entry(name)
        v = routing.version_arg(version)
        plan = routing.validate_canary(steps, interval_s, max_error_rate, max_p95_ratio, min_requests)
        new = self._version_of(entry, v)
        async with self._lock:
            route = self._routes.get(name)
            c = route.canary if route is not None else None
            if c is not None and c.live:
                raise Conflict(f"model '{name}' is already under a canary (version {c.version}, {c.state}, "
                               f"{c.share}% of traffic); stop it first")
            self._check_free(name, "start a canary")
            if entry.active == v:
                raise Conflict(f"version: model '{name}' version {v} is already active; a canary needs another version")
            if route is not None and v in route.shadow:
                raise Conflict(f"version: model '{name}' version {v} receives shadow copies; remove it from the "
                               "split's shadow before a canary")
            route = self._route(name)
            previous = route.canary
            if entry.active is None:
                raise Conflict(f"model '{name}' has no active version for a canary to start from")
            canary = route.canary = Canary(version=v, baseline=entry.active, steps=plan["steps"],
                                           interval_s=plan["interval_s"], bounds=plan["bounds"])
        try:
            await self._host.ensure_loaded(new)
        except EngineError as e:
            async with self._lock:
                if route.canary is canary:
                    route.canary = previous
            self.events.publish("canary_failed", f"{name}: canary of version {v} not started: {e.message}",
                                model=name, version=v, level="error", data={"actor": actor, "reason": e.message})
            raise  # Engine.start_canary writes the failure's audit row
        async with self._lock:
            if canary.state != routing.STARTING:  # stopped while its version loaded
                return self.routing(name)
            now = time.time()
            first = dataclasses.replace(canary, state=routing.RUNNING, step=0, share=canary.steps[0],
                                        started=now, step_started=now)
            try:
                if self._store is not None:
                    await self._store.update_routing(
                        name, actor, "canary_start", v, plan, canary=first.to_dict(),
                        split=self._split_record(first.weights(), route.shadow, route.metric_output))
            except Exception:
                if route.canary is canary:
                    route.canary = previous
                raise
            canary.state, canary.step, canary.share = first.state, first.step, first.share
            canary.started, canary.step_started, canary.step_mono = now, now, time.monotonic()
            self._apply_split(route, canary.weights(), route.shadow, route.metric_output, reset_arms=True)
        self.events.publish("canary_started", f"{name}: canary of version {v} started at {canary.share}% "
                            f"(steps {canary.steps}, {canary.interval_s:g}s each)", model=name, version=v,
                            data={"actor": actor, "canary": canary.to_dict()})
        route.task = asyncio.get_running_loop().create_task(self._canary_loop(route, canary))
        return self.routing(name)

    async def stop_canary(self, name: str, actor: str = "api") -> dict[str, Any]:
        """Abort the canary: its share goes to 0, state "aborted".  Conflict if none is running."""
        self._entry(name)
        async with self._lock:
            route = self._routes.get(name)
            c = route.canary if route is not None else None
            if route is None or c is None or not c.live:
                raise Conflict(f"model '{name}' has no canary running"
                               + (f" (the last one, of version {c.version}, is {c.state})" if c is not None else ""))
            if c.state == routing.PROMOTING:
                raise Conflict(f"model '{name}': the canary of version {c.version} is being promoted (a swap is "
                               "under way); it can no longer be stopped")
            reason = f"stopped by {actor}"
            stopped = dataclasses.replace(c, state=routing.ABORTED, share=0, reason=reason)
            applied = c.state == routing.RUNNING
            if self._store is not None:
                await self._store.update_routing(
                    name, actor, "canary_abort", c.version, {}, canary=stopped.to_dict(),
                    split=self._split_record({}, route.shadow, route.metric_output) if applied else KEEP)
            c.state, c.share, c.reason = stopped.state, stopped.share, stopped.reason
            if applied:
                self._apply_split(route, {}, route.shadow, route.metric_output, keep_arms=True)
            route.wake.set()
        self.events.publish("canary_aborted", f"{name}: canary of version {c.version} aborted by {actor}; "
                            "requests go to the active version", model=name, version=c.version,
                            level="warning", data={"actor": actor, "canary": c.to_dict()})
        return self.routing(name)

    async def _canary_loop(self, route: Route, canary: Canary) -> None:
        """The controller of one canary: judge the bounds, step up, promote or roll back."""
        name = route.name
        try:
            if canary.step_mono is None:  # resumed after a restart: its version first, then its share
                inst = self._entry(name).versions[canary.version]
                try:
                    await self._host.ensure_loaded(inst)
                except EngineError as e:
                    await self._canary_end(route, canary, routing.ROLLED_BACK,
                                           f"its version could not be loaded again after a restart: {e.message}")
                    return
                async with self._lock:
                    if canary.state != routing.RUNNING or self._closing:
                        return
                    canary.step_started, canary.step_mono = time.time(), time.monotonic()
                    self._apply_split(route, canary.weights(), route.shadow, route.metric_output, reset_arms=True)
                self.events.publish("canary_resumed", f"{name}: canary of version {canary.version} resumed at "
                                    f"step {canary.step + 1} of {len(canary.steps)} ({canary.share}%)",
                                    model=name, version=canary.version, data={"canary": canary.to_dict()})
            check = routing.check_interval(canary.interval_s)
            while canary.state == routing.RUNNING and not self._closing:
                if canary.share >= 100:
                    await self._canary_promote(route, canary)
                    return
                left = canary.step_mono + canary.interval_s - time.monotonic()
                route.wake.clear()
                try:
                    await asyncio.wait_for(route.wake.wait(), min(check, left) if left > 0 else check)
                except TimeoutError:
                    pass
                if canary.state != routing.RUNNING or self._closing:
                    return
                arm = route.arm(canary.version).to_dict()
                base = route.arm(canary.baseline).to_dict()
                verdict, reason = routing.canary_verdict(arm, base, canary.bounds)
                canary.reason = reason
                if verdict == "rollback":
                    await self._canary_end(route, canary, routing.ROLLED_BACK, reason)
                    return
                step = routing.next_step(canary.steps, canary.step, time.monotonic() - canary.step_mono,
                                         canary.interval_s, routing.enough_evidence(arm, base, canary.bounds))
                if step != canary.step:
                    if canary.steps[step] >= 100:
                        await self._canary_promote(route, canary)
                        return
                    await self._canary_advance(route, canary, step, reason)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken controller must not leave a canary half-ramped
            log.exception("canary controller of %s failed", name)
            await self._canary_end(route, canary, routing.ROLLED_BACK, f"the canary controller failed: {e}")

    async def _canary_advance(self, route: Route, canary: Canary, step: int, reason: str) -> None:
        name = route.name
        async with self._lock:
            if canary.state != routing.RUNNING or self._closing:
                return
            now = time.time()
            nxt = dataclasses.replace(canary, step=step, share=canary.steps[step], step_started=now, reason=reason)
            if self._store is not None:
                await self._store.update_routing(
                    name, "canary", "canary_step", canary.version, {"step": step, "share": nxt.share},
                    canary=nxt.to_dict(), split=self._split_record(nxt.weights(), route.shadow, route.metric_output))
            canary.step, canary.share, canary.step_started, canary.step_mono = step, nxt.share, now, time.monotonic()
            self._apply_split(route, canary.weights(), route.shadow, route.metric_output, reset_arms=True)
        self.events.publish("canary_step", f"{name}: canary of version {canary.version} at {canary.share}% "
                            f"(step {step + 1} of {len(canary.steps)}): {reason}", model=name,
                            version=canary.version, data={"canary": canary.to_dict()})

    async def _canary_promote(self, route: Route, canary: Canary) -> None:
        """The last step: the normal swap path makes the canary the active version."""
        entry = self._entry(route.name)
        async with self._lock:
            if canary.state != routing.RUNNING or self._closing:
                return
            canary.state = routing.PROMOTING
            route.swap = {"from": entry.active, "to": canary.version, "phase": "loading", "started": time.time()}
        try:
            await self._swap(entry, route, entry.versions[canary.version], "canary", canary)
        except Exception as e:  # noqa: BLE001 - the swap said why in its own event; the canary ends
            canary.state = routing.RUNNING
            message = e.message if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            await self._canary_end(route, canary, routing.ROLLED_BACK, f"the promotion swap failed: {message}")
            return
        self.events.publish("canary_promoted", f"{route.name}: canary of version {canary.version} promoted: "
                            "it is the active version", model=route.name, version=canary.version,
                            data={"canary": canary.to_dict()})

    async def _canary_end(self, route: Route, canary: Canary, state: str, reason: str) -> None:
        """The controller's rollback: share to 0 at once (in memory first: stop sending traffic to
        a bad version before anything else), then the store and the event."""
        if self._closing:
            return  # shutting down is not a verdict: the canary resumes at the next start
        async with self._lock:
            if canary.state not in (routing.RUNNING, routing.STARTING):
                return
            applied = canary.state == routing.RUNNING
            canary.state, canary.share, canary.reason = state, 0, reason
            if applied:
                self._apply_split(route, {}, route.shadow, route.metric_output, keep_arms=True)
            if self._store is not None:
                try:
                    await self._store.update_routing(
                        route.name, "canary", "canary_rollback", canary.version, {"reason": reason},
                        canary=canary.to_dict(), result="rolled_back", detail=reason,
                        split=self._split_record({}, route.shadow, route.metric_output))
                except Exception:  # noqa: BLE001 - the rollback stands; a restart would judge it again
                    log.exception("could not store the rollback of %s's canary", route.name)
        self.events.publish("canary_rolled_back", f"{route.name}: canary of version {canary.version} rolled back: "
                            f"{reason}", model=route.name, version=canary.version, level="error",
                            data={"reason": reason, "canary": canary.to_dict()})

    # ------------------------------------------------------------ request path

    def moved_on(self, name: str, inst: ModelInstance) -> bool:
        """A version-less request was routed to inst, and before it ran inst went away
        (swapped out and draining, or unloaded) while routing moved on: it may go again."""
        entry = self._host.entry(name)
        return (not self._closing and entry is not None and entry.active != inst.version
                and inst.state in (UNLOADING, UNLOADED))

    async def reroute(self, name: str, inputs: Inputs, priority: int | None,
                      timeout_ms: float | None, outputs: Sequence[str] | None,
                      routing_key: str | None) -> InferResult:
        """Route a request that never ran once more (once: no further rerouting)."""
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        route = self.routed.get(name)
        if route is not None:
            return await self.infer_routed(route, inputs, priority, timeout_ms, outputs, routing_key, False)
        inst = self._host.instance(name, None)
        try:
            return await self._host.serve(inst, inputs, priority, timeout_ms, outputs)
        except EngineError as e:
            inst.stats.fail(e.kind)
            raise

    async def infer_routed(self, route: Route, inputs: Inputs, priority: int | None,
                           timeout_ms: float | None, outputs: Sequence[str] | None,
                           routing_key: str | None, may_reroute: bool = True) -> InferResult:
        """A version-less request on a name with a split and/or shadows: pick the arm (one
        random() or one hash), send the shadow copies, record the answer in the arm's metrics."""
        name = route.name
        entry = self._entry(name)
        table = route.table
        if table is None:
            v = entry.active
        elif routing_key is None:
            v = table.choose(random())
        elif isinstance(routing_key, str):
            v = table.choose(routing.sticky_u(name, routing_key))
        else:
            raise InputError(f"routing_key: expected a string, got {type(routing_key).__name__}")
        if v is None:
            raise ModelUnavailable(f"model '{name}' has no active version")
        inst = entry.versions[v]
        if route.shadow:
            for s in route.shadow:
                if s != v:
                    self._send_shadow(route, entry, s, inputs, timeout_ms)
        arm = route.arms.get(v) or route.arm(v)
        t0 = time.monotonic()
        try:
            res = await self._host.serve(inst, inputs, priority, timeout_ms, outputs, route.metric_output)
        except EngineError as e:
            if may_reroute and type(e) is ModelUnavailable and self.moved_on(name, inst):
                return await self.reroute(name, inputs, priority, timeout_ms, outputs, routing_key)
            inst.stats.fail(e.kind)
            arm.fail()
            if route.canary is not None:
                route.wake.set()  # the controller judges the error rate now, not at its next tick
            raise
        arm.ok(time.monotonic() - t0, _metric_mean(res, route.metric_output))
        return res

    def _send_shadow(self, route: Route, entry: ModelEntry, version: str, inputs: Inputs,
                     timeout_ms: float | None) -> None:
        """Fire a copy of the request at a shadow version; the caller does not wait for it."""
        inst = entry.versions.get(version)
        if inst is None:
            return
        if route.shadow_inflight >= SHADOW_MAX_INFLIGHT:
            route.shadow_dropped += 1
            return
        route.shadow_inflight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(route, inst, inputs, timeout_ms))
        route.tasks.add(task)
        task.add_done_callback(route.tasks.discard)

    async def _shadow(self, route: Route, inst: ModelInstance, inputs: Inputs,
                      timeout_ms: float | None) -> None:
        """A shadow copy: its answer goes to the arm's metrics, its error too, nowhere else."""
        arm = route.arm(inst.version)
        t0 = time.monotonic()
        try:
            # the least urgent level: a copy never overtakes real traffic
            res = await self._host.serve(inst, inputs, inst.cfg.priority_levels, timeout_ms, None,
                                            route.metric_output)
        except EngineError as e:
            inst.stats.fail(e.kind)
            arm.fail()
        except Exception:  # noqa: BLE001 - a shadow's failure must never surface anywhere but its metrics
            arm.fail()
        else:
            arm.ok(time.monotonic() - t0, _metric_mean(res, route.metric_output))
        finally:
            route.shadow_inflight -= 1


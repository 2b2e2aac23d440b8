"""The engine: the one owner of which models exist, which are loaded and where requests go.

Control calls (register, load, unload) mutate residency and routing only
under ``self._control`` (one asyncio lock), and a read that gates a
mutation happens inside the same critical section.  Requests never take that
lock: ``infer`` looks the model up, validates and queues in a few
microseconds, and the model's worker thread does the torch work.

What the operator changes is written to the store before it is
acknowledged and restored at start (``start``).  The config file is the
baseline; models registered at run time live in the store and layer over it.

Routing (which version answers a request without one: the active version,
an A/B split, a canary's ramp, shadow copies) is changed only under
``self._route_lock``, a second lock that is never held across a load, so a
split or a rollback never waits behind a slow load.  A hot swap's switch (the
store's routing row and ``entry.active``) holds both, ``_control`` first;
nothing takes them in the other order.  The policy (arm choice, sticky keys,
input checks, canary verdicts and the restart rule) is in ``routing.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from random import random

import numpy as np

import torch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import sources
from modelconsole.gpu.devices import DeviceBackend, open_backend

from .config import Config, ConfigError, GpuConfig, ModelConfig, model_from_dict
from .errors import Conflict, EngineError, InputError, ModelNotFound, ModelUnavailable
from .cache import ResultCache
from .events import EventBus, Subscription
from .hosttier import HostTier
from . import policy, routing
from .memory import MemoryManager, weights_estimate
from .shared import SharedDevice
from .instance import FAILED, LOADING, READY, UNLOADED, UNLOADING, WARMING, InferResult, LoadFailed, ModelInstance
from .store import KEEP, Store

log = logging.getLogger("modelconsole.engine")


@dataclass
class ModelEntry:
    """A model name: its versions and the one that serves requests without a version."""

    name: str
    versions: dict[str, ModelInstance] = field(default_factory=dict)
    active: str | None = None
    origin: dict[str, str] = field(default_factory=dict)  # version -> "config" | "store"


# Shadow copies of one model name allowed in flight at once; beyond that a copy is
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
    canary: routing.Canary | None = None  # the current or last canary
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


def _metric_mean(outputs: Mapping[str, Any], name: str) -> float | None:
    """The mean of all elements of one numeric output of an answer (None if it has none)."""
    out = outputs.get(name)
    if out is None:
        return None
    try:
        a = np.asarray(out)
        if a.dtype.kind not in "biuf" or a.size == 0:
            return None
        return float(a.mean())
    except Exception:  # noqa: BLE001 - e.g. BF16, which numpy cannot hold: not tracked
        return None


def _is_oom(e: BaseException) -> bool:
    """A CUDA (or simulated) out-of-memory, possibly wrapped in LoadFailed."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__
    return False


def _expired(inst: ModelInstance, now: float) -> bool:
    """READY, not pinned, idle and past its keep_alive."""
    ka = inst.cfg.keep_alive
    return (ka is not None and inst.state == READY and not inst.pinned and not inst.busy()
            and now - max(inst.last_used, inst.loaded_mono) > ka)


def _warm_process(devices: list[torch.device]) -> None:
    """Pay once, at start, what the first load would otherwise pay and charge to its model's
    measured reload time (which the eviction policy weighs): the lazy imports behind
    ``Module.to_empty`` (sympy, ~1.5 s) and each managed GPU's CUDA context."""
    torch.nn.Linear(1, 1, device="meta").to_empty(device="cpu")
    for device in devices:
        torch.empty(1, device=device)


class Engine:
    def __init__(
        self,
        store: Store | None = None,
        *,
        model_roots: Sequence[str] = (),
        base_dir: str | None = None,
        default_device: str = "auto",
        cache_bytes: int = 256 * 2**20,
        gpu: GpuConfig | None = None,
        backend: DeviceBackend | None = None,
        tick_s: float = 1.0,
    ):
        self.store = store
        self.gpu = gpu if gpu is not None else GpuConfig(default_device=default_device)
        if gpu is not None:
            default_device = gpu.default_device
        self.base_dir = str(Path(base_dir or ".").resolve())
        self.model_roots = tuple(model_roots) or (self.base_dir,)
        self.default_device = default_device
        self.events = EventBus()
        self.cache = ResultCache(cache_bytes)
        self.backend = backend if backend is not None else open_backend(self.gpu.simulate)
        self.memory = MemoryManager(self.backend, self.gpu, self.events)
        self.host_tier = HostTier(int(self.gpu.host_tier_gib * 2**30))
        self.shared = {i: SharedDevice(i, self.gpu.device_slots) for i in self.memory.budgets}
        self.tick_s = tick_s
        self._janitor: asyncio.Task | None = None
        self._models: dict[str, ModelEntry] = {}
        self._control = asyncio.Lock()
        self._route_lock = asyncio.Lock()
        self._routes: dict[str, Route] = {}  # names with a split, shadow, swap or canary (current or last)
        self._routed: dict[str, Route] = {}  # the names whose version-less requests go through the router
        self._protected: set[str] = set()  # both sides of a swap under way: never evicted or expired
        self._closing = False
        self._started = False

    # ------------------------------------------------------------ start / stop

    @classmethod
    def from_config(cls, config: Config, store: Store | None = None) -> "Engine":
        base = str(Path(config.path).resolve().parent) if config.path else None
        return cls(store, model_roots=config.model_roots, base_dir=base, cache_bytes=config.cache.max_bytes,
                   gpu=config.gpu)

    async def start(self, models: Iterable[ModelConfig] = ()) -> None:
        """Register the config's models, then restore what the store holds."""
        if self.store is not None and self.store._db is None:
            await self.store.open()
        for cfg in models:
            await self._add(cfg, "config")
        if self.store is not None:
            for raw in await self.store.models():
                label = f"stored model {raw.get('name')} v{raw.get('version')}"
                try:
                    cfg = model_from_dict(raw, "store", self.base_dir, self.model_roots)
                except ConfigError as e:
                    self.events.publish("restore_failed", f"{label} could not be restored: {e}", level="error")
                    continue
                entry = self._models.get(cfg.name)
                if entry is not None and cfg.version in entry.versions:
                    self.events.publish("restore_skipped",
                                        f"{label} is also in the config file; the config file's definition wins",
                                        model=cfg.name, version=cfg.version, level="warning")
                    continue
                try:
                    await self._add(cfg, "store")
                except EngineError as e:
                    self.events.publish("restore_failed", f"{label} could not be restored: {e.message}",
                                        model=cfg.name, version=cfg.version, level="error")
            for name, version in (await self.store.routing()).items():
                entry = self._models.get(name)
                if entry is not None and version in entry.versions:
                    entry.active = version
            for name, version in await self.store.pins():
                entry = self._models.get(name)
                if entry is not None and version in entry.versions:
                    entry.versions[version].pinned = True
            for (name, version), prio in (await self.store.priorities()).items():
                entry = self._models.get(name)
                if entry is not None and version in entry.versions:
                    inst = entry.versions[version]
                    if 1 <= prio <= inst.cfg.priority_levels:
                        inst.cfg = dataclasses.replace(inst.cfg, priority=prio)
            resume = await self._restore_routing()
        else:
            resume = []
        cuda = [self.backend.torch_device(i) for i in self.memory.budgets]
        await asyncio.to_thread(_warm_process, [d for d in cuda if d.type == "cuda"])
        self._started = True
        loop = asyncio.get_running_loop()
        self._janitor = loop.create_task(self._janitor_loop())
        for inst in self._instances():
            if inst.pinned:  # a pinned model is kept resident: bring it up now, in the background
                loop.create_task(self._load_quietly(inst))
        for route in resume:  # interrupted canaries pick up where they were (routing.py: restart rule)
            route.task = loop.create_task(self._canary_loop(route, route.canary))
        self.events.publish("started", f"engine started with {sum(len(e.versions) for e in self._models.values())} model versions")

    async def _restore_routing(self) -> list[Route]:
        """Splits and canaries from the store, by the restart rule in routing.py's docstring.
        Returns the routes whose canary resumes (their controllers start with the engine)."""
        splits = await self.store.splits()
        canaries = await self.store.canaries()
        resume = []
        for name in sorted(set(splits) | set(canaries)):
            entry = self._models.get(name)
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
                    await self.store.update_routing(
                        name, "restart", "canary_rollback", canary.version, {"reason": why},
                        split=self._split_record(weights, shadow, stored.get("metric_output")),
                        canary=canary.to_dict(), result="rolled_back", detail=why)
                    self.events.publish("canary_rolled_back", f"{name}: canary of version {canary.version} "
                                        f"rolled back: {why}", model=name, version=canary.version,
                                        level="error", data={"reason": why, "canary": canary.to_dict()})
            route.canary = canary
            self._apply_split(route, weights, shadow, stored.get("metric_output"))
        return resume

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, finish queued and in-flight ones (bounded), free every model."""
        self._closing = True
        if self._janitor is not None:
            self._janitor.cancel()
        # Canary controllers stop where they are (their state stays stored: they resume at the next start).
        for route in self._routes.values():
            route.wake.set()
        controllers = [r.task for r in self._routes.values() if r.task is not None and not r.task.done()]
        if controllers:
            _, pending = await asyncio.wait(controllers, timeout=drain_timeout)
            for task in pending:
                task.cancel()
        # Loads under way finish first (they take the control lock themselves).
        loads = [inst.load_task for e in self._models.values() for inst in e.versions.values()
                 if inst.load_task is not None and not inst.load_task.done()]
        await asyncio.gather(*loads, return_exceptions=True)
        async with self._control:
            await asyncio.gather(
                *(self._unload_locked(inst, drain_timeout, keep=False) for inst in self._instances()),
                return_exceptions=True,
            )
        shadows = [t for r in self._routes.values() for t in r.tasks]
        if shadows:  # their requests were answered by the drain above; let the tasks finish
            await asyncio.wait(shadows, timeout=5.0)
        self.backend.close()
        if self.store is not None:
            await self.store.close()

    async def __aenter__(self) -> "Engine":
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ lookups

    def _instance(self, name: str, version: str | None) -> ModelInstance:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model '{name}'")
        v = version if version is not None else entry.active
        inst = entry.versions.get(v) if v is not None else None
        if inst is None:
            known = ", ".join(sorted(entry.versions, key=int))
            raise ModelNotFound(f"model '{name}' has no version '{v}' (versions: {known})")
        return inst

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def instance(self, name: str, version: str | None = None) -> ModelInstance:
        return self._instance(name, version)

    # ------------------------------------------------------------ control path

    async def register(self, raw: Mapping[str, Any] | ModelConfig, actor: str = "api") -> dict[str, Any]:
        """Register a model or a new version (not loaded).  Written to the store first."""
        if isinstance(raw, ModelConfig):
            cfg = raw
        else:
            raw = dict(raw)
            raw.setdefault("device", self.default_device)
            cfg = model_from_dict(raw, "model", self.base_dir, self.model_roots)
        async with self._control:
            entry = self._models.get(cfg.name)
            if entry is not None and cfg.version in entry.versions:
                raise Conflict(f"model '{cfg.name}' version {cfg.version} is already registered")
            self._check_source(cfg)
            first = entry is None or entry.active is None
            if self.store is not None:
                await self.store.save_model(cfg.to_dict(), actor, cfg.version if first else None)
            inst = self._register(cfg, "store")
        self.events.publish("registered", f"{cfg.name} v{cfg.version} registered from {cfg.source}",
                            model=cfg.name, version=cfg.version, data={"actor": actor})
        return inst.snapshot()

    async def _add(self, cfg: ModelConfig, origin: str) -> None:
        async with self._control:
            self._check_source(cfg)
            self._register(cfg, origin)

    def _check_source(self, cfg: ModelConfig) -> None:
        """Cheap checks before anything is stored: the source exists, inside the roots."""
        try:
            if cfg.source_kind != "zoo":
                sources.resolve_path(cfg)
            inputs, outputs = sources.declared_specs(cfg)
        except sources.SourceError as e:
            raise InputError(f"model '{cfg.name}' version {cfg.version}: {e}") from None
        if cfg.source_kind in ("torchscript", "safetensors") and (inputs is None or outputs is None):
            raise InputError(
                f"model '{cfg.name}': a {cfg.source_kind} source needs inputs and outputs declared "
                '(e.g. inputs = [{ name = "x", datatype = "FP32", shape = [-1, 16] }])'
            )

    def _register(self, cfg: ModelConfig, origin: str) -> ModelInstance:
        entry = self._models.setdefault(cfg.name, ModelEntry(cfg.name))
        inst = ModelInstance(cfg, self.events, self.cache, self.host_tier)
        inst.on_oom = self._make_room_after_oom
        self.cache.invalidate((cfg.name, cfg.version))  # a new definition: old answers are stale
        entry.versions[cfg.version] = inst
        entry.origin[cfg.version] = origin
        if entry.active is None:
            entry.active = cfg.version
        return inst

    async def load(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Load a model version (no-op if READY); raises LoadFailed with the reason."""
        inst = self._instance(name, version)
        try:
            await self._ensure_loaded(inst)
        except EngineError as e:
            await self._audit(actor, "load", inst, "error", e.message)
            raise
        await self._audit(actor, "load", inst)
        return inst.snapshot()

    async def _ensure_loaded(self, inst: ModelInstance) -> None:
        """Start a load or join the one under way: concurrent callers share one load."""
        if inst.state == READY:
            return
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        if inst.load_task is None or inst.load_task.done():
            inst.load_task = asyncio.get_running_loop().create_task(self._load_locked(inst))
        await asyncio.shield(inst.load_task)

    async def _load_locked(self, inst: ModelInstance) -> None:
        async with self._control:
            if inst.state == READY:
                return
            if inst.state not in (UNLOADED, FAILED):
                raise ModelUnavailable(f"model {inst.name} version {inst.version} is {inst.state}")
            await self._load(inst)

    async def _load(self, inst: ModelInstance, need: int | None = None, retried: bool = False) -> None:
        """Place, reserve, load, commit the measured footprint (control lock held).

        An out-of-memory while loading (real or simulated) makes room for
        half as much again and retries once; a second one is the answer.
        """
        targets = self.memory.target_devices(inst.cfg.device)
        if targets is None:  # unmanaged: the CPU
            await inst.load()
            return
        need = need or weights_estimate(inst)
        index = await self.memory.make_room(inst, need, targets, self._evictable, self._evict_locked)
        inst.device_index = index
        inst.shared = self.shared[index]
        try:
            await inst.load(self.memory.torch_device(index))
            self.memory.commit(index, inst, inst.footprint_bytes)
        except Exception as e:  # noqa: BLE001 - undo the reservation, then decide
            if inst.state == READY:  # loaded, but the device refused to hold it (simulated OOM)
                await inst.unload()
            self.memory.forget(index, inst)
            inst.device_index = None
            if not _is_oom(e):
                raise
            if retried:
                inst.state, inst.reason = FAILED, f"out of memory on device {index} after one retry"
                raise LoadFailed(f"model {inst.key} ran out of memory on device {index} twice; "
                                 f"it needs more than {need / 2**30:.2f} GiB") from e
            self.events.publish("oom", f"out of memory loading {inst.key} on device {index}; "
                                f"making room for {1.5 * need / 2**30:.2f} GiB and retrying once",
                                model=inst.name, version=inst.version, level="warning")
            await self._load(inst, int(need * 1.5), retried=True)

    async def _make_room_after_oom(self, inst: ModelInstance) -> None:
        """A forward ran out of memory: evict the lowest keep-value idle model on its device."""
        index = inst.device_index
        if index is None:
            return
        async with self._control:
            now = time.monotonic()
            others = [r for r in self._evictable(index) if r is not inst and r.state == READY]
            plan = policy.plan_eviction([r.residency(now) for r in others], 1, 0, now,
                                        min_residency_s=0.0)
            by_key = {r.key: r for r in others}
            for key in plan.victims if plan is not None else ():
                await self._evict_locked(by_key[key], f"after {inst.key} ran out of memory: {plan.reason}")

    async def _evict_locked(self, inst: ModelInstance, reason: str) -> None:
        self.events.publish("evicted", f"evicted {inst.key} {reason}", model=inst.name, version=inst.version,
                            level="warning", data={"reason": reason})
        await self._unload_locked(inst)

    async def _unload_locked(self, inst: ModelInstance, drain_timeout: float = 30.0, keep: bool = True) -> None:
        freed = inst.footprint_bytes
        await inst.unload(drain_timeout, keep)
        if inst.shared is not None:
            inst.shared.forget(inst)
            inst.shared = None
        if inst.device_index is not None:
            index, inst.device_index = inst.device_index, None
            await self.memory.release(index, inst, freed)

    def _instances(self) -> list[ModelInstance]:
        return [inst for e in self._models.values() for inst in e.versions.values()]

    def _residents(self, index: int) -> list[ModelInstance]:
        """The versions holding (or about to hold) memory on a managed device."""
        return [i for i in self._instances() if i.device_index == index and i.state != UNLOADED]

    def _evictable(self, index: int) -> list[ModelInstance]:
        """The residents a load may evict: all but the two sides of a swap under way."""
        residents = self._residents(index)
        if not self._protected:
            return residents
        return [i for i in residents if i.key not in self._protected]

    async def _load_quietly(self, inst: ModelInstance) -> None:
        """Bring a pinned model up in the background; a refusal becomes an event."""
        try:
            await self._ensure_loaded(inst)
        except LoadFailed:
            pass  # already a load_failed event and the model's state
        except EngineError as e:
            self.events.publish("load_failed", f"pinned {inst.key} could not be loaded: {e.message}",
                                model=inst.name, version=inst.version, level="error")

    async def unload(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Stop routing to a version, let its queued work finish, free its memory."""
        inst = self._instance(name, version)
        async with self._control:
            await self._unload_locked(inst)
        await self._audit(actor, "unload", inst)
        return inst.snapshot()

    async def pin(self, name: str, version: str | None = None, pinned: bool = True,
                  actor: str = "api") -> dict[str, Any]:
        """Keep a version resident (never evicted, never unloaded for idleness), or stop."""
        inst = self._instance(name, version)
        async with self._control:
            if self.store is not None:
                await self.store.set_pin(inst.name, inst.version, pinned, actor)
            inst.pinned = pinned
        self.events.publish("pinned" if pinned else "unpinned", f"{inst.key} {'pinned' if pinned else 'unpinned'}",
                            model=inst.name, version=inst.version, data={"actor": actor})
        if pinned and inst.state == UNLOADED:
            asyncio.get_running_loop().create_task(self._load_quietly(inst))
        return inst.snapshot()

    async def evict(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Free a version's device memory now, as an eviction would: its weights go to the
        host tier (when there is one) so the next request reloads it fast.  A pinned
        version is refused: unpin it first."""
        inst = self._instance(name, version)
        async with self._control:
            if inst.pinned:
                raise Conflict(f"{inst.key} is pinned; unpin it before evicting it")
            if inst.state == UNLOADED:
                raise Conflict(f"{inst.key} is not loaded")
            await self._audit(actor, "evict", inst)
            await self._evict_locked(inst, f"by {actor}")
        return inst.snapshot()

    async def set_priority(self, name: str, version: str | None, priority: Any,
                           actor: str = "api") -> dict[str, Any]:
        """Change a version's base priority (its default queue level and its weight in
        urgency and keep-value).  Stored, so it survives a restart."""
        inst = self._instance(name, version)
        levels = inst.cfg.priority_levels
        if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= levels:
            raise InputError(f"priority: expected an integer from 1 (most urgent) to {levels} "
                             f"(the model's priority_levels), got {priority!r}")
        async with self._control:
            previous = inst.cfg.priority
            if self.store is not None:
                await self.store.set_priority(inst.name, inst.version, priority, previous, actor)
            inst.cfg = dataclasses.replace(inst.cfg, priority=priority)
        self.events.publish("priority", f"{inst.key} base priority {previous} -> {priority}",
                            model=inst.name, version=inst.version,
                            data={"actor": actor, "priority": priority, "previous": previous})
        return inst.snapshot()

    # ------------------------------------------------------------ versions: swap, split, canary

    def _entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
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
            if not weights:
                keep.add(self._models[route.name].active)
            route.arms = {v: a for v, a in route.arms.items() if v in keep}
        if route.table is not None or route.shadow:
            self._routed[route.name] = route
        else:
            self._routed.pop(route.name, None)

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
        async with self._route_lock:
            self._check_free(name, "swap")
            if entry.active == v:
                raise Conflict(f"version: model '{name}' version {v} is already active")
            route = self._route(name)
            route.swap = {"from": entry.active, "to": v, "phase": "loading", "started": time.time()}
        return await self._swap(entry, route, new, actor)

    async def _swap(self, entry: ModelEntry, route: Route, new: ModelInstance, actor: str,
                    canary: routing.Canary | None = None) -> dict[str, Any]:
        """The swap itself (route.swap already set by the caller, under the route lock)."""
        name = entry.name
        old_v = route.swap["from"]
        old = entry.versions.get(old_v) if old_v is not None else None
        started = time.monotonic()
        guard = {new.key} | ({old.key} if old is not None else set())
        self._protected |= guard
        data = {"actor": actor, "from": old_v, "to": new.version}
        self.events.publish("swap_started", f"{name}: swap v{old_v} -> v{new.version} started: loading "
                            f"v{new.version} beside v{old_v}", model=name, version=new.version,
                            data=dict(data, phase="loading"))
        try:
            try:
                switched = False
                for _ in range(3):  # an operator may unload the new version between load and switch
                    await self._ensure_loaded(new)
                    if route.swap["phase"] == "loading":
                        route.swap["phase"] = "switching"
                        self.events.publish("swap_loaded", f"{name}: v{new.version} loaded and warm in "
                                            f"{time.monotonic() - started:.2f}s; switching", model=name,
                                            version=new.version, data=dict(data, phase="switching"))
                    async with self._control:
                        if new.state != READY:
                            continue
                        async with self._route_lock:
                            promoted = None
                            if canary is not None:
                                promoted = dataclasses.replace(
                                    canary, state=routing.PROMOTED, share=100, step=len(canary.steps) - 1,
                                    reason=f"promoted: version {new.version} took all traffic")
                            if self.store is not None:
                                await self.store.update_routing(
                                    name, actor, "swap", new.version, {"from": old_v, "to": new.version},
                                    active=new.version, split=None,
                                    canary=promoted.to_dict() if promoted is not None else KEEP)
                            # the switch: from here a request without a version goes to the new one
                            entry.active = new.version
                            self._apply_split(route, {}, (), None, reset_arms=canary is None, keep_arms=True)
                            if promoted is not None:
                                canary.state, canary.share, canary.step, canary.reason = (
                                    promoted.state, promoted.share, promoted.step, promoted.reason)
                            route.swap["phase"] = "draining"
                        switched = True
                        break
                if not switched:
                    raise ModelUnavailable(f"model {new.key} was unloaded while the swap was switching to it")
            except Exception as e:
                message = e.message if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
                self.events.publish("swap_failed", f"{name}: swap v{old_v} -> v{new.version} failed; "
                                    f"v{old_v} keeps serving: {message}", model=name, version=new.version,
                                    level="error", data=dict(data, reason=message))
                if self.store is not None:
                    try:
                        await self.store.audit(actor, "swap", name, new.version, {"from": old_v, "to": new.version},
                                               "error", message)
                    except Exception:  # noqa: BLE001 - the failure itself is what the caller must see
                        log.exception("could not write the audit row of a failed swap")
                raise
            self.events.publish("swap_switched", f"{name}: requests now go to v{new.version}; v{old_v} finishes "
                                "its queued and in-flight requests", model=name, version=new.version,
                                data=dict(data, phase="draining"))
            if old is not None and old is not new:
                async with self._control:
                    await self._unload_locked(old)
        finally:
            self._protected -= guard
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
        async with self._route_lock:
            w = routing.validate_weights(name, weights, entry.versions)
            sh = routing.validate_shadow(name, shadow, entry.versions, w, entry.active)
            arms = [v for v, x in w.items() if x > 0] if w else [entry.active]
            mo = routing.validate_metric_output(metric_output, {
                v: [s.name for s in entry.versions[v].outputs] if entry.versions[v].outputs else None
                for v in arms + sh})
            self._check_free(name, "change the split")
            record = self._split_record(w, sh, mo)
            params = {"weights": w, "shadow": sh, "metric_output": mo}
            if self.store is not None:
                await self.store.update_routing(name, actor, "split", None, params, split=record)
            self._apply_split(self._route(name), w, sh, mo if record is not None else None)
        if record is None:
            text = "split cleared: requests go to the active version"
        else:
            text = ("split " + ", ".join(f"v{v}={x:g}" for v, x in w.items()) if w else "no split") + \
                (f"; shadow {', '.join('v' + v for v in sh)}" if sh else "")
        self.events.publish("split", f"{name}: {text}", model=name, data=dict(params, actor=actor))
        return self.routing(name)

    async def start_canary(self, name: str, version: str | int, *, steps: Sequence[float] = (5, 25, 50, 100),
                           interval_s: float = 60.0, max_error_rate: float = 0.05, max_p95_ratio: float = 2.0,
                           min_requests: int = 20, actor: str = "api") -> dict[str, Any]:
        """Ramp ``version``'s share of the traffic without a version step by step, rolling
        back the moment a bound is broken and ending in a swap at 100% (routing.py has the rules).
        The version is loaded and warmed first; a load failure is raised and starts nothing."""
        entry = self._entry(name)
        v = routing.version_arg(version)
        plan = routing.validate_canary(steps, interval_s, max_error_rate, max_p95_ratio, min_requests)
        new = self._version_of(entry, v)
        async with self._route_lock:
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
            canary = route.canary = routing.Canary(version=v, baseline=entry.active, steps=plan["steps"],
                                                   interval_s=plan["interval_s"], bounds=plan["bounds"])
        try:
            await self._ensure_loaded(new)
        except EngineError as e:
            async with self._route_lock:
                if route.canary is canary:
                    route.canary = previous
            self.events.publish("canary_failed", f"{name}: canary of version {v} not started: {e.message}",
                                model=name, version=v, level="error", data={"actor": actor, "reason": e.message})
            if self.store is not None:
                await self.store.audit(actor, "canary_start", name, v, plan, "error", e.message)
            raise
        async with self._route_lock:
            if canary.state != routing.STARTING:  # stopped while its version loaded
                return self.routing(name)
            now = time.time()
            first = dataclasses.replace(canary, state=routing.RUNNING, step=0, share=canary.steps[0],
                                        started=now, step_started=now)
            try:
                if self.store is not None:
                    await self.store.update_routing(
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
        async with self._route_lock:
            route = self._routes.get(name)
            c = route.canary if route is not None else None
            if c is None or not c.live:
                raise Conflict(f"model '{name}' has no canary running"
                               + (f" (the last one, of version {c.version}, is {c.state})" if c is not None else ""))
            if c.state == routing.PROMOTING:
                raise Conflict(f"model '{name}': the canary of version {c.version} is being promoted (a swap is "
                               "under way); it can no longer be stopped")
            reason = f"stopped by {actor}"
            stopped = dataclasses.replace(c, state=routing.ABORTED, share=0, reason=reason)
            applied = c.state == routing.RUNNING
            if self.store is not None:
                await self.store.update_routing(
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

    async def _canary_loop(self, route: Route, canary: routing.Canary) -> None:
        """The controller of one canary: judge the bounds, step up, promote or roll back."""
        name = route.name
        try:
            if canary.step_mono is None:  # resumed after a restart: its version first, then its share
                inst = self._models[name].versions[canary.version]
                try:
                    await self._ensure_loaded(inst)
                except EngineError as e:
                    await self._canary_end(route, canary, routing.ROLLED_BACK,
                                           f"its version could not be loaded again after a restart: {e.message}")
                    return
                async with self._route_lock:
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
                except asyncio.TimeoutError:
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

    async def _canary_advance(self, route: Route, canary: routing.Canary, step: int, reason: str) -> None:
        name = route.name
        async with self._route_lock:
            if canary.state != routing.RUNNING or self._closing:
                return
            now = time.time()
            nxt = dataclasses.replace(canary, step=step, share=canary.steps[step], step_started=now, reason=reason)
            if self.store is not None:
                await self.store.update_routing(
                    name, "canary", "canary_step", canary.version, {"step": step, "share": nxt.share},
                    canary=nxt.to_dict(), split=self._split_record(nxt.weights(), route.shadow, route.metric_output))
            canary.step, canary.share, canary.step_started, canary.step_mono = step, nxt.share, now, time.monotonic()
            self._apply_split(route, canary.weights(), route.shadow, route.metric_output, reset_arms=True)
        self.events.publish("canary_step", f"{name}: canary of version {canary.version} at {canary.share}% "
                            f"(step {step + 1} of {len(canary.steps)}): {reason}", model=name,
                            version=canary.version, data={"canary": canary.to_dict()})

    async def _canary_promote(self, route: Route, canary: routing.Canary) -> None:
        """The last step: the normal swap path makes the canary the active version."""
        entry = self._models[route.name]
        async with self._route_lock:
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

    async def _canary_end(self, route: Route, canary: routing.Canary, state: str, reason: str) -> None:
        """The controller's rollback: share to 0 at once (in memory first: stop sending traffic to
        a bad version before anything else), then the store and the event."""
        if self._closing:
            return  # shutting down is not a verdict: the canary resumes at the next start
        async with self._route_lock:
            if canary.state not in (routing.RUNNING, routing.STARTING):
                return
            applied = canary.state == routing.RUNNING
            canary.state, canary.share, canary.reason = state, 0, reason
            if applied:
                self._apply_split(route, {}, route.shadow, route.metric_output, keep_arms=True)
            if self.store is not None:
                try:
                    await self.store.update_routing(
                        route.name, "canary", "canary_rollback", canary.version, {"reason": reason},
                        canary=canary.to_dict(), result="rolled_back", detail=reason,
                        split=self._split_record({}, route.shadow, route.metric_output))
                except Exception:  # noqa: BLE001 - the rollback stands; a restart would judge it again
                    log.exception("could not store the rollback of %s's canary", route.name)
        self.events.publish("canary_rolled_back", f"{route.name}: canary of version {canary.version} rolled back: "
                            f"{reason}", model=route.name, version=canary.version, level="error",
                            data={"reason": reason, "canary": canary.to_dict()})

    async def _janitor_loop(self) -> None:
        """Every tick: fold request counts into rates; unload models idle past keep_alive."""
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            for inst in self._instances():
                inst.tick(now)
                if _expired(inst, now) and inst.key not in self._protected:
                    async with self._control:
                        # re-read under the lock that gates the unload
                        if _expired(inst, now) and inst.key not in self._protected:
                            idle = now - max(inst.last_used, inst.loaded_mono)
                            self.events.publish("expired", f"{inst.key} idle for {idle:.0f}s (keep_alive "
                                                f"{inst.cfg.keep_alive:g}s): unloading",
                                                model=inst.name, version=inst.version)
                            await self._unload_locked(inst)

    async def _audit(self, actor: str, action: str, inst: ModelInstance, result: str = "ok",
                     detail: str | None = None) -> None:
        if self.store is not None:
            await self.store.audit(actor, action, inst.name, inst.version, {}, result, detail)

    # ------------------------------------------------------------ request path

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        priority: int | None = None,
        timeout_ms: float | None = None,
        outputs: Sequence[str] | None = None,
        routing_key: str | None = None,
    ) -> InferResult:
        """Answer one request: a result, or an EngineError saying exactly what went wrong.

        A request for a registered but unloaded version loads it first (the
        request waits; requests to other models keep flowing).  Without a
        version, a name with a split (or canary) picks an arm by weight,
        sticky per ``routing_key``; an explicit version ignores the split.
        The answer's ``version`` says which version served it.
        """
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        if version is None:
            route = self._routed.get(name)
            if route is not None:
                return await self._infer_routed(route, inputs, priority, timeout_ms, outputs, routing_key)
        if routing_key is not None and not isinstance(routing_key, str):
            raise InputError(f"routing_key: expected a string, got {type(routing_key).__name__}")
        inst = self._instance(name, version)
        try:
            return await self._serve(inst, inputs, priority, timeout_ms, outputs)
        except EngineError as e:
            if version is None and type(e) is ModelUnavailable and self._moved_on(name, inst):
                return await self._reroute(name, inputs, priority, timeout_ms, outputs, routing_key)
            inst.stats.fail(e.kind)  # every failed answer is counted here, once, by kind
            raise

    async def _serve(self, inst: ModelInstance, inputs: Mapping[str, Any], priority: int | None,
                     timeout_ms: float | None, outputs: Sequence[str] | None) -> InferResult:
        """One request on one version: lazy load, validation, cache, rate limit, queue."""
        if inst.state != READY:
            if inst.state not in (UNLOADED, LOADING, WARMING):
                raise inst.unavailable()
            await self._ensure_loaded(inst)  # lazy load, or join the one under way
        req = inst.prepare(inputs, priority, timeout_ms, outputs, time.monotonic())
        if inst.cache is not None:
            hit = inst.cached(req)
            if hit is not None:
                return hit
        if inst.limiter is not None:
            await inst.limiter.admit(req.deadline, inst.name)
        return await inst.enqueue(req)

    def _moved_on(self, name: str, inst: ModelInstance) -> bool:
        """A version-less request was routed to inst, and before it ran inst went away
        (swapped out and draining, or unloaded) while routing moved on: it may go again."""
        entry = self._models.get(name)
        return (not self._closing and entry is not None and entry.active != inst.version
                and inst.state in (UNLOADING, UNLOADED))

    async def _reroute(self, name: str, inputs: Mapping[str, Any], priority: int | None,
                       timeout_ms: float | None, outputs: Sequence[str] | None,
                       routing_key: str | None) -> InferResult:
        """Route a request that never ran once more (once: no further rerouting)."""
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        route = self._routed.get(name)
        if route is not None:
            return await self._infer_routed(route, inputs, priority, timeout_ms, outputs, routing_key, False)
        inst = self._instance(name, None)
        try:
            return await self._serve(inst, inputs, priority, timeout_ms, outputs)
        except EngineError as e:
            inst.stats.fail(e.kind)
            raise

    async def _infer_routed(self, route: Route, inputs: Mapping[str, Any], priority: int | None,
                            timeout_ms: float | None, outputs: Sequence[str] | None,
                            routing_key: str | None, may_reroute: bool = True) -> InferResult:
        """A version-less request on a name with a split and/or shadows: pick the arm (one
        random() or one hash), send the shadow copies, record the answer in the arm's metrics."""
        name = route.name
        entry = self._models[name]
        table = route.table
        if table is None:
            v = entry.active
        elif routing_key is None:
            v = table.choose(random())
        elif isinstance(routing_key, str):
            v = table.choose(routing.sticky_u(name, routing_key))
        else:
            raise InputError(f"routing_key: expected a string, got {type(routing_key).__name__}")
        inst = entry.versions[v]
        if route.shadow:
            for s in route.shadow:
                if s != v:
                    self._send_shadow(route, entry, s, inputs, timeout_ms)
        arm = route.arms.get(v) or route.arm(v)
        t0 = time.monotonic()
        try:
            res = await self._serve(inst, inputs, priority, timeout_ms, outputs)
        except EngineError as e:
            if may_reroute and type(e) is ModelUnavailable and self._moved_on(name, inst):
                return await self._reroute(name, inputs, priority, timeout_ms, outputs, routing_key)
            inst.stats.fail(e.kind)
            arm.fail()
            if route.canary is not None:
                route.wake.set()  # the controller judges the error rate now, not at its next tick
            raise
        metric = route.metric_output
        arm.ok(time.monotonic() - t0, _metric_mean(res.outputs, metric) if metric is not None else None)
        return res

    def _send_shadow(self, route: Route, entry: ModelEntry, version: str, inputs: Mapping[str, Any],
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

    async def _shadow(self, route: Route, inst: ModelInstance, inputs: Mapping[str, Any],
                      timeout_ms: float | None) -> None:
        """A shadow copy: its answer goes to the arm's metrics, its error too, nowhere else."""
        arm = route.arm(inst.version)
        t0 = time.monotonic()
        try:
            # the least urgent level: a copy never overtakes real traffic
            res = await self._serve(inst, inputs, inst.cfg.priority_levels, timeout_ms, None)
        except EngineError as e:
            inst.stats.fail(e.kind)
            arm.fail()
        except Exception:  # noqa: BLE001 - a shadow's failure must never surface anywhere but its metrics
            arm.fail()
        else:
            metric = route.metric_output
            arm.ok(time.monotonic() - t0, _metric_mean(res.outputs, metric) if metric is not None else None)
        finally:
            route.shadow_inflight -= 1

    # ------------------------------------------------------------ observation

    @property
    def accepting(self) -> bool:
        """Started and not shutting down: what a readiness probe asks."""
        return self._started and not self._closing

    def snapshot_models(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every version's snapshot (of one model name, or all), by name then version."""
        names = sorted(self._models) if name is None else [name] if name in self._models else []
        models = []
        for n in names:
            entry = self._models[n]
            for v in sorted(entry.versions, key=int):
                snap = entry.versions[v].snapshot()
                snap["active"] = v == entry.active
                snap["origin"] = entry.origin[v]
                models.append(snap)
        return models

    def snapshot(self) -> dict[str, Any]:
        """Everything an observer shows: every version's state, queue, memory and counters."""
        models = self.snapshot_models()
        return {"models": models, "cache": self.cache.to_dict(), "devices": [dict(d, slots=self.shared[d["index"]].to_dict())
                            for d in self.memory.snapshot(self._residents)],
                "host_tier": self.host_tier.to_dict(),
                "routing": {n: self.routing(n) for n in sorted(self._routes) if self._routes[n].shown()}}

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        """Discrete events (registered, loading, loaded, load_failed, unloaded, model_error, ...)."""
        return self.events.subscribe(maxsize)

    async def audit_log(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return await self.store.audit_log(limit, model) if self.store is not None else []

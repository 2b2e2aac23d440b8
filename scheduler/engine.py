"""The engine: the one owner of which models exist, which are loaded and where requests go.

Control calls (register, load, unload) mutate residency and routing only
under ``self._control`` (one asyncio lock), and a read that gates a
mutation happens inside the same critical section.  A load decides under it
(placement, evictions, the reservation) and commits under it (the measured
footprint), but reads its weights outside it: the reservation keeps every
other decision off that memory, so other models' loads, unloads and pins do
not wait for a slow file.  Until its load has ended a model is nobody's to
evict or unload (``_evictable``, ``_control_when_settled``).  Requests never
take that lock: ``infer`` looks the model up, validates and queues in a few
microseconds, and the model's worker thread does the torch work.

What the operator changes is written to the store before it is
acknowledged and restored at start (``start``).  The config file is the
baseline; models registered at run time live in the store and layer over it.

Routing (which version answers a request without one: the active version,
an A/B split, a canary's ramp, shadow copies) and the operations that change
it (hot swap, split, canary) are ``versions.py``'s: ``self.versions`` owns
that state and its lock, and the engine's ``swap``, ``set_split``,
``start_canary``, ``stop_canary`` and ``routing`` hand over to it.  The
engine calls it on the request path only for names with a split or shadows
(one dict lookup) and for a request whose version went away before it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelconsole.gpu.devices import DeviceBackend, open_backend

from . import policy, processwide, replicas, running, sources
from .audited import audits_failures
from .cache import ResultCache
from .config import Config, ConfigError, GpuConfig, HostConfig, ModelConfig, model_from_dict
from .enginehost import EngineForVersions
from .errors import Conflict, EngineError, Forbidden, InputError, ModelNotFound, ModelUnavailable
from .events import EventBus, Subscription
from .hostmem import HostMemory
from .hosttier import HostTier
from .instance import (
    FAILED,
    READY,
    UNLOADED,
    InferResult,
    LoadFailed,
    ModelInstance,
    resolve_device,
)
from .lifecycle import (
    REPLICA_RETRY_MAX_S,
    REPLICA_RETRY_S,
    ModelEntry,
    derive_specs_off_loop,
    expired,
    group_loading,
    idle_s,
    is_oom,
    loading,
    replica_load,
    retrieved,
)
from .memory import InsufficientMemory, MemoryManager, config_estimate, weights_estimate
from .routing import DEFAULT_STEPS
from .serving import Inputs, RowsDone, Serving
from .shared import SharedDevice
from .store import Store
from .trust import Trust
from .versions import Versions
from .worker import stop_spares

log = logging.getLogger("modelconsole.engine")


class Engine:
    def __init__(
        self,
        store: Store | None = None,
        *,
        model_roots: Sequence[str] = (),
        base_dir: str | None = None,
        trust: Trust | None = None,
        torch_threads: int | None = None,
        default_device: str = "auto",
        cache_bytes: int = 256 * 2**20,
        gpu: GpuConfig | None = None,
        backend: DeviceBackend | None = None,
        tick_s: float = 1.0,
        host: HostConfig | None = None,
    ):
        self.store = store
        self.gpu = gpu if gpu is not None else GpuConfig(default_device=default_device)
        if gpu is not None:
            default_device = gpu.default_device
        self.base_dir = str(Path(base_dir or ".").resolve())
        trust = trust or Trust()
        self.model_roots = tuple(model_roots) or trust.model_roots or (self.base_dir,)
        # What a registration may name: trusted roots and the factory allowlist come from the
        # operator's config only (trust.py), never from a control call.
        self.trust = dataclasses.replace(trust, model_roots=self.model_roots)
        self.default_device = default_device
        self.torch_threads = torch_threads  # per model worker; None: chosen by policy.torch_threads
        self.events = EventBus()
        self.cache = ResultCache(cache_bytes)
        self.backend = backend if backend is not None else open_backend(self.gpu.simulate)
        self.memory = MemoryManager(self.backend, self.gpu, self.events)
        self.host_tier = HostTier(int(self.gpu.host_tier_gib * 2**30))
        # host memory as a budget (hostmem.py): the cache and the tier at their bounds, then CPU models
        self.host = HostMemory(host or HostConfig(), {"result cache": cache_bytes,
                                                      "host tier": int(self.gpu.host_tier_gib * 2**30)})
        self.shared = {i: SharedDevice(i, self.gpu.device_slots) for i in self.memory.budgets}
        self.tick_s = tick_s
        self._janitor: asyncio.Task | None = None
        self._models: dict[str, ModelEntry] = {}
        self._config_from_file = True  # start(from_file=False): the "config" models are the built-in zoo
        self._control = asyncio.Lock()
        narrow = EngineForVersions(self)
        self.versions = Versions(narrow)  # routing of version-less requests; swap, split, canary
        self.serving = Serving(narrow, self.versions)  # the request path
        self._closing = False
        self._scale_seen: dict[str, tuple[int, int]] = {}  # version key -> (queue_ns, samples) last tick
        # replica key -> (when a failed load may be tried again, the delay after that, its last reason)
        self._replica_retry: dict[str, tuple[float, float, str]] = {}
        self._started = False

    # ------------------------------------------------------------ start / stop

    @classmethod
    def from_config(cls, config: Config, store: Store | None = None) -> Engine:
        return cls(store, model_roots=config.model_roots, base_dir=config.base_dir, trust=config.trust,
                   torch_threads=config.server.torch_threads,
                   cache_bytes=config.cache.max_bytes, gpu=config.gpu, host=config.host)

    async def start(self, models: Iterable[ModelConfig] = (), *, from_file: bool = True) -> None:
        """Register the config's models, then restore what the store holds.  ``from_file``
        False: ``models`` are the built-in demo zoo served with no config file (what a refusal
        to delete one of them says)."""
        self._config_from_file = from_file
        if self.store is not None and self.store._db is None:
            await self.store.open()
        for cfg in models:
            await self._add(cfg, "config")
        if self.store is not None:
            for raw in await self.store.models():
                label = f"stored model {raw.get('name')} v{raw.get('version')}"
                try:
                    cfg = model_from_dict(raw, "store", self.base_dir, self.model_roots, self.trust)
                except ConfigError as e:
                    self.events.publish("restore_failed", f"{label} could not be restored: {e}", level="error")
                    continue
                entry = self._models.get(cfg.name)
                if entry is not None and cfg.version in entry.versions:
                    where = "the config file" if from_file else "the built-in demo zoo"
                    self.events.publish("restore_skipped",
                                        f"{label} is also in {where}; the definition there wins",
                                        model=cfg.name, version=cfg.version, level="warning")
                    continue
                try:
                    await self._add(cfg, "store")
                except EngineError as e:
                    self.events.publish("restore_failed", f"{label} could not be restored: {e.message}",
                                        model=cfg.name, version=cfg.version, level="error")
            for (name, version), ts in (await self.store.registered_times()).items():
                entry = self._models.get(name)
                if entry is not None and version in entry.versions and entry.origin[version] == "store":
                    entry.versions[version].registered_at = ts
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
            resume = await self.versions.restore()
        else:
            resume = []
        own_pid = await asyncio.to_thread(processwide.warm_process, self.backend, sorted(self.memory.budgets))
        if own_pid is not None:
            self.memory.set_own_pid(own_pid)
            if own_pid != os.getpid():
                log.info("the devices list this process as pid %d (os pid %d: a container's pid namespace)",
                         own_pid, os.getpid())
        elif self.backend.kind == "nvml":
            self.events.publish(
                "memory_pid_unknown", f"cannot tell this process (pid {os.getpid()}) in the GPUs' process "
                "lists: its own memory counts as another process's (budgets shrink by it, unloads wait "
                "their full unload_wait_s)", level="warning")
        warning = getattr(self.backend, "warning", None)
        if warning:
            log.error("%s", warning)
            self.events.publish("gpu_readings_degraded", warning, level="error")
        processwide.freeze_heap()  # before any model loads: an unload's gc.collect walks what came after
        self._started = True
        running.add(self, asyncio.get_running_loop())
        loop = asyncio.get_running_loop()
        self._janitor = loop.create_task(self._janitor_loop())
        for inst in self._primaries():
            if inst.pinned:  # a pinned model is kept resident: bring it up now, in the background
                loop.create_task(self._load_quietly(inst))
        self.versions.resume(resume)  # interrupted canaries pick up where they were (routing.py: restart rule)
        count = sum(len(e.versions) for e in self._models.values())
        self.events.publish("started", f"engine started with {count} model versions")

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, finish queued and in-flight ones (bounded), free every model."""
        self._closing = True
        running.remove(self)
        if self._janitor is not None:
            self._janitor.cancel()
        # Canary controllers stop where they are (their state stays stored: they resume at the next start).
        await self.versions.stop(drain_timeout)
        # Loads under way finish first (they take the control lock themselves).
        loads = [inst.load_task for inst in self._instances()
                 if inst.load_task is not None and not inst.load_task.done()]
        if loads:
            log.info("closing: %d load(s) under way finish first", len(loads))
        await asyncio.gather(*loads, return_exceptions=True)
        watch = asyncio.get_running_loop().create_task(self._say_what_close_waits_for(drain_timeout))
        try:
            async with self._control:
                await asyncio.gather(
                    *(self._unload_locked(inst, drain_timeout, keep=False) for inst in self._primaries()),
                    return_exceptions=True,
                )
        finally:
            watch.cancel()
        await self.versions.wait_shadows()  # their requests were answered by the drain above
        stop_spares(asyncio.get_running_loop())  # the freed models' spare CUDA workers (worker.py)
        self.backend.close()
        if self.store is not None:
            await self.store.close()

    async def _say_what_close_waits_for(self, drain_timeout: float, every_s: float = 2.0) -> None:
        """While close drains and frees: what it waits for, at the start and every ``every_s``, so a
        slow shutdown's log says why (queued and running requests by model, models left to free)."""
        first = True
        while True:
            left = [i for i in self._instances() if i.state != UNLOADED]
            busy = [(i.key, i.queue.size + i.in_flight) for i in left if i.queue.size or i.in_flight]
            if first or left:
                shown = ", ".join(f"{k} ({n})" for k, n in busy[:5]) + (" …" if len(busy) > 5 else "")
                log.info("closing: %d model(s) to unload%s", len(left),
                         f"; draining queued and running requests (up to {drain_timeout:.0f}s) of {shown}"
                         if busy else "")
            first = False
            await asyncio.sleep(every_s)

    async def __aenter__(self) -> Engine:
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

    @audits_failures("register")
    async def register(self, raw: Mapping[str, Any] | ModelConfig, actor: str = "api") -> dict[str, Any]:
        """Register a model or a new version (not loaded).  Written to the store first."""
        async with self._control:
            if isinstance(raw, ModelConfig):
                cfg = raw
            else:
                raw = dict(raw)
                raw.setdefault("device", self.default_device)
                if "version" not in raw and isinstance(raw.get("name"), str):  # null stays an error
                    raw["version"] = self._next_version(raw["name"])
                cfg = model_from_dict(raw, "model", self.base_dir, self.model_roots, self.trust)
            entry = self._models.get(cfg.name)
            if entry is not None and cfg.version in entry.versions:
                raise Conflict(f"model '{cfg.name}' version {cfg.version} is already registered")
            await derive_specs_off_loop(cfg)
            self._check_source(cfg)
            self._check_host_fit(cfg)
            first = entry is None or entry.active is None
            if self.store is not None:
                await self.store.save_model(cfg.to_dict(secrets=True), actor, cfg.version if first else None)
            inst = self._register(cfg, "store")
        self.events.publish("registered", f"{cfg.name} v{cfg.version} registered from {cfg.source}",
                            model=cfg.name, version=cfg.version, data={"actor": actor})
        return inst.snapshot()

    def _next_version(self, name: str) -> str:
        """A registration that names no version gets the next number after the name's highest."""
        entry = self._models.get(name)
        numbers = [int(v) for v in (entry.versions if entry is not None else ()) if str(v).isdigit()]
        return str(max(numbers, default=0) + 1)

    async def _add(self, cfg: ModelConfig, origin: str) -> None:
        async with self._control:
            await derive_specs_off_loop(cfg)
            self._check_source(cfg)
            self._check_host_fit(cfg)  # a restart never replays a registration that cannot fit
            self._register(cfg, origin)

    def _runs_on_host(self, cfg: ModelConfig) -> bool:
        """Whether a version's weights sit in host memory outside any device budget (hostmem.py)."""
        if cfg.source_kind == "remote" or self.memory.target_devices(cfg.device) is not None:
            return False
        try:
            return resolve_device(cfg.device).type == "cpu"
        except LoadFailed:
            return False

    def _check_host_fit(self, cfg: ModelConfig) -> None:
        """WontFit (507) for a CPU version whose copies (``replicas``, ``max_replicas``) can never fit."""
        if self._runs_on_host(cfg):
            self.host.check_fits(f"model '{cfg.name}' version {cfg.version}", cfg.replica_limit,
                                 config_estimate(cfg))

    def _host_residents(self) -> list[ModelInstance]:
        """The CPU versions holding host memory that an eviction may choose from."""
        protected = self.versions.protected
        return [i for i in self._instances() if self.host.holds(i) and i.state != UNLOADED
                and not group_loading(i) and i.version_key not in protected]

    def _check_source(self, cfg: ModelConfig) -> None:
        """Cheap checks before anything is stored: the source exists, inside the roots."""
        try:
            sources.check_trust(cfg)
        except sources.SourceError as e:
            raise Forbidden(f"model '{cfg.name}' version {cfg.version}: {e}") from None
        try:
            if cfg.source_kind not in ("zoo", "remote"):
                sources.resolve_path(cfg)
            inputs, outputs = sources.declared_specs(cfg)
        except sources.SourceError as e:
            raise InputError(f"model '{cfg.name}' version {cfg.version}: {e}") from None
        if cfg.source_kind in ("torchscript", "safetensors", "state_dict") and (inputs is None or outputs is None):
            raise InputError(
                f"model '{cfg.name}': a {cfg.source_kind} source needs inputs and outputs declared "
                '(e.g. inputs = [{ name = "x", datatype = "FP32", shape = [-1, 16] }])'
            )

    def _register(self, cfg: ModelConfig, origin: str) -> ModelInstance:
        entry = self._models.setdefault(cfg.name, ModelEntry(cfg.name))
        inst = ModelInstance(cfg, self.events, self.cache, self.host_tier, torch_threads=self.torch_threads)
        inst.on_oom = self._make_room_after_oom
        self.cache.invalidate((cfg.name, cfg.version))  # a new definition: old answers are stale
        entry.versions[cfg.version] = inst
        entry.origin[cfg.version] = origin
        if entry.active is None:
            entry.active = cfg.version
        return inst

    @audits_failures("load")
    async def load(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Load a model version (no-op if READY); raises LoadFailed with the reason."""
        inst = self._instance(name, version)
        await self._ensure_loaded(inst)
        await asyncio.gather(*self._start_replicas(inst, inst.cfg.replicas, retry=True), return_exceptions=True)
        failed = [r.label for r in inst.replica_set[1:inst.cfg.replicas] if r.state != READY]
        await self._audit(actor, "load", inst, detail=f"replicas not loaded: {', '.join(failed)}" if failed else None)
        return inst.snapshot()

    async def _ensure_loaded(self, inst: ModelInstance) -> None:
        """Start a load or join the one under way: concurrent callers share one load."""
        if inst.state == READY:
            return
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        if inst.load_task is None or inst.load_task.done():
            inst.load_task = asyncio.get_running_loop().create_task(self._run_load(inst))
        await asyncio.shield(inst.load_task)
        if inst.replica == 0 and inst.cfg.replicas > 1:
            self._start_replicas(inst, inst.cfg.replicas)  # in the background: the primary serves meanwhile

    def _replica(self, primary: ModelInstance, number: int) -> ModelInstance:
        """Replica ``number`` of a version, made on first use (replicas.py)."""
        group = primary.replica_set
        while len(group) <= number:
            rep = ModelInstance(primary.cfg, self.events, self.cache, self.host_tier,
                                torch_threads=self.torch_threads, replica=len(group), stats=primary.stats)
            rep.replica_set = group
            rep.on_oom = self._make_room_after_oom
            group.append(rep)
        rep = group[number]
        rep.cfg, rep.pinned = primary.cfg, primary.pinned
        return rep

    def _start_replicas(self, primary: ModelInstance, count: int, retry: bool = False) -> list[asyncio.Task]:
        """Start loading replicas 1..count-1 that are not loaded or loading; the tasks of each.

        A replica that could not be placed (no distinct device with room) is tried again
        after ``REPLICA_RETRY_S``, or at once when ``retry`` (an explicit load)."""
        tasks: list[asyncio.Task] = []
        if primary.state != READY or self._closing:
            return tasks
        now = time.monotonic()
        for number in range(1, count):
            rep = self._replica(primary, number)
            if rep.state in (UNLOADED, FAILED) and not loading(rep):
                if not retry and self._replica_retry.get(rep.key, (0.0,))[0] > now:
                    continue
                rep.load_task = asyncio.get_running_loop().create_task(self._run_replica_load(rep))
                rep.load_task.add_done_callback(retrieved)  # its failure is an event; nobody may await it
            if rep.load_task is not None and not rep.load_task.done():
                tasks.append(rep.load_task)
        return tasks

    async def _run_replica_load(self, rep: ModelInstance) -> None:
        """One replica's load.  A failure is an event, once per reason (the version serves on
        without it); the janitor tries again with a doubling delay (``REPLICA_RETRY_S`` up to
        ``REPLICA_RETRY_MAX_S``)."""
        try:
            await self._run_load(rep)
            self._replica_retry.pop(rep.key, None)
        except EngineError as e:
            _, delay, last = self._replica_retry.get(rep.key, (0.0, REPLICA_RETRY_S / 2, ""))
            delay = min(delay * 2, REPLICA_RETRY_MAX_S)
            self._replica_retry[rep.key] = (time.monotonic() + delay, delay, e.message)
            if e.message != last:
                self.events.publish("replica_not_loaded", f"{rep.label} not loaded: {e.message}",
                                    model=rep.name, version=rep.version, level="warning",
                                    data={"replica": rep.replica})
            raise

    async def _run_load(self, inst: ModelInstance) -> None:
        """Place, reserve, load, commit the measured footprint: the body of ``inst.load_task``.

        Placement and evictions (``memory.make_room``) and the commit run
        under the control lock; reading the weights does not (see the module
        docstring).  An out-of-memory while loading (real or simulated) makes
        room for half as much again and retries once; a second one is the
        answer.
        """
        need = 0  # bytes to make room for, estimated at the first try
        retried = False
        while True:
            async with self._control:
                if inst.state == READY:
                    return
                if inst.state not in (UNLOADED, FAILED):
                    raise ModelUnavailable(f"model {inst.name} version {inst.version} is {inst.state}")
                if inst.replica and inst.replica_set[0].state != READY:
                    raise ModelUnavailable(f"{inst.label}: its version is {inst.replica_set[0].state}")
                targets = self._replica_targets(inst, self.memory.target_devices(inst.cfg.device))
                index = None
                on_host = False
                if targets is not None:  # a managed device (None: the CPU, on the host budget)
                    need = need or weights_estimate(inst)
                    index = await self.memory.make_room(inst, need, targets, self._evictable, self._evict_locked)
                    inst.device_index = index
                    inst.shared = self.shared[index]
                elif self._runs_on_host(inst.cfg):
                    need = need or weights_estimate(inst)
                    await self.host.make_room(inst, need, self._host_residents(), self._evict_locked,
                                              self.gpu.min_residency_s)
                    on_host = True
            if index is None:
                try:
                    await inst.load()
                except BaseException:
                    if on_host:
                        async with self._control:
                            self.host.release(inst)
                    raise
                if on_host:
                    async with self._control:
                        self.host.commit(inst, max(inst.footprint_bytes, inst.weight_bytes))
                return
            try:
                await inst.load(self.memory.torch_device(index))  # outside the lock: the reservation holds
                async with self._control:
                    self.memory.commit(index, inst, inst.footprint_bytes)
                return
            except Exception as e:  # noqa: BLE001 - undo the reservation, then decide
                async with self._control:
                    if inst.state == READY:  # loaded, but the device refused to hold it (simulated OOM)
                        await inst.unload()
                    self.memory.forget(index, inst)
                    inst.device_index = None
                if not is_oom(e):
                    raise
                if retried:
                    inst.state, inst.reason = FAILED, f"out of memory on gpu{index} after one retry"
                    raise LoadFailed(f"model {inst.key} ran out of memory on gpu{index} twice; "
                                     f"it needs more than {need / 2**30:.2f} GiB") from e
                self.events.publish("oom", f"out of memory loading {inst.key} on gpu{index}; "
                                    f"making room for {1.5 * need / 2**30:.2f} GiB and retrying once",
                                    model=inst.name, version=inst.version, level="warning")
                need, retried = int(need * 1.5), True

    @staticmethod
    def _replica_targets(inst: ModelInstance, targets: list[int] | None) -> list[int] | None:
        """The managed devices a replica may go to: not one its siblings hold (replicas.py).
        On the CPU (``None``) every replica is one more worker thread."""
        if targets is None or len(inst.replica_set) == 1:
            return targets
        taken = {r.device_index for r in inst.replica_set if r is not inst and r.device_index is not None}
        free = [t for t in targets if t not in taken]
        if not free:
            raise InsufficientMemory(f"{inst.label}: every device it may use ({', '.join(map(str, targets))}) "
                                     f"already holds a replica of {inst.name} v{inst.version}")
        return free

    @contextlib.asynccontextmanager
    async def _control_when_settled(self, inst: ModelInstance):
        """The control lock, taken at a moment when ``inst`` has no load under way.

        A load owns its model (and its reservation) until it has ended, and
        it needs the lock to commit: an unload or eviction of that model
        waits for the load outside the lock, then takes the lock.
        """
        while True:
            tasks = [r.load_task for r in inst.replica_set if r.load_task is not None and loading(r)]
            if tasks:
                await asyncio.wait(tasks)
            await self._control.acquire()
            if not group_loading(inst):
                break
            self._control.release()  # a new load started meanwhile: wait for that one too
        try:
            yield
        finally:
            self._control.release()

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
            if plan is not None:
                for key in plan.victims:
                    await self._evict_locked(by_key[key], f"after {inst.key} ran out of memory: {plan.reason}")

    async def _evict_locked(self, inst: ModelInstance, reason: str) -> None:
        """Evict a version: all its replicas go (replicas.py), whichever one the plan named."""
        primary = inst.replica_set[0]
        where = f" from {primary.device_label}" if primary.device_label != "—" else ""
        self.events.publish("evicted", f"evicted {primary.key}{where} {reason}", model=inst.name, version=inst.version,
                            level="warning", data={"reason": reason})
        await self._unload_locked(primary)

    async def _unload_locked(self, inst: ModelInstance, drain_timeout: float = 30.0, keep: bool = True) -> None:
        """Unload one instance; a version's primary takes its replicas with it (extras first,
        so that a READY replica always has a READY primary)."""
        if inst.replica == 0 and len(inst.replica_set) > 1:
            await asyncio.gather(*(self._unload_one(r, drain_timeout, keep) for r in inst.replica_set[1:]))
        await self._unload_one(inst, drain_timeout, keep)

    async def _unload_one(self, inst: ModelInstance, drain_timeout: float, keep: bool) -> None:
        if loading(inst) and inst.load_task is not asyncio.current_task():
            # its load owns the reservation: callers take _control_when_settled (a bug otherwise)
            raise RuntimeError(f"{inst.key} unloaded while its load is under way")
        freed = inst.footprint_bytes
        # what the device shows us holding before the free: the wait for it to come back counts from here
        before = self.memory.own_used(inst.device_index) if inst.device_index is not None else 0
        await inst.unload(drain_timeout, keep)
        if self.host.holds(inst):
            self.host.release(inst)
        if inst.shared is not None:
            inst.shared.forget(inst)
            inst.shared = None
        if inst.device_index is not None:
            index, inst.device_index = inst.device_index, None
            await self.memory.release(index, inst, freed, before)

    def _primaries(self) -> list[ModelInstance]:
        """Every registered version (its primary instance)."""
        return [inst for e in self._models.values() for inst in e.versions.values()]

    def _instances(self) -> list[ModelInstance]:
        """Every instance: each version's primary and its other replicas."""
        return [r for e in self._models.values() for inst in e.versions.values() for r in inst.replica_set]

    def _residents(self, index: int) -> list[ModelInstance]:
        """The versions holding (or about to hold) memory on a managed device."""
        return [i for i in self._instances() if i.device_index == index and i.state != UNLOADED]

    def _evictable(self, index: int) -> list[ModelInstance]:
        """The residents a load may evict: all but those with a load under way (their load owns
        their reservation until it has ended) and the two sides of a swap under way."""
        protected = self.versions.protected
        return [i for i in self._residents(index) if not group_loading(i) and i.version_key not in protected]

    async def _load_quietly(self, inst: ModelInstance) -> None:
        """Bring a pinned model up in the background; a refusal becomes an event."""
        try:
            await self._ensure_loaded(inst)
        except LoadFailed:
            pass  # already a load_failed event and the model's state
        except EngineError as e:
            self.events.publish("load_failed", f"pinned {inst.key} could not be loaded: {e.message}",
                                model=inst.name, version=inst.version, level="error")

    @audits_failures("unload")
    async def unload(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Stop routing to a version, let its queued work finish, free its memory."""
        inst = self._instance(name, version)
        async with self._control_when_settled(inst):
            await self._unload_locked(inst)
        await self._audit(actor, "unload", inst)
        return inst.snapshot()

    @audits_failures(lambda a: "pin" if a["pinned"] else "unpin")
    async def pin(self, name: str, version: str | None = None, pinned: bool = True,
                  actor: str = "api") -> dict[str, Any]:
        """Keep a version resident (never evicted, never unloaded for idleness), or stop."""
        inst = self._instance(name, version)
        async with self._control:
            if self.store is not None:
                await self.store.set_pin(inst.name, inst.version, pinned, actor)
            for r in inst.replica_set:
                r.pinned = pinned
        self.events.publish("pinned" if pinned else "unpinned", f"{inst.key} {'pinned' if pinned else 'unpinned'}",
                            model=inst.name, version=inst.version, data={"actor": actor})
        if pinned and inst.state == UNLOADED:
            asyncio.get_running_loop().create_task(self._load_quietly(inst))
        return inst.snapshot()

    @audits_failures("delete")
    async def delete(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Remove a registered version (``version``) or a whole model name for good: refused (409,
        saying which) while it is loaded, the active version of a name with others, in a split,
        a swap or a canary, or defined in the config file (it would come back at the next start).
        Written to the store first (audited), then gone from the registry, the cache and the
        host tier."""
        async with self._control:
            entry = self._models.get(name)
            if entry is None:
                raise ModelNotFound(f"unknown model '{name}'")
            if version is not None:
                self._instance(name, version)  # 404 naming the versions there are
            doomed = [version] if version is not None else sorted(entry.versions, key=int)
            what = f"model '{name}'" + (f" version {version}" if version is not None else "")
            for v in doomed:
                inst = entry.versions[v]
                if entry.origin[v] == "config":
                    if not self._config_from_file:
                        raise Conflict(f"{what}: {inst.key} is one of the built-in demo models, served because "
                                       "the server started without --config (deleted here it would come back "
                                       "at the next start); to serve other models, start with --config FILE")
                    raise Conflict(f"{what}: {inst.key} is defined in the config file; remove it there "
                                   "(deleted here it would come back at the next start)")
                loaded = [r for r in inst.replica_set if r.state != UNLOADED or loading(r)]
                if loaded:
                    raise Conflict(f"{what}: {inst.key} is {loaded[0].state}; unload it first")
            why = self.versions.holds(name, version)
            if why is not None:
                raise Conflict(f"{what}: {why}")
            if version is not None and version == entry.active:
                others = sorted((v for v in entry.versions if v != version), key=int)
                hint = (f"swap to another version first ({', '.join(others)}), or delete the model" if others
                        else "it is the only one: delete the model (DELETE /api/models/" + name + ")")
                raise Conflict(f"{what}: it is the active version; {hint}")
            if self.store is not None:
                if version is None:
                    await self.store.delete_name(name, actor)
                else:
                    await self.store.delete_model(name, version, actor)
            for v in doomed:
                inst = entry.versions.pop(v)
                entry.origin.pop(v, None)
                self.cache.invalidate((name, v))
                for r in inst.replica_set:
                    self.host_tier.discard(r.key)  # its weights are nobody's now
            if not entry.versions:
                del self._models[name]
                self.versions.forget(name)
            else:
                self.versions.forget(name, version)
        self.events.publish("deleted", f"{what} deleted", model=name, version=version,
                            data={"actor": actor, "versions": doomed})
        return {"name": name, "deleted": doomed}

    @audits_failures("evict")
    async def evict(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Free a version's device memory now, as an eviction would: its weights go to the
        host tier (when there is one) so the next request reloads it fast.  A pinned
        version is refused: unpin it first."""
        inst = self._instance(name, version)
        async with self._control_when_settled(inst):
            if inst.pinned:
                raise Conflict(f"{inst.key} is pinned; unpin it before evicting it")
            if inst.state == UNLOADED:
                raise Conflict(f"{inst.key} is not loaded")
            await self._audit(actor, "evict", inst)
            await self._evict_locked(inst, f"by {actor}")
        return inst.snapshot()

    @audits_failures("priority")
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
            for r in inst.replica_set:
                r.cfg = inst.cfg
        self.events.publish("priority", f"{inst.key} base priority {previous} -> {priority}",
                            model=inst.name, version=inst.version,
                            data={"actor": actor, "priority": priority, "previous": previous})
        return inst.snapshot()

    async def _janitor_loop(self) -> None:
        """Every tick: fold request counts into rates; unload models idle past keep_alive."""
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            for inst in self._instances():
                inst.tick(now)
            for inst in self._primaries():
                if inst.cfg.replica_limit > 1 and inst.state == READY:
                    await self._scale(inst, now)
                if expired(inst, now) and inst.key not in self.versions.protected:
                    async with self._control_when_settled(inst):
                        # re-read under the lock that gates the unload
                        if expired(inst, now) and inst.key not in self.versions.protected:
                            idle = min(idle_s(r, now) for r in inst.replica_set if r.state == READY)
                            self.events.publish("expired", f"{inst.key} idle for {idle:.0f}s (keep_alive "
                                                f"{inst.cfg.keep_alive:g}s): unloading",
                                                model=inst.name, version=inst.version)
                            await self._unload_locked(inst)

    async def _scale(self, primary: ModelInstance, now: float) -> None:
        """One tick of a version's replica count: keep ``replicas`` loaded, and with
        ``max_replicas`` grow or shrink by ``replicas.replica_target`` (one step a tick)."""
        seen = self._scale_seen.get(primary.key, (0, 0))
        self._scale_seen[primary.key] = (primary.stats.queue_ns, primary.stats.inference_count)
        load, live, last = replica_load(primary, seen, now)
        cfg = primary.cfg
        target = replicas.replica_target(load, cfg.replicas, cfg.replica_limit, cfg.keep_alive)
        if target > len(live):
            started = self._start_replicas(primary, target)
            if started:
                self.events.publish("replicas_scaled", f"{primary.key}: {len(live)} -> {target} replicas "
                                    f"(mean queue wait {load.mean_wait_s * 1000:.1f} ms, urgency {load.urgency:.2f}, "
                                    f"target {cfg.latency_target_ms:g} ms)", model=primary.name,
                                    version=primary.version, data={"from": len(live), "to": target})
        elif target < len(live) and last is not None and not primary.pinned:
            async with self._control_when_settled(last):
                if last.state == READY and not last.busy():
                    self.events.publish("replicas_scaled", f"{primary.key}: {len(live)} -> {target} replicas "
                                        f"({last.label} idle {load.idle_s:.0f}s)", model=primary.name,
                                        version=primary.version, data={"from": len(live), "to": target})
                    await self._unload_one(last, 30.0, keep=True)

    async def _audit(self, actor: str, action: str, inst: ModelInstance, result: str = "ok",
                     detail: str | None = None) -> None:
        if self.store is not None:
            await self.store.audit(actor, action, inst.name, inst.version, {}, result, detail)

    # ------------------------------------------------------------ versions (versions.py does the work)

    def adopt_active(self, name: str, version: str) -> None:
        """Take ``version`` as the active version of ``name`` without a swap: in a fleet, the
        controller decided (and stored) it, and this engine serves no copy of the old one."""
        entry = self._models.get(name)
        if entry is not None and version in entry.versions:
            entry.active = version

    def routing(self, name: str) -> dict[str, Any]:
        """How a model name routes requests without a version, and each arm's metrics."""
        return self.versions.routing(name)

    @audits_failures("swap")
    async def swap(self, name: str, version: str | int, actor: str = "api") -> dict[str, Any]:
        """Hot swap: load and warm ``version`` beside the active one, switch routing
        atomically, let the old version finish its queued and in-flight work, unload it.
        A new version that fails to load or warm leaves the old one serving."""
        return await self.versions.swap(name, version, actor)

    @audits_failures("split")
    async def set_split(self, name: str, weights: Mapping[str, float | int], *, shadow: Sequence[str] | None = None,
                        metric_output: str | None = None, actor: str = "api") -> dict[str, Any]:
        """A/B split of the requests without a version (``{}`` clears it); shadow copies; a tracked output."""
        return await self.versions.set_split(name, weights, shadow=shadow, metric_output=metric_output, actor=actor)

    @audits_failures("canary_start")
    async def start_canary(self, name: str, version: str | int, *, steps: Sequence[float] = DEFAULT_STEPS,
                           interval_s: float = 60.0, max_error_rate: float = 0.05, max_p95_ratio: float = 2.0,
                           min_requests: int = 20, actor: str = "api") -> dict[str, Any]:
        """Ramp ``version``'s share step by step; roll back on a broken bound, swap at 100%."""
        return await self.versions.start_canary(name, version, steps=steps, interval_s=interval_s,
                                                max_error_rate=max_error_rate, max_p95_ratio=max_p95_ratio,
                                                min_requests=min_requests, actor=actor)

    @audits_failures("canary_abort")
    async def stop_canary(self, name: str, actor: str = "api") -> dict[str, Any]:
        """Abort the running canary: its share goes to 0."""
        return await self.versions.stop_canary(name, actor)

    # ------------------------------------------------------------ request path (serving.py)

    async def infer(self, name: str, inputs: Inputs, *, version: str | None = None, priority: int | None = None,
                    timeout_ms: float | None = None, outputs: Sequence[str] | None = None,
                    routing_key: str | None = None) -> InferResult:
        """Answer one request: a result, or an EngineError saying exactly what went wrong
        (``Serving.infer`` says how)."""
        return await self.serving.infer(name, inputs, version=version, priority=priority, timeout_ms=timeout_ms,
                                        outputs=outputs, routing_key=routing_key)

    def submit(self, name: str, inputs: Mapping[str, Any], done: Callable[[Any, BaseException | None], None], *,
               version: str | None = None, priority: int | None = None, timeout_ms: float | None = None,
               outputs: Sequence[str] | None = None) -> ModelInstance | None:
        """``infer`` without a coroutine, or None for the full path (``Serving.submit``)."""
        return self.serving.submit(name, inputs, done, version=version, priority=priority, timeout_ms=timeout_ms,
                                   outputs=outputs)

    def submit_rows(self, name: str, inputs: Mapping[str, Any], parts: Sequence[int], done: RowsDone, *,
                    digests: Sequence[bytes | None] | None = None, version: str | None = None,
                    priority: int | None = None, timeout_ms: float | None = None,
                    outputs: Sequence[str] | None = None) -> bool:
        """A chunk of requests as one queue entry, or False to serve them one by one
        (``Serving.submit_rows``)."""
        return self.serving.submit_rows(name, inputs, parts, done, digests=digests, version=version,
                                        priority=priority, timeout_ms=timeout_ms, outputs=outputs)

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
        devices = [dict(d, slots=self.shared[d["index"]].to_dict()) for d in self.memory.snapshot(self._residents)]
        return {"models": models, "cache": self.cache.to_dict(), "devices": devices,
                "host_tier": self.host_tier.to_dict(), "host": self.host.snapshot(),
                "routing": self.versions.snapshot()}

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        """Discrete events (registered, loading, loaded, load_failed, unloaded, model_error, ...)."""
        return self.events.subscribe(maxsize)

    async def audit_log(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return await self.store.audit_log(limit, model) if self.store is not None else []

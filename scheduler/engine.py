"""The engine: the one owner of which models exist, which are loaded and where requests go.

Control calls (register, load, unload) mutate residency and routing only
under ``self._control`` (one asyncio lock), and a read that gates a
mutation happens inside the same critical section.  Requests never take that
lock: ``infer`` looks the model up, validates and queues in a few
microseconds, and the model's worker thread does the torch work.

What the operator changes is written to the store before it is
acknowledged and restored at start (``start``).  The config file is the
baseline; models registered at run time live in the store and layer over it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import sources
from .config import Config, ConfigError, ModelConfig, model_from_dict
from .errors import Conflict, EngineError, InputError, ModelNotFound, ModelUnavailable
from .cache import ResultCache
from .events import EventBus, Subscription
from .instance import FAILED, LOADING, READY, UNLOADED, WARMING, InferResult, ModelInstance
from .store import Store

log = logging.getLogger("modelconsole.engine")


@dataclass
class ModelEntry:
    """A model name: its versions and the one that serves requests without a version."""

    name: str
    versions: dict[str, ModelInstance] = field(default_factory=dict)
    active: str | None = None
    origin: dict[str, str] = field(default_factory=dict)  # version -> "config" | "store"


class Engine:
    def __init__(
        self,
        store: Store | None = None,
        *,
        model_roots: Sequence[str] = (),
        base_dir: str | None = None,
        default_device: str = "auto",
        cache_bytes: int = 256 * 2**20,
    ):
        self.store = store
        self.base_dir = str(Path(base_dir or ".").resolve())
        self.model_roots = tuple(model_roots) or (self.base_dir,)
        self.default_device = default_device
        self.events = EventBus()
        self.cache = ResultCache(cache_bytes)
        self._models: dict[str, ModelEntry] = {}
        self._control = asyncio.Lock()
        self._closing = False
        self._started = False

    # ------------------------------------------------------------ start / stop

    @classmethod
    def from_config(cls, config: Config, store: Store | None = None) -> "Engine":
        base = str(Path(config.path).resolve().parent) if config.path else None
        return cls(store, model_roots=config.model_roots, base_dir=base, default_device=config.gpu.default_device,
                   cache_bytes=config.cache.max_bytes)

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
        self._started = True
        self.events.publish("started", f"engine started with {sum(len(e.versions) for e in self._models.values())} model versions")

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, finish queued and in-flight ones (bounded), free every model."""
        self._closing = True
        # Loads under way finish first (they take the control lock themselves).
        loads = [inst.load_task for e in self._models.values() for inst in e.versions.values()
                 if inst.load_task is not None and not inst.load_task.done()]
        await asyncio.gather(*loads, return_exceptions=True)
        async with self._control:
            await asyncio.gather(
                *(inst.unload(drain_timeout) for e in self._models.values() for inst in e.versions.values()),
                return_exceptions=True,
            )
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
        inst = ModelInstance(cfg, self.events, self.cache)
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
            await inst.load()

    async def unload(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """Stop routing to a version, let its queued work finish, free its memory."""
        inst = self._instance(name, version)
        async with self._control:
            await inst.unload()
        await self._audit(actor, "unload", inst)
        return inst.snapshot()

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
    ) -> InferResult:
        """Answer one request: a result, or an EngineError saying exactly what went wrong.

        A request for a registered but unloaded version loads it first (the
        request waits; requests to other models keep flowing).
        """
        if self._closing:
            raise ModelUnavailable("the engine is shutting down")
        inst = self._instance(name, version)
        try:
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
        except EngineError as e:
            inst.stats.fail(e.kind)  # every failed answer is counted here, once, by kind
            raise

    # ------------------------------------------------------------ observation

    def snapshot(self) -> dict[str, Any]:
        """Everything an observer shows: every version's state, queue, memory and counters."""
        models = []
        for name in sorted(self._models):
            entry = self._models[name]
            for v in sorted(entry.versions, key=int):
                snap = entry.versions[v].snapshot()
                snap["active"] = v == entry.active
                snap["origin"] = entry.origin[v]
                models.append(snap)
        return {"models": models, "cache": self.cache.to_dict()}

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        """Discrete events (registered, loading, loaded, load_failed, unloaded, model_error, ...)."""
        return self.events.subscribe(maxsize)

    async def audit_log(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return await self.store.audit_log(limit, model) if self.store is not None else []

"""The engine as versions.py and serving.py see it: a narrow host, so neither reaches the
engine's private members."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ModelNotFound
from .instance import InferResult, ModelInstance
from .serving import Inputs
from .store import Store

if TYPE_CHECKING:
    from .engine import Engine
    from .lifecycle import ModelEntry


class EngineForVersions:
    """The engine as ``versions.VersionHost`` and ``serving.ServingHost``: the calls versions.py
    and serving.py may make, and only those.

    The engine's own code reaches its privates here, so versions.py never does; each call is
    looked up when made (a test may wrap the engine's ``_ensure_loaded``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.events = engine.events

    @property
    def store(self) -> Store | None:
        return self._engine.store

    @property
    def closing(self) -> bool:
        return self._engine._closing

    def entry(self, name: str) -> ModelEntry | None:
        return self._engine._models.get(name)

    def instance(self, name: str, version: str | None = None) -> ModelInstance:
        return self._engine._instance(name, version)

    def control(self) -> asyncio.Lock:
        return self._engine._control

    def control_when_settled(self, inst: ModelInstance) -> Any:
        return self._engine._control_when_settled(inst)

    async def ensure_loaded(self, inst: ModelInstance) -> None:
        await self._engine._ensure_loaded(inst)

    async def unload_locked(self, inst: ModelInstance) -> None:
        await self._engine._unload_locked(inst)

    def set_active(self, name: str, version: str) -> None:
        entry = self._engine._models[name]
        if version not in entry.versions:
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        entry.active = version

    async def serve(self, inst: ModelInstance, inputs: Inputs, priority: int | None, timeout_ms: float | None,
                    outputs: Sequence[str] | None, metric: str | None = None) -> InferResult:
        return await self._engine.serving.serve(inst, inputs, priority, timeout_ms, outputs, metric)


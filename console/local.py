"""The in-process ``EngineClient``: the console's view of an engine in this same process.

Used by ``modelconsole`` without ``--attach`` (``console/run.py`` wires it);
it calls the engine directly and turns its refusals into ``ClientError``s
with the status the HTTP API would have answered.  It is the one console
module that touches the engine, kept apart from ``client.py`` so the UI and
the attach client never import torch (import-linter holds this).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .client import ACTOR, ClientError, EngineClient


class LocalClient(EngineClient):
    """The engine in this process.  The caller owns the engine (starts and closes it)."""

    def __init__(self, engine: Any, server_info_fn: Callable[[], dict[str, Any]] | None = None,
                 *, read_only: bool = False):
        super().__init__(read_only)
        # Imported here, not at the top: it imports the engine's modules (attach mode must not).
        from modelconsole.server.api import build_snapshot

        self.engine = engine
        self.url = None
        self.connected = True  # nothing to lose
        self._build_snapshot = build_snapshot
        self._server_info_fn = server_info_fn or self._embedded_info
        self._started = time.time()
        self._forward: asyncio.Task | None = None

    def _embedded_info(self) -> dict[str, Any]:
        from modelconsole.console import __version__

        return {"version": __version__, "started": self._started, "uptime_s": time.time() - self._started,
                "accepting": self.engine.accepting, "token_required": False}

    async def start(self) -> None:
        # Subscribe now, not when the app first iterates, so nothing between is lost.
        sub = self.engine.subscribe()
        self._forward = asyncio.get_running_loop().create_task(self._forward_events(sub))

    async def _forward_events(self, sub: Any) -> None:
        with sub:
            async for ev in sub:
                self._emit(ev.to_dict())

    async def close(self) -> None:
        if self._forward is not None:
            self._forward.cancel()
            await asyncio.gather(self._forward, return_exceptions=True)
            self._forward = None
        await super().close()

    def snapshot(self) -> dict[str, Any]:
        return self._build_snapshot(self.engine, self._server_info_fn())

    async def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One engine call as the console; the engine's refusals become ClientErrors, with the
        status the HTTP API would have answered."""
        from modelconsole.scheduler.config import ConfigError
        from modelconsole.scheduler.errors import EngineError

        self._check_writable(action)
        try:
            return await fn(*args, **kw)
        except EngineError as e:
            raise ClientError(e.status, e.message) from e
        except ConfigError as e:
            raise ClientError(400, str(e)) from e

    # ``node``: only a fleet has nodes (cluster/); the embedded engine is one host
    def _one_host(self, node: str | None) -> None:
        if node is not None:
            raise ClientError(400, "node: only a fleet (--serve --cluster) has nodes")

    async def load(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        self._one_host(node)
        return await self._call("load", self.engine.load, name, version, actor=ACTOR)

    async def unload(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        self._one_host(node)
        return await self._call("unload", self.engine.unload, name, version, actor=ACTOR)

    async def evict(self, name: str, version: str | None = None, node: str | None = None) -> dict[str, Any]:
        self._one_host(node)
        return await self._call("evict", self.engine.evict, name, version, actor=ACTOR)

    async def pin(self, name: str, version: str | None = None, pinned: bool = True,
                  node: str | None = None) -> dict[str, Any]:
        self._one_host(node)
        return await self._call("pin" if pinned else "unpin", self.engine.pin, name, version,
                                pinned=pinned, actor=ACTOR)

    async def delete(self, name: str, version: str | None = None) -> dict[str, Any]:
        return await self._call("delete", self.engine.delete, name, version, actor=ACTOR)

    async def set_priority(self, name: str, version: str | None, priority: int) -> dict[str, Any]:
        return await self._call("set priority", self.engine.set_priority, name, version, priority, actor=ACTOR)

    async def register(self, name: str, source: str, version: str | None = None,
                       options: dict[str, Any] | None = None) -> dict[str, Any]:
        # The same rule as POST /api/models: identity at the top level, settings in options.
        clash = [k for k in options or {} if k in ("name", "version", "source")]
        if clash:
            raise ClientError(400, f"options.{clash[0]}: give {clash[0]} at the top level, not in options")
        raw: dict[str, Any] = {"name": name, "source": source, **(options or {})}
        if version is not None:
            raw["version"] = str(version)
        return await self._call("register", self.engine.register, raw, actor=ACTOR)

    async def audit(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return await self.engine.audit_log(limit, model)

    def _engine_fn(self, attr: str) -> Callable[..., Any]:
        fn = getattr(self.engine, attr, None)
        if fn is None:
            raise ClientError(501, f"this engine has no {attr}: versions routing is not supported")
        return fn

    async def swap(self, name: str, version: str) -> dict[str, Any]:
        self._check_writable("swap")
        return await self._call("swap", self._engine_fn("swap"), name, str(version), actor=ACTOR)

    async def set_split(self, name: str, weights: dict[str, float], shadow: list[str] | None = None,
                        metric_output: str | None = None) -> dict[str, Any]:
        self._check_writable("set a split")
        return await self._call("set a split", self._engine_fn("set_split"), name,
                                {str(k): v for k, v in weights.items()},
                                shadow=[str(v) for v in shadow] if shadow else None,
                                metric_output=metric_output or None, actor=ACTOR)

    async def start_canary(self, name: str, version: str, **params: Any) -> dict[str, Any]:
        self._check_writable("start a canary")
        if "steps" in params and params["steps"] is not None:
            params["steps"] = tuple(params["steps"])
        params = {k: v for k, v in params.items() if v is not None}
        return await self._call("start a canary", self._engine_fn("start_canary"), name, str(version),
                                **params, actor=ACTOR)

    async def stop_canary(self, name: str) -> dict[str, Any]:
        self._check_writable("stop a canary")
        return await self._call("stop a canary", self._engine_fn("stop_canary"), name, actor=ACTOR)

    async def routing(self, name: str) -> dict[str, Any]:
        from modelconsole.scheduler.errors import EngineError

        fn = self._engine_fn("routing")
        try:
            out = fn(name)
            if asyncio.iscoroutine(out):
                out = await out
            return out
        except EngineError as e:
            raise ClientError(e.status, e.message) from e


# --------------------------------------------------------------------------- over HTTP

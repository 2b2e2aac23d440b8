"""One node's engine core in the fleet: a Ray actor holding an ``Engine``.

The controller starts one per node (node affinity: it runs there and nowhere
else) and tells it everything the operator decided: the registered versions,
the active version of each name, splits and pins (``sync``, then one call per
change).  The engine core decides the rest on its own node, as a single host
does: budgets from that node's NVML (or simulated devices), placement on its
devices, eviction by keep-value, its own host tier, batching.  It keeps no
store: the controller's SQLite file on the head is the one record.

Front ends send infer calls as ``server/ipc.py`` frames (``call``), one message
per front end per loop iteration; each call is one ``engine.infer`` (a chunk's
calls too, one by one: chunks are the local data path's, ``server/core.py``).  The
controller reads ``report`` every tick: the engine's snapshot, the events since
the last report and what the placement function needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

from modelconsole.scheduler.config import Config, demo_config, load_config, model_from_dict, with_demo_devices
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import EngineError
from modelconsole.server import ipc, rundir
from modelconsole.server.core import CoreServer
from modelconsole.server.ipc import InferAnswer, InferCall

from .link import ClusterLink, controller_link

log = logging.getLogger("modelconsole.cluster.core")


# The engine methods the controller calls on a node (besides register and swap, handled apart).
CONTROL_OPS = frozenset({"load", "unload", "evict", "pin", "set_priority", "set_split", "delete"})


def node_config(spec: dict[str, Any]) -> Config:
    """The config an engine core runs with: the operator's file (the same path on every node),
    or the demo zoo; ``spec["simulate"]`` simulates devices (tests, CPU-only demos)."""
    cfg = load_config(spec["config"]) if spec.get("config") else with_demo_devices(demo_config())
    if spec.get("simulate"):
        cfg = dataclasses.replace(cfg, gpu=dataclasses.replace(cfg.gpu, simulate=spec["simulate"]))
    return cfg


def error_wire(e: EngineError) -> dict[str, Any]:
    return {"error": {"kind": e.kind, "status": e.status, "message": e.message, "retry_after": e.retry_after}}


class NodeAway:
    """Where this node's core sends the calls of its local front ends that other nodes serve:
    a version this node does not hold (by the controller's routing table) goes through the
    fleet's ``ClusterLink`` (least outstanding holder, placement on a miss, one retry)."""

    def __init__(self, node_id: str, engine: Engine, link: ClusterLink):
        self.node_id = node_id
        self.engine = engine
        self.link = link

    def elsewhere(self, model: str, version: str | None) -> bool:
        known = self.link.table["models"].get(model)
        if known is None:
            return False  # unknown to the fleet (or not yet in the table): this engine answers it
        if version is not None or not known.get("routed"):
            try:
                if self.engine.instance(model, version).state == "READY":
                    return False  # held here (the table may not say so yet)
            except EngineError:
                return False  # this engine answers it (404)
        return self.node_id not in [n for n, _ in self.link.holders(model, version)]

    async def infer(self, call: InferCall) -> InferAnswer:
        return await self.link.infer(call)


class EngineCore:
    """The Ray actor (``ray.remote`` is applied by the controller, so importing this needs no Ray)."""

    def __init__(self, node_id: str, spec: dict[str, Any]):
        self.node_id = node_id
        self.spec = spec
        self.config = node_config(spec)
        self.engine: Engine | None = None
        self._seq = 0  # the last event sequence number reported
        self.started = time.time()
        self.local: CoreServer | None = None  # the local front ends' end (serve_local)
        self._link: ClusterLink | None = None
        self._dir: str | None = None
        cpus = spec.get("cpus")  # the benchmark pins each node's engine core to its own cores
        if cpus:
            os.sched_setaffinity(0, cpus)

    async def sync(self, state: dict[str, Any]) -> dict[str, Any]:
        """Start (once) with the controller's record: models, active versions, splits, pins."""
        if self.engine is None:
            engine = Engine.from_config(self.config, store=None)
            await engine.start()  # the versions come from the controller's record (apply), none from a file
            self.engine = engine
        await self.apply(state)
        return self.report()

    async def apply(self, state: dict[str, Any]) -> None:
        """Bring this core to the controller's record (idempotent)."""
        engine = self.engine
        assert engine is not None
        known = {(m["name"], m["version"]) for m in engine.snapshot_models()}
        cfg = self.config
        for raw in state["models"]:
            if (raw["name"], str(raw["version"])) not in known:
                await engine.register(model_from_dict(raw, "model", cfg.base_dir, cfg.model_roots, cfg.trust),
                                      actor="controller")
        for name, version in state.get("active", {}).items():
            engine.adopt_active(name, version)
        for name, split in state.get("splits", {}).items():
            try:
                await engine.set_split(name, split["weights"], shadow=split.get("shadow") or (),
                                       metric_output=split.get("metric_output"), actor="controller")
            except EngineError as e:
                log.warning("split of %s not applied on %s: %s", name, self.node_id, e.message)
        for name, version, pinned in state.get("pins", []):
            try:
                inst = engine.instance(name, version)
                if inst.pinned != pinned:
                    await engine.pin(name, version, pinned, actor="controller")
            except EngineError:
                pass

    async def call(self, frames: list[bytes]) -> list[bytes]:
        """Infer calls from a front end; the answers in one message."""
        calls = ipc.calls_of(ipc.unpack_calls(frames))
        answers = await asyncio.gather(*(self._one(c) for _, c in calls))
        return [bytes(f) for f in ipc.pack_answers([(i, a) for (i, _), a in zip(calls, answers)])]

    async def _one(self, call: Any) -> Any:
        if isinstance(call, EngineError):
            return call
        try:
            return await ipc.run_call(self.engine, call)
        except EngineError as e:
            return e
        except Exception:  # noqa: BLE001 - one call's failure, answered
            log.exception("unhandled error in an infer call for '%s'", call.model)
            return EngineError("internal error (logged by the engine core)")

    async def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One operator action on this node: the engine's answer, or its error as data."""
        engine = self.engine
        assert engine is not None
        try:
            if op == "register":
                cfg = self.config
                raw = model_from_dict(args["model"], "model", cfg.base_dir, cfg.model_roots, cfg.trust)
                return {"result": await engine.register(raw, actor=args["actor"])}
            if op == "swap":
                inst = engine.instance(args["name"], None)
                if inst.state == "READY":  # this node serves the old version: a hot swap here
                    return {"result": await engine.swap(args["name"], args["version"], actor=args["actor"])}
                engine.adopt_active(args["name"], args["version"])
                return {"result": {"name": args["name"], "to": args["version"], "loaded": False}}
            if op not in CONTROL_OPS:  # the controller's own calls only: nothing else is reachable
                raise EngineError(f"unknown control call {op!r}")
            return {"result": await getattr(engine, op)(**args)}
        except EngineError as e:
            return error_wire(e)

    def report(self) -> dict[str, Any]:
        """What the controller shows and places by: the snapshot, new events, free room."""
        engine = self.engine
        if engine is None:
            return {"node": self.node_id, "started": False}
        snap = engine.snapshot()
        events = [e.to_dict() for e in engine.events.recent if e.seq > self._seq]
        if events:
            self._seq = events[-1]["seq"]
        devices = snap["devices"]
        if devices:
            free = sum(max(0, d["budget"]["available_bytes"]) for d in devices)
        else:
            free = _host_free()
        keeps = [m["eviction"]["keep_value"] for m in snap["models"]
                 if m["eviction"] is not None and not m["pinned"]]
        # each version's recent latencies as a histogram: the fleet's percentiles merge every node's
        hists = {f"{m['name']}:{m['version']}": engine.instance(m["name"], str(m["version"])).stats.latency_hist()
                 for m in snap["models"] if m["stats"]["success"]}
        return {
            "node": self.node_id, "started": True, "pid": os.getpid(), "since": self.started,
            "snapshot": snap, "events": events, "free_bytes": free,
            "outstanding": sum(m["queue"] + m["in_flight"] for m in snap["models"]),
            "holds": sorted(f"{m['name']}:{m['version']}" for m in snap["models"] if m["state"] == "READY"),
            "cheapest_keep": min(keeps) if keeps else None,
            "latency_hists": hists,
        }

    async def serve_local(self, spin_us: float = 0.0) -> str:
        """Take this node's front-end processes over a Unix socket (once); its address."""
        if self.local is None:
            assert self.engine is not None, "serve_local before sync"
            self._link = controller_link()
            await self._link.start()
            self._dir = rundir.make_run_dir()  # 0700: only this user reaches the core
            self.local = CoreServer(self.engine, f"unix://{self._dir}/engine.sock", spin_us,
                                    away=NodeAway(self.node_id, self.engine, self._link))
            await self.local.start()
        return self.local.address

    async def close(self) -> None:
        if self.local is not None:
            await self.local.close()
        if self._link is not None:
            await self._link.close()
        if self.engine is not None:
            await self.engine.close()
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


def _host_free() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return 0

"""The fleet as one engine: what the controller's HTTP app serves.

``Fleet`` has the face of ``scheduler.engine.Engine`` that ``server/app.py``,
``api.py``, ``v2.py`` and ``metrics.py`` use (snapshot, events, the control
calls, ``instance``), so the control API, the V2 metadata and repository
calls, ``/metrics``, ``/v1/models`` and the event stream work on a fleet
unchanged, and the console attaches to it as to one host.

What it owns: the *registry* — an ``Engine`` that never loads a model, on the
controller's SQLite store, which validates and persists registrations,
active versions, splits, pins and priorities and keeps the audit log, exactly
as on one host, and restores them when the controller restarts.  Each change
is written there first, then applied to every engine core.

What it shows: the registry's versions, merged with what each node's engine
core last reported (``EngineCore.report``): a version is READY when some node
holds it READY, its counters are the nodes' sums, and ``replicas`` lists
every node's instances with the node named.  ``nodes`` is the fleet panel's
data.  ``latency_ms`` is computed over every node's recent requests at once,
from the latency histograms the nodes report (``stats.hist_percentiles``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import Conflict, InputError, ModelUnavailable, from_wire
from modelconsole.scheduler.events import EventBus, Subscription
from modelconsole.scheduler.memory import weights_estimate
from modelconsole.scheduler.stats import hist_percentiles, merge_hists
from modelconsole.scheduler.tensors import TensorSpec

from . import placement
from .canary import FleetCanaries

ADDITIVE = ("success", "fail", "inference_count", "execution_count", "queue_ms_total", "compute_ms_total",
            "request_ms_total", "cache_hits", "cache_misses", "throughput_rps", "error_rps")
STATE_ORDER = ("READY", "WARMING", "LOADING", "UNLOADING", "FAILED", "UNLOADED")


@dataclass
class Node:
    """One node as the controller knows it."""

    node: str
    address: str
    core: Any = None  # the engine core's actor handle
    frontend: Any = None
    frontend_url: str | None = None
    grpc_port: int | None = None  # its front end's KServe V2 gRPC port (None: no gRPC there)
    health: str = "starting"  # starting | ok | degraded (engine core up, no front end) | lost
    frontend_error: str | None = None  # why its front end could not start (the node is degraded)
    held: list[str] = field(default_factory=list)  # what a lost node held when it was lost
    lost_why: str | None = None  # why it was marked lost
    report: dict[str, Any] = field(default_factory=dict)
    seen: float = 0.0  # monotonic time of its last report
    rps: float = 0.0  # answered requests per second between its last two reports
    frontend_requests: list[tuple[str, str, float]] = field(default_factory=list)  # (protocol, code, count)
    _last: tuple[float, int] | None = None

    def take(self, report: dict[str, Any]) -> None:
        now = time.monotonic()
        answered = sum(m["stats"]["success"] for m in report.get("snapshot", {}).get("models", []))
        if self._last is not None and now > self._last[0]:
            self.rps = max(0.0, (answered - self._last[1]) / (now - self._last[0]))
        self._last = (now, answered)
        hists = report.get("latency_hists") or {}
        for m in report.get("snapshot", {}).get("models", []):
            m["latency_hist"] = hists.get(f"{m['name']}:{m['version']}", {})
        self.report, self.seen = report, now
        self.health = "degraded" if self.frontend_error else "ok"
        self.lost_why = None

    @property
    def serving(self) -> bool:
        """Its engine core serves (a degraded node's does: only its own front end is missing)."""
        return self.health in ("ok", "degraded")

    def lose(self, why: str = "") -> list[str]:
        """Mark it lost: it holds nothing from now on (what it held stays in ``held``)."""
        self.lost_why = why or None
        self.held = list(self.report.get("holds", []))
        self.report = {**self.report, "holds": [], "outstanding": 0}
        self.health = "lost"
        return self.held

    def view(self) -> placement.NodeView:
        r = self.report
        return placement.NodeView(self.node, self.serving, int(r.get("free_bytes", 0)),
                                  int(r.get("outstanding", 0)), frozenset(r.get("holds", ())),
                                  r.get("cheapest_keep"))

    def to_dict(self) -> dict[str, Any]:
        devices = self.report.get("snapshot", {}).get("devices", [])
        return {
            "node": self.node, "address": self.address, "health": self.health,
            "frontend": self.frontend_url, "grpc_port": self.grpc_port, "gpus": len(devices),
            "memory_used_bytes": sum(d["used_bytes"] for d in devices),
            "memory_total_bytes": sum(d["total_bytes"] for d in devices),
            "free_bytes": self.report.get("free_bytes", 0), "outstanding": self.report.get("outstanding", 0),
            "rps": self.rps, "holds": list(self.report.get("holds", [])), "held": list(self.held),
            "frontend_error": self.frontend_error,
            "report_age_s": time.monotonic() - self.seen if self.seen else None,
        }


def node_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """A version's config as an engine core takes it: in a fleet, ``replicas`` counts nodes (the
    controller spreads them, one per node: ``placement.place``), so each core holds one instance.
    Several GPUs of one machine serve as several nodes (one ``ray start --num-gpus 1`` each)."""
    out = {k: v for k, v in cfg.items() if k != "max_replicas"}
    out["replicas"] = 1
    return out


class _Backend:
    kind = "fleet"  # what metrics.py asks of a backend (GPU UUIDs are per node: not read here)


class FleetInstance:
    """A version as ``v2.py`` reads an instance: identity and config from the registry, state,
    tensors and devices from the nodes."""

    def __init__(self, registered: Any, merged: dict[str, Any]):
        self.name = registered.name
        self.version = registered.version
        self.cfg = registered.cfg
        self.state = merged["state"]
        self.reason = merged["reason"]
        self.platform = merged["platform"] or registered.platform
        self.device = None
        specs = merged["inputs"], merged["outputs"]
        self.inputs, self.outputs = (
            tuple(TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in x) if x else None for x in specs)
        self.replica_set = [_ReplicaView(r["state"]) for r in merged["replicas"]] or [_ReplicaView(self.state)]
        self.text_plan = getattr(registered, "text_plan", None)  # takes text: the metadata lists text


@dataclass
class _ReplicaView:
    state: str
    device: Any = None


class Fleet:
    def __init__(self, registry: Engine):
        self.registry = registry
        self.events = EventBus()
        self.nodes: dict[str, Node] = {}
        self.backend = _Backend()
        self._closing = False
        self.canaries = FleetCanaries(self)

    # ------------------------------------------------------------ what the app reads

    @property
    def accepting(self) -> bool:
        return not self._closing and any(n.serving for n in self.nodes.values())

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        return self.events.subscribe(maxsize)

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.serving]

    def _node_models(self) -> dict[tuple[str, str], list[tuple[str, dict[str, Any]]]]:
        out: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
        for n in self.live():
            for m in n.report.get("snapshot", {}).get("models", []):
                out.setdefault((m["name"], str(m["version"])), []).append((n.node, m))
        return out

    def node_model_snapshots(self) -> list[dict[str, Any]]:
        """Every live node's own picture of each version it knows, with ``node``: what the control
        plane's ``/metrics`` exposes, one series per node (``sum without (node)`` adds them up)."""
        return [dict(m, node=node) for held in self._node_models().values() for node, m in held]

    def frontend_request_counts(self) -> list[tuple[str, str, str, float]]:
        """(node, protocol, code, count): what each live node's front end answered, as of the
        controller's last tick (the control plane's ``modelconsole_frontend_requests_total``)."""
        return [(n.node, *c) for n in self.live() for c in n.frontend_requests]

    def snapshot_models(self, name: str | None = None) -> list[dict[str, Any]]:
        per_node = self._node_models()
        return [self._merge(reg, per_node.get((reg["name"], reg["version"]), []))
                for reg in self.registry.snapshot_models(name)]

    @staticmethod
    def _merge(reg: dict[str, Any], held: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """One version across the nodes (see the module docstring)."""
        m = dict(reg)
        if not held:
            m["replicas"] = []
            m["nodes"] = []
            return m
        snaps = [s for _, s in held]
        best = min(snaps, key=lambda s: STATE_ORDER.index(s["state"]) if s["state"] in STATE_ORDER else 99)
        busiest = max(snaps, key=lambda s: s["stats"]["success"])
        for key in ("state", "reason", "platform", "weight_bytes", "load_seconds", "loaded_at",
                    "load_source", "cuda_graphs", "eviction", "device_index", "inputs", "outputs"):
            m[key] = best[key]
        for key in ("footprint_bytes", "queue", "in_flight", "waiting_for_room", "request_rate"):
            m[key] = sum(s[key] for s in snaps)
        m["urgency"] = max(s["urgency"] for s in snaps)
        stats = dict(busiest["stats"])
        for key in ADDITIVE:
            if key in stats:
                stats[key] = sum(s["stats"].get(key) or 0 for s in snaps)
        failures: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for s in snaps:
            failures.update(s["stats"]["failures"])
            sizes.update({str(k): v for k, v in s["stats"]["batch_sizes"].items()})
        stats["failures"], stats["batch_sizes"] = dict(failures), dict(sizes)
        if len(snaps) > 1:  # percentiles over every node's requests, not one node's
            stats["latency_ms"] = hist_percentiles(merge_hists([s.get("latency_hist") or {} for s in snaps]))
        m["stats"] = stats
        m["replicas"] = [dict(r, node=node) for node, s in held for r in s["replicas"]]
        m["nodes"] = sorted({node for node, s in held if s["state"] == "READY"})
        # held, but on fewer nodes than its replicas (a node was lost): the controller places it again
        m["replicas_short"] = max(0, int((reg.get("config") or {}).get("replicas", 1)) - len(m["nodes"]))
        node = held[snaps.index(best)][0]
        m["device"] = f"{best['device']}@{node}"
        m["device_label"] = f"{best['device_label']}@{node[:8]}"
        return m

    def snapshot(self) -> dict[str, Any]:
        devices: list[dict[str, Any]] = []
        cache: Counter[str] = Counter()
        host: dict[str, Any] = {"entries": [], "bytes": 0, "max_bytes": 0, "hits": 0, "drops": 0}
        for n in self.live():
            snap = n.report.get("snapshot", {})
            for d in snap.get("devices", []):
                devices.append(dict(d, node=n.node, node_index=d["index"], index=len(devices)))
            cache.update(snap.get("cache", {}))
            t = snap.get("host_tier", {})
            host["entries"] += [f"{e}@{n.node}" for e in t.get("entries", [])]
            for k in ("bytes", "max_bytes", "hits", "drops"):
                host[k] += t.get(k, 0)
        return {"models": self.snapshot_models(), "cache": dict(cache), "devices": devices, "host_tier": host,
                "routing": {n: self.routing(n) for n in sorted(
                    set(self.registry.versions.snapshot()) | set(self.canaries.canaries))},
                "nodes": [n.to_dict() for n in sorted(self.nodes.values(), key=lambda n: n.node)]}

    def instance(self, name: str, version: str | None = None) -> FleetInstance:
        registered = self.registry.instance(name, version)  # ModelNotFound with the engine's message
        per_node = self._node_models().get((registered.name, registered.version), [])
        merged = self._merge(registered.snapshot(), per_node)
        return FleetInstance(registered, merged)

    async def audit_log(self, limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
        return await self.registry.audit_log(limit, model)

    def routing(self, name: str) -> dict[str, Any]:
        """The registry's routing, with the fleet canary and the arms summed over the nodes."""
        return self.canaries.routing(name)

    def placement_table(self) -> dict[str, Any]:
        """What front ends route by (``link.ClusterLink``)."""
        models: dict[str, Any] = {}
        per_node = self._node_models()
        routed = self.registry.versions.routed
        for reg in self.registry.snapshot_models():
            name, v = reg["name"], reg["version"]
            m = models.setdefault(name, {"versions": [], "active": None, "holders": {}, "routed": name in routed})
            m["versions"].append(v)
            if reg["active"]:
                m["active"] = v
            m["holders"][v] = [node for node, s in per_node.get((name, v), []) if s["state"] == "READY"]
        live = self.live()
        return {"models": models, "cores": {n.node: n.core for n in live},
                "outstanding": {n.node: int(n.report.get("outstanding", 0)) for n in live}}

    def place(self, name: str, version: str | None, exclude: list[str], count: int | None = None) -> list[str]:
        inst = self.registry.instance(name, version)
        need = weights_estimate(inst)  # estimate_mib, else from the source's size (the registry never loads)
        return placement.place(inst.key, need, [n.view() for n in self.nodes.values()],
                               count or inst.cfg.replicas, exclude)

    def absorb(self, node: Node, report: dict[str, Any]) -> None:
        """A node's report: its picture replaces the last one, its events join the fleet's."""
        node.take(report)
        for e in report.get("events", []):
            self.events.publish(e["kind"], f"[{node.node[:8]}] {e['message']}", model=e.get("model"),
                                version=e.get("version"), level=e.get("level", "info"),
                                data=dict(e.get("data") or {}, node=node.node))

    async def refresh(self, nodes: list[Node]) -> None:
        """Read these nodes' reports now (after a control call, so its answer shows the change)."""
        reports = await asyncio.gather(*(n.core.report.remote() for n in nodes), return_exceptions=True)
        for n, r in zip(nodes, reports):
            if not isinstance(r, BaseException):
                self.absorb(n, r)

    # ------------------------------------------------------------ control calls

    async def call_nodes(self, nodes: list[Node], op: str, args: dict[str, Any]) -> list[tuple[Node, dict[str, Any]]]:
        """One control call on each node's engine core, concurrently; each answer or error as data."""
        async def one(n: Node) -> dict[str, Any]:
            try:
                return await n.core.control.remote(op, args)
            except Exception as e:  # noqa: BLE001 - a node lost mid-call
                return {"error": {"kind": "unavailable", "status": 503, "message": f"node {n.node}: {e}",
                                  "retry_after": 1.0}}
        answers = await asyncio.gather(*(one(n) for n in nodes))
        await self.refresh(nodes)
        return list(zip(nodes, answers))

    def _nodes(self, node: str | None) -> list[Node]:
        if node is None:
            return self.live()
        n = self.nodes.get(node)
        if n is None or not n.serving:
            known = ", ".join(sorted(x.node for x in self.live())) or "none"
            raise InputError(f"node: expected the id of a live node ({known}), got {node!r}")
        return [n]

    @staticmethod
    def raise_first(answers: list[tuple[Node, dict[str, Any]]]) -> None:
        for n, a in answers:
            if "error" in a:
                e = a["error"]
                raise from_wire(e["kind"], e["status"], f"node {n.node}: {e['message']}", e.get("retry_after"))

    async def register(self, raw: Any, actor: str = "api") -> dict[str, Any]:
        snap = await self.registry.register(raw, actor=actor)
        await self.call_nodes(self.live(), "register", {"model": node_model(snap["config"]), "actor": actor})
        return snap

    async def load(self, name: str, version: str | None = None, actor: str = "api",
                   node: str | None = None) -> dict[str, Any]:
        inst = self.registry.instance(name, version)
        if node is None:
            targets = [self.nodes[n] for n in self.place(name, inst.version, [])]
        else:
            targets = self._nodes(node)
        if not targets:
            raise ModelUnavailable("no live node to load on", retry_after=1.0)
        answers = await self.call_nodes(targets, "load", {"name": name, "version": inst.version, "actor": actor})
        ok = [n.node for n, a in answers if "error" not in a]
        await self._audit(actor, "load", inst, answers)
        if not ok:
            self.raise_first(answers)
        self.events.publish("placed", f"{inst.key} loaded on {', '.join(ok)}", model=name, version=inst.version,
                            data={"nodes": ok, "actor": actor})
        return self._merge(inst.snapshot(), [(n.node, a["result"]) for n, a in answers if "error" not in a])

    async def _holders_do(self, op: str, name: str, version: str | None, actor: str,
                          node: str | None) -> dict[str, Any]:
        inst = self.registry.instance(name, version)
        nodes = self._nodes(node)
        if node is None:
            nodes = [n for n in nodes if inst.key in n.report.get("holds", ())]
        if not nodes and op == "evict":
            raise Conflict(f"{inst.key} is not loaded on any node")
        answers = await self.call_nodes(nodes, op, {"name": name, "version": inst.version, "actor": actor})
        await self._audit(actor, op, inst, answers)
        self.raise_first(answers)
        return self._merge(inst.snapshot(), [(n.node, a["result"]) for n, a in answers])

    async def unload(self, name: str, version: str | None = None, actor: str = "api",
                     node: str | None = None) -> dict[str, Any]:
        return await self._holders_do("unload", name, version, actor, node)

    async def evict(self, name: str, version: str | None = None, actor: str = "api",
                    node: str | None = None) -> dict[str, Any]:
        return await self._holders_do("evict", name, version, actor, node)

    async def pin(self, name: str, version: str | None = None, pinned: bool = True, actor: str = "api",
                  node: str | None = None) -> dict[str, Any]:
        """Stored in the registry (it survives a restart); applied where the version is held, and
        by the controller's tick wherever it is held later (``pin_drift``)."""
        inst = self.registry.instance(name, version)
        assert self.registry.store is not None  # the controller's registry always has its store
        await self.registry.store.set_pin(inst.name, inst.version, pinned, actor)
        inst.pinned = pinned
        nodes = [n for n in self._nodes(node) if node is not None or inst.key in n.report.get("holds", ())]
        answers = await self.call_nodes(nodes, "pin", {"name": name, "version": inst.version, "pinned": pinned,
                                                "actor": actor})
        self.events.publish("pinned" if pinned else "unpinned", f"{inst.key} {'pinned' if pinned else 'unpinned'}",
                            model=name, version=inst.version, data={"actor": actor})
        return self._merge(inst.snapshot(), [(n.node, a["result"]) for n, a in answers if "error" not in a])

    async def delete(self, name: str, version: str | None = None, actor: str = "api") -> dict[str, Any]:
        """The registry's delete (its refusals), refused too while any node holds the version (or,
        without one, any version of the name) or a fleet canary runs; then every node forgets it."""
        self.registry.instance(name, version)  # 404 with the engine's message
        what = f"model '{name}'" + (f" version {version}" if version is not None else "")
        held = sorted({n.node[:8] for n in self.live() for m in n.report.get("snapshot", {}).get("models", [])
                       if m["name"] == name and (version is None or m["version"] == version)
                       and m["state"] != "UNLOADED"})
        if held:
            raise Conflict(f"{what}: loaded on node {', '.join(held)}; unload it first")
        c = self.canaries.canaries.get(name)
        if c is not None and c.live:
            raise Conflict(f"{what}: a canary of version {c.version} is {c.state}")
        result = await self.registry.delete(name, version, actor=actor)
        await self.call_nodes(self.live(), "delete", {"name": name, "version": version, "actor": actor})
        return result

    async def set_priority(self, name: str, version: str | None, priority: Any, actor: str = "api") -> dict[str, Any]:
        snap = await self.registry.set_priority(name, version, priority, actor=actor)
        await self.call_nodes(self.live(), "set_priority", {"name": name, "version": snap["version"],
                                                     "priority": priority, "actor": actor})
        return snap

    async def swap(self, name: str, version: str | int, actor: str = "api") -> dict[str, Any]:
        """Cluster-wide: stored first; each node serving the old version hot-swaps there (load
        beside, switch, drain), the others switch their record."""
        started = time.monotonic()
        entry = self.registry.instance(name, None)
        v = str(version)
        new = self.registry.instance(name, v)
        if entry.version == new.version:
            raise Conflict(f"version: model '{name}' version {v} is already active")
        if name in self.registry.versions.routed:
            await self.registry.set_split(name, {}, actor=actor)
        assert self.registry.store is not None
        await self.registry.store.update_routing(name, actor, "swap", new.version,
                                                 {"from": entry.version, "to": new.version}, active=new.version)
        self.registry.adopt_active(name, new.version)
        answers = await self.call_nodes(self.live(), "swap", {"name": name, "version": new.version, "actor": actor})
        failed = [f"{n.node}: {a['error']['message']}" for n, a in answers if "error" in a]
        self.events.publish("swap_done", f"{name}: v{entry.version} -> v{new.version} on {len(answers)} node(s)"
                            + (f"; failed on {'; '.join(failed)}" if failed else ""), model=name,
                            version=new.version, level="error" if failed else "info", data={"actor": actor})
        return {"name": name, "from": entry.version, "to": new.version, "seconds": time.monotonic() - started,
                "nodes": [n.node for n, a in answers if "error" not in a], "failed": failed}

    async def set_split(self, name: str, weights: Any, *, shadow: Any = None, metric_output: str | None = None,
                        actor: str = "api") -> dict[str, Any]:
        routing = await self.registry.set_split(name, weights, shadow=shadow, metric_output=metric_output,
                                                actor=actor)
        await self.call_nodes(self.live(), "set_split", {"name": name, "weights": weights, "shadow": shadow,
                                                  "metric_output": metric_output, "actor": actor})
        return routing

    async def start_canary(self, name: str, version: str | int, **kw: Any) -> dict[str, Any]:
        """One ramp for the fleet, run by the controller (``canary.py``)."""
        return await self.canaries.start(name, version, **kw)

    async def stop_canary(self, name: str, actor: str = "api") -> dict[str, Any]:
        return await self.canaries.stop(name, actor)

    async def _audit(self, actor: str, action: str, inst: Any, answers: list[tuple[Node, dict[str, Any]]]) -> None:
        failed = [f"{n.node}: {a['error']['message']}" for n, a in answers if "error" in a]
        nodes = [n.node for n, a in answers if "error" not in a]
        if self.registry.store is not None:
            await self.registry.store.audit(actor, action, inst.name, inst.version, {"nodes": nodes},
                                            "error" if failed and not nodes else "ok",
                                            "; ".join(failed) if failed else None)

    def pin_drift(self) -> list[tuple[Node, str, str, bool]]:
        """(node, name, version, pinned) wherever a node holds a version READY with another pin than
        the registry's: a node that took a pinned version after the pin (a placement, a failover)
        is brought to it by the controller's next tick."""
        pinned = {(m["name"], m["version"]): m["pinned"] for m in self.registry.snapshot_models()}
        out = []
        for n in self.live():
            for m in n.report.get("snapshot", {}).get("models", []):
                want = pinned.get((m["name"], str(m["version"])))
                if want is not None and m["state"] == "READY" and m["pinned"] != want:
                    out.append((n, m["name"], str(m["version"]), want))
        return out

    def record(self) -> dict[str, Any]:
        """What a new or restarted engine core is brought to (``EngineCore.sync``)."""
        models: list[dict[str, Any]] = []
        active: dict[str, str] = {}
        pins: list[Any] = []
        for m in self.registry.snapshot_models():
            models.append(node_model(m["config"]))
            if m["active"]:
                active[m["name"]] = m["version"]
        routes = self.registry.versions.snapshot()
        splits = {n: {"weights": r.get("weights") or {}, "shadow": r.get("shadow") or [],
                      "metric_output": r.get("metric_output")} for n, r in routes.items() if r.get("weights")}
        return {"models": models, "active": active, "splits": splits, "pins": pins}

    async def close(self) -> None:
        self._closing = True
        await self.canaries.close()


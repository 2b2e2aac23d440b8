"""The fleet's controller: a named, detached Ray actor, the one owner of what the operator decided.

It holds the registry (``fleet.Fleet``: an engine that never loads, on the
SQLite store on the head node) and serves the control plane, an HTTP app with
the single host's API (``server/app.py`` on ``fleet.Fleet``), on
``[cluster] control_port``.  Every node's front end forwards everything but
infer there, so any node answers the whole API and ``--attach`` works on any
of them.

Its node loop (every ``TICK_S``) reads Ray's node list: a node that joins gets
an engine core (``core.EngineCore``, node affinity; on a cluster with GPU
nodes, only those) and a front end (``frontend.FrontEnd``), both detached and
named by node, so a restarted controller finds them again; then it reads each
engine core's report.  A node that leaves, or whose core stops answering, is
marked lost with a ``node_lost`` event naming what it held; front ends retry
its requests elsewhere (``link.py``), and its models are placed again on
their next request.

Ray restarts the controller when its process dies (``max_restarts=-1``): the
new one reopens the store (registrations, active versions, splits, pins,
priorities and the audit log come back) and starts on its first call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from modelconsole.gpu.devices import SimulatedBackend
from modelconsole.scheduler.config import GpuConfig
from modelconsole.scheduler.engine import Engine
from modelconsole.scheduler.errors import EngineError
from modelconsole.scheduler.store import Store
from modelconsole.server.app import Server, build_app
from modelconsole.server.web import LINK, ServerSettings, http_url

from . import rayenv
from .core import EngineCore, node_config
from .fleet import Fleet, Node
from .frontend import FrontEnd
from .link import ClusterLink

log = logging.getLogger("modelconsole.cluster.controller")

TICK_S = 0.5
REPORT_TIMEOUT_S = 10.0
FAILURE_SUMMARY_S = 60.0
PLACED_FOR_S = 10.0  # front ends that miss the same version together get the first one's placement
DRAIN_S = 60.0  # at shutdown, each node's front end, then its engine core, gets this long to drain


@dataclass(frozen=True)
class Failures:
    attempts: int
    since: float  # monotonic time of the first failure
    said: float  # monotonic time of the last event about it
    last: str  # the last failure's reason


def failure_report(state: Failures | None, now: float, why: str) -> tuple[str | None, Failures]:
    """What to say about a node that failed to come up again (None: nothing yet), and the new state.
    The first failure is said at once; repeats only as a summary every ``FAILURE_SUMMARY_S``."""
    if state is None:
        return f"could not be brought up: {why}; retrying", Failures(1, now, now, why)
    state = Failures(state.attempts + 1, state.since, state.said, why)
    if now - state.said < FAILURE_SUMMARY_S:
        return None, state
    return (f"still cannot be brought up: {state.attempts} attempts in {now - state.since:.0f} s; "
            f"the last: {why}"), Failures(state.attempts, state.since, now, why)


class Controller:
    """``spec``: config (path or None), simulate_gpu_size, store (path), control (ServerSettings
    fields for the control app), frontend (ServerSettings fields for each node's front end)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.fleet: Fleet | None = None
        self.server: Server | None = None
        self.url: str | None = None
        self._start: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._bringing: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, Failures] = {}  # nodes that could not be brought up, by id
        self._short: set[str] = set()  # versions ("name:version") a lost node held: replicas to restore
        self._placed: dict[str, tuple[list[str], float]] = {}  # a miss's placement, shared for a moment
        self._restoring: asyncio.Task[None] | None = None
        self._pinning: set[tuple[str, str, str]] = set()  # pins being applied to a node (pin_drift)
        self.restarted_at = time.time()

    # ------------------------------------------------------------ start

    async def _ensure(self) -> Fleet:
        if self._start is None:
            self._start = asyncio.get_running_loop().create_task(self._begin())
        await asyncio.shield(self._start)
        assert self.fleet is not None
        return self.fleet

    async def _begin(self) -> None:
        cfg = node_config({"config": self.spec.get("config")})
        # the registry: validates, stores and restores; it never loads (no devices, nothing calls a load)
        registry = Engine(Store(self.spec["store"]), model_roots=cfg.model_roots, base_dir=cfg.base_dir,
                          trust=cfg.trust, backend=SimulatedBackend([]), gpu=GpuConfig(default_device="cpu"),
                          cache_bytes=0, tick_s=3600.0)
        await registry.start(cfg.models)
        self.fleet = fleet = Fleet(registry)
        settings = ServerSettings(**self.spec["control"])
        app = build_app(fleet, settings)
        link = ClusterLink(self._table, self._place)  # this app's own infer calls (front ends have theirs)
        app[LINK] = link
        self.server = Server(fleet, settings, app=app)
        await self.server.start()
        await link.start()
        self.url = http_url(settings.host, self.server.port)
        fleet.events.publish("controller_started", f"controller started; control plane on {self.url}",
                             data={"url": self.url})
        await self._tick()
        await fleet.canaries.resume()
        self._loop = asyncio.get_running_loop().create_task(self._node_loop())

    # ------------------------------------------------------------ what front ends and the launcher call

    async def ready(self) -> dict[str, Any]:
        fleet = await self._ensure()
        return {"url": self.url, "restarted_at": self.restarted_at,
                "nodes": {n.node: {"health": n.health, "frontend": n.frontend_url, "grpc_port": n.grpc_port,
                                   "why": n.frontend_error or n.lost_why, "held": list(n.held)}
                          for n in fleet.nodes.values()}}

    async def table(self) -> dict[str, Any]:
        await self._ensure()
        return await self._table()

    async def place(self, name: str, version: str | None, exclude: list[str]) -> list[str]:
        """Where a version that no live node holds goes (a front end's miss): the nodes for its
        replicas, best first; the request goes to the first (its lazy load), the others load now."""
        await self._ensure()
        return await self._place(name, version, exclude)

    async def _table(self) -> dict[str, Any]:
        assert self.fleet is not None
        return self.fleet.placement_table()

    async def _place(self, name: str, version: str | None, exclude: list[str]) -> list[str]:
        fleet = self.fleet
        assert fleet is not None
        inst = fleet.registry.instance(name, version)
        recent = self._placed.get(inst.key)
        now = time.monotonic()
        if recent is not None and now - recent[1] < PLACED_FOR_S and not set(recent[0]) & set(exclude) \
                and all(n in fleet.nodes and fleet.nodes[n].serving for n in recent[0]):
            return recent[0]  # the same miss from another front end: one placement, one event
        nodes = fleet.place(name, version, exclude)
        if nodes:
            self._placed[inst.key] = (nodes, now)
            fleet.events.publish("placed", f"{inst.key} placed on {', '.join(nodes)}", model=name,
                                 version=inst.version, data={"nodes": nodes})
        if len(nodes) > 1:
            rest = [fleet.nodes[n] for n in nodes[1:]]
            asyncio.get_running_loop().create_task(
                fleet.call_nodes(rest, "load", {"name": name, "version": inst.version, "actor": "placement"}))
        return nodes

    async def shutdown(self) -> None:
        """Stop the fleet as one host stops: the front ends stop accepting and answer what they
        hold (the engine cores still serve it), then the engine cores finish what they queued and
        stop, then the actors go and the control plane closes."""
        import ray

        fleet = await self._ensure()
        if self._loop is not None:
            self._loop.cancel()
        nodes = list(fleet.nodes.values())
        for step in ("frontend", "core"):
            calls = [(n.frontend.stop if step == "frontend" else n.core.close).remote()
                     for n in nodes if getattr(n, step) is not None and n.health != "lost"]
            await asyncio.gather(*(asyncio.wait_for(c, DRAIN_S) for c in calls), return_exceptions=True)
        for n in nodes:
            for actor in (n.frontend, n.core):
                if actor is not None:
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
        await fleet.close()
        if self.server is not None:
            await self.server.stop()
        await fleet.registry.close()

    # ------------------------------------------------------------ nodes

    async def _node_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - one bad tick must not end the loop
                log.exception("node loop tick failed")

    async def _tick(self) -> None:
        fleet = self.fleet
        assert fleet is not None
        alive = {n["NodeID"]: n for n in rayenv.alive_nodes()}  # one quick GCS read
        gpu_nodes = {nid for nid, n in alive.items() if _gpus(n) or _sim_gpus(n)}
        for nid, info in alive.items():
            node = fleet.nodes.get(nid)
            if (node is None or node.health == "lost") and nid not in self._bringing:
                if gpu_nodes and nid not in gpu_nodes and node is None:
                    fleet.nodes[nid] = Node(nid, info.get("NodeManagerAddress", "?"), health="no GPUs")
                    continue
                if node is not None and node.health == "no GPUs":
                    continue
                task = asyncio.get_running_loop().create_task(self._bring_up(nid, info))
                self._bringing[nid] = task

                def brought(_: asyncio.Task[None], nid: str = nid) -> None:
                    self._bringing.pop(nid, None)

                task.add_done_callback(brought)
        for nid, node in list(fleet.nodes.items()):
            if node.serving and nid not in alive:
                self._lost(node, "the node left the cluster")
        ok = [n for n in fleet.nodes.values() if n.serving]
        reports = await asyncio.gather(*(asyncio.wait_for(n.core.report.remote(), REPORT_TIMEOUT_S)
                                         for n in ok), return_exceptions=True)
        for node, report in zip(ok, reports):
            if isinstance(report, BaseException):
                if rayenv.is_actor_gone(report) or isinstance(report, TimeoutError):
                    self._lost(node, f"its engine core stopped answering ({type(report).__name__})")
                continue
            fleet.absorb(node, report)
        await self._read_frontends(ok)
        if self._short and (self._restoring is None or self._restoring.done()):
            self._restoring = asyncio.get_running_loop().create_task(self._restore_replicas())
        for node, name, version, pinned in fleet.pin_drift():
            key = (node.node, name, version)
            if key not in self._pinning:
                self._pinning.add(key)
                pin = asyncio.get_running_loop().create_task(fleet.call_nodes(
                    [node], "pin", {"name": name, "version": version, "pinned": pinned, "actor": "controller"}))

                def pinned_done(_: asyncio.Task[Any], key: tuple[str, str, str] = key) -> None:
                    self._pinning.discard(key)

                pin.add_done_callback(pinned_done)

    async def _read_frontends(self, nodes: list[Node]) -> None:
        """What each node's front end answered (the control plane's /metrics); a front end that
        does not answer keeps its last counts (its node's health comes from its engine core)."""
        fronts = [n for n in nodes if n.frontend is not None and n.frontend_url]
        counts = await asyncio.gather(*(asyncio.wait_for(n.frontend.request_counts.remote(), REPORT_TIMEOUT_S)
                                        for n in fronts), return_exceptions=True)
        for node, c in zip(fronts, counts):
            if not isinstance(c, BaseException):
                node.frontend_requests = [tuple(x) for x in c]

    async def _bring_up(self, nid: str, info: dict[str, Any]) -> None:
        import ray

        fleet = self.fleet
        assert fleet is not None
        node = Node(nid, info.get("NodeManagerAddress", "?"))
        fleet.nodes[nid] = node
        gpus, sim = _gpus(info), _sim_gpus(info)
        core_spec = {"config": self.spec.get("config"), "cpus": self.spec.get("cpus", {}).get(nid)}
        options: dict[str, Any] = {"num_cpus": 0}
        if gpus:
            options["num_gpus"] = gpus  # every GPU of the node: its engine core places models on them
        if sim:
            options["resources"] = {"sim_gpu": sim}
            core_spec["simulate"] = f"{sim}x{self.spec.get('simulate_gpu_size', '8GiB')}"
        common = {"namespace": rayenv.NAMESPACE, "lifetime": "detached", "get_if_exists": True,
                  "scheduling_strategy": rayenv.node_affinity(nid), "max_restarts": 0}
        try:
            core: Any = ray.remote(EngineCore).options(name=rayenv.core_name(nid), **common, **options).remote(
                nid, core_spec)
            report = await core.sync.remote(fleet.record())
            node.core = core
            fleet.absorb(node, report)
        except Exception as e:  # noqa: BLE001 - the node stays lost; the next tick tries again
            node.health = "lost"
            self._failed(nid, f"its engine core could not start: {rayenv.cause(e)}")
            return
        settings = self.spec["frontend"]
        try:
            frontend: Any = ray.remote(FrontEnd).options(name=rayenv.frontend_name(nid), num_cpus=0, **common).remote(
                nid, {"settings": settings, "control_url": self.url, "grpc_port": self.spec.get("grpc_port"),
                      "workers": self.spec.get("workers", 0)})
            node.frontend = frontend
            started = await frontend.start.remote()
            node.frontend_url, node.grpc_port = started["url"], started["grpc_port"]
        except Exception as e:  # noqa: BLE001 - its engine core serves on; its front end is what failed
            if rayenv.is_actor_gone(e) and not isinstance(rayenv.cause(e), OSError):
                self._lost(node, f"it went away while its front end started ({type(e).__name__})")
                return
            where = f"{settings.get('host', '127.0.0.1')}:{settings.get('port', '?')}"
            node.frontend_error = f"its front end could not serve on {where}: {rayenv.cause(e)}"
            node.health = "degraded"
            log.error("node %s degraded: %s", nid[:8], node.frontend_error)
            fleet.events.publish("node_degraded", f"node {nid[:8]} ({node.address}) is degraded: "
                                 f"{node.frontend_error}; its engine core serves the other nodes' front ends",
                                 level="error", data={"node": nid, "reason": node.frontend_error})
            return
        self._failures.pop(nid, None)
        fleet.events.publish("node_joined", f"node {nid[:8]} ({node.address}) joined: engine core up, "
                             f"front end on {node.frontend_url}", data={"node": nid, "frontend": node.frontend_url})

    async def _restore_replicas(self) -> None:
        """Keep ``replicas`` true after a node loss: each version a lost node held that live nodes
        still hold, on fewer nodes than its replicas, is placed again on live nodes with room.  A
        version no live node holds is left to load on demand, as on a first request."""
        try:
            await self._restore_each()
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("restoring replicas failed")

    async def _restore_each(self) -> None:
        fleet = self.fleet
        assert fleet is not None
        for key in sorted(self._short):
            name, _, version = key.rpartition(":")
            try:
                inst = fleet.registry.instance(name, version)
            except EngineError:  # deleted since
                self._short.discard(key)
                continue
            holders = [n.node for n in fleet.live() if key in n.report.get("holds", ())]
            missing = inst.cfg.replicas - len(holders)
            if not holders or missing <= 0:
                self._short.discard(key)
                continue
            targets = [fleet.nodes[t] for t in fleet.place(name, version, holders, missing)]
            if not targets:
                continue  # no live node with room yet: the next tick asks again
            answers = await fleet.call_nodes(targets, "load", {"name": name, "version": version,
                                                                "actor": "controller"})
            ok = [n.node for n, a in answers if "error" not in a]
            if ok:
                fleet.events.publish("replica_restored", f"{key}: {len(ok)} replica(s) lost with a node placed "
                                     f"again on {', '.join(n[:8] for n in ok)} ({len(holders) + len(ok)} of "
                                     f"{inst.cfg.replicas})", model=name, version=version,
                                     data={"nodes": ok, "replicas": inst.cfg.replicas})

    def _failed(self, nid: str, why: str) -> None:
        """A node that could not be brought up: one event the first time, then a summary at most
        every ``FAILURE_SUMMARY_S`` while it keeps failing (the node loop retries every tick)."""
        assert self.fleet is not None
        now = time.monotonic()
        say, self._failures[nid] = failure_report(self._failures.get(nid), now, why)
        if say is not None:
            log.error("node %s: %s", nid[:8], say)
            self.fleet.events.publish("node_failed", f"node {nid[:8]} {say}", level="error",
                                      data={"node": nid, "attempts": self._failures[nid].attempts})

    def _lost(self, node: Node, why: str) -> None:
        held = node.lose(why)
        self._short.update(held)
        assert self.fleet is not None
        log.error("node %s (%s) lost: %s; it held %s", node.node[:8], node.address, why, ", ".join(held) or "nothing")
        self.fleet.events.publish(
            "node_lost", f"node {node.node[:8]} lost ({why}); it held {', '.join(held) or 'nothing'}: requests "
            "in flight there are retried on another node, its models are placed again on demand",
            level="error", data={"node": node.node, "held": held, "reason": why})


def _gpus(info: dict[str, Any]) -> int:
    return int(info.get("Resources", {}).get("GPU", 0))


def _sim_gpus(info: dict[str, Any]) -> int:
    return int(info.get("Resources", {}).get("sim_gpu", 0))

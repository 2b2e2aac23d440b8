"""A node's front end in the fleet: a Ray actor serving HTTP on that node.

The same front-end app as ``--workers`` (``server/frontend.py``): infer and
liveness here, decoded and encoded here; infer calls go to engine cores
through ``link.ClusterLink`` (least outstanding holder, placement on a miss,
one retry when a node dies); everything else is forwarded to the
controller's control plane (``server/proxy.py`` over TCP), so every node
answers the whole API.  With ``[server] grpc_port`` it serves KServe V2 over
gRPC too, through the same link.

With ``--workers N`` the actor serves nothing itself: it starts N front-end
processes (``server/workers.py``'s ``FrontEnds``, the ones ``--serve
--workers`` runs) on the node's port, and they reach the node's engine core
over the local transport (``EngineCore.serve_local``), which sends on what
other nodes hold.  The actor watches and drains them and sums their counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

from prometheus_client import CollectorRegistry

from modelconsole.server import metrics, rundir
from modelconsole.server.app import Server
from modelconsole.server.frontend import build_frontend_app
from modelconsole.server.proxy import ControlProxy
from modelconsole.server.tokenfile import is_loopback
from modelconsole.server.web import ServerSettings, http_url

from . import rayenv
from .link import ClusterLink, controller_link

log = logging.getLogger("modelconsole.cluster.frontend")


class FrontEnd:
    def __init__(self, node_id: str, spec: dict[str, Any]):
        self.node_id = node_id
        self.spec = spec
        self.url: str | None = None
        self.link: ClusterLink | None = None
        self.server: Server | None = None
        self.grpc: Any = None
        self.grpc_port: int | None = None
        # what this front end answered, by protocol and code: the control plane's /metrics shows it
        self.requests = metrics.frontend_requests(CollectorRegistry())
        self.processes: Any = None  # --workers N: the front-end processes (server/workers.py FrontEnds)
        self._dir: str | None = None
        self._counts: Any = None  # their counters (prometheus multiprocess files), summed

    async def start(self) -> dict[str, Any]:
        """Serve; where: ``{"url": HTTP URL, "grpc_port": port or None}``."""
        if self.url is not None:
            return {"url": self.url, "grpc_port": self.grpc_port}
        import ray

        settings = ServerSettings(**self.spec["settings"])
        if not is_loopback(settings.host):
            # --host names the head's address; every other node's front end binds its own
            settings = dataclasses.replace(settings, host=ray.util.get_node_ip_address())
        if self.spec.get("workers"):
            return await self._start_processes(settings, int(self.spec["workers"]))
        self.link = controller_link()
        await self.link.start()
        app = build_frontend_app(self.link, ControlProxy(base_url=self.spec["control_url"]), settings,
                                 self.requests)
        self.server = Server(None, settings, app=app)
        await self.server.start()
        self.url = http_url(settings.host, self.server.port)
        port = self.spec.get("grpc_port")
        if port is not None:  # KServe V2 over gRPC beside HTTP, through the same link (server/grpc_v2.py)
            from modelconsole.server.grpc_v2 import GrpcFrontEnd

            grpc = GrpcFrontEnd(self.link, ControlProxy(base_url=self.spec["control_url"]), settings, port,
                                self.requests)
            try:
                await grpc.start()
                self.grpc, self.grpc_port = grpc, grpc.port
            except OSError as e:  # the default port taken on this node: HTTP serves on, as --serve does
                log.warning("node %s: no gRPC front end: %s", self.node_id[:8], e)
        return {"url": self.url, "grpc_port": self.grpc_port}

    async def _start_processes(self, settings: ServerSettings, count: int) -> dict[str, Any]:
        """N front-end processes on this node's port, linked to its engine core (module docstring)."""
        import ray
        from prometheus_client.multiprocess import MultiProcessCollector

        from modelconsole.server.workers import FrontEnds

        core = ray.get_actor(rayenv.core_name(self.node_id), namespace=rayenv.NAMESPACE)
        address = await core.serve_local.remote(settings.ipc_spin_us)
        self._dir = rundir.make_run_dir()
        counts = os.path.join(self._dir, "metrics")
        os.mkdir(counts)
        # the default gRPC port taken on this node: HTTP serves on, as --serve does
        self.processes = FrontEnds(count, settings, address, {"control_url": self.spec["control_url"]}, counts,
                                   self._event, grpc_port=self.spec.get("grpc_port"), grpc_required=False)
        try:
            await self.processes.start()
        except BaseException:
            await self.stop()
            raise
        self._counts = CollectorRegistry()
        MultiProcessCollector(self._counts, path=counts)
        self.url, self.grpc_port = http_url(settings.host, self.processes.port), self.processes.grpc_port
        log.info("node %s: %d front-end processes on %s (pids %s)", self.node_id[:8], count, self.url,
                 " ".join(map(str, self.processes.pids)))
        return {"url": self.url, "grpc_port": self.grpc_port}

    def _event(self, kind: str, message: str, level: str) -> None:
        log.log(logging.WARNING if level != "info" else logging.INFO, "node %s: %s", self.node_id[:8], message)

    async def stop(self) -> None:
        """Drain, as one host's front end does: stop accepting, answer what is in flight (the
        engine cores still serve), then close the link."""
        if self.server is not None:
            await self.server.stop()
        if self.processes is not None:
            await self.processes.stop()
            self.processes = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self.link is not None:
            await self.link.close()

    def request_counts(self) -> list[tuple[str, str, float]]:
        """(protocol, code, count) of what this front end answered (the controller reads it each tick)."""
        if self._counts is not None:  # its processes' counters, summed
            return metrics.counter_values(self._counts)
        return metrics.counter_values(self.requests)

    def stats(self) -> dict[str, Any]:
        """What this front end's link knows: calls retried after a node loss, and the holders of each
        version in its routing table (tests wait on it instead of on the refresh period)."""
        link = self.link
        if link is None:
            return {"url": self.url, "grpc_port": self.grpc_port, "retried": 0, "holders": {}}
        return {"url": self.url, "grpc_port": self.grpc_port, "retried": link.retried,
                "holders": {name: m["holders"] for name, m in link.table["models"].items()}}

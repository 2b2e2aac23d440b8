"""A node's front end in the fleet: a Ray actor serving HTTP on that node.

The same front-end app as ``--workers`` (``server/frontend.py``): infer and
liveness here, decoded and encoded here; infer calls go to engine cores
through ``link.ClusterLink`` (least outstanding holder, placement on a miss,
one retry when a node dies); everything else is forwarded to the
controller's control plane (``server/proxy.py`` over TCP), so every node
answers the whole API.  With ``[server] grpc_port`` it serves KServe V2 over
gRPC too, through the same link.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from modelconsole.server import metrics
from modelconsole.server.app import Server, ServerSettings, http_url
from modelconsole.server.frontend import build_frontend_app
from modelconsole.server.proxy import ControlProxy
from modelconsole.server.tokenfile import is_loopback

from . import rayenv
from .link import ClusterLink

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

    async def start(self) -> dict[str, Any]:
        """Serve; where: ``{"url": HTTP URL, "grpc_port": port or None}``."""
        if self.url is not None:
            return {"url": self.url, "grpc_port": self.grpc_port}
        import ray

        controller = ray.get_actor(rayenv.CONTROLLER, namespace=rayenv.NAMESPACE)

        async def table() -> dict[str, Any]:
            return await controller.table.remote()

        async def place(name: str, version: str | None, exclude: list[str]) -> list[str]:
            return await controller.place.remote(name, version, exclude)

        settings = ServerSettings(**self.spec["settings"])
        if not is_loopback(settings.host):
            # --host names the head's address; every other node's front end binds its own
            settings = dataclasses.replace(settings, host=ray.util.get_node_ip_address())
        self.link = ClusterLink(table, place)
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

    async def stop(self) -> None:
        """Drain, as one host's front end does: stop accepting, answer what is in flight (the
        engine cores still serve), then close the link."""
        if self.server is not None:
            await self.server.stop()
        if self.link is not None:
            await self.link.close()

    def request_counts(self) -> list[tuple[str, str, float]]:
        """(protocol, code, count) of what this front end answered (the controller reads it each tick)."""
        return metrics.counter_values(self.requests)

    def stats(self) -> dict[str, Any]:
        """What this front end's link knows: calls retried after a node loss, and the holders of each
        version in its routing table (tests wait on it instead of on the refresh period)."""
        link = self.link
        if link is None:
            return {"url": self.url, "grpc_port": self.grpc_port, "retried": 0, "holders": {}}
        return {"url": self.url, "grpc_port": self.grpc_port, "retried": link.retried,
                "holders": {name: m["holders"] for name, m in link.table["models"].items()}}

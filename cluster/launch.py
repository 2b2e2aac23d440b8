"""``modelconsole --serve --cluster ray[://ADDRESS]|local:N``: join the Ray cluster (or start N
loopback nodes here, ``local.py``), start (or find) the controller, say where the control plane and
each node's front end listen and when a node is lost or degraded, stay until a signal.

The controller and the node actors are detached: they belong to the Ray cluster, not to this
process.  SIGINT or SIGTERM here stops the fleet (``Controller.shutdown``); if this process dies
instead, the fleet keeps serving and the next ``--serve --cluster`` finds it again (a ``local:N``
fleet goes with its nodes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any

from modelconsole.server import tokenfile

from . import local, rayenv
from .controller import Controller

log = logging.getLogger("modelconsole.cluster")

WATCH_S = 2.0


def controller_spec(config: Any, settings: Any, store_path: str, *, simulate_gpu_size: str = "8GiB",
                    cpus: dict[str, list[int]] | None = None, workers: int = 0) -> dict[str, Any]:
    """What the controller starts with: the config file (the same path on every node), the store on
    the head, the control plane's and the front ends' server settings; ``workers``: front-end
    processes per node (0: the node's front-end actor serves HTTP itself)."""
    base = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("unix_path", "reuse_port")}
    cluster = config.cluster
    control = dict(base, port=cluster.control_port)
    frontend = dict(base, port=cluster.frontend_port if cluster.frontend_port is not None else settings.port,
                    token_dir=None)
    return {"config": str(Path(config.path).resolve()) if config.path else None, "store": store_path,
            "control": control, "frontend": frontend, "grpc_port": config.server.grpc_port,
            "simulate_gpu_size": simulate_gpu_size, "cpus": cpus or {}, "workers": workers}


def start_controller(spec: dict[str, Any]) -> Any:
    """The fleet's controller: created on this node (its store is here) or found by name."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(Controller).options(
        name=rayenv.CONTROLLER, namespace=rayenv.NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, scheduling_strategy=rayenv.node_affinity(here),
    ).remote(spec)


async def wait_for_nodes(controller: Any, count: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """The controller's ``ready`` answer once ``count`` nodes have a front end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        info = await controller.ready.remote()
        up = [n for n in info["nodes"].values() if n["health"] == "ok" and n["frontend"]]
        if len(up) >= count:
            return info
        if loop.time() > deadline:
            raise TimeoutError(f"{len(up)} of {count} nodes came up within {timeout_s:.0f}s: {info['nodes']}")
        await asyncio.sleep(0.2)


async def serve(config: Any, settings: Any, store_path: str, address: str, *, workers: int = 0) -> int:
    """Run the fleet on the cluster at ``address`` (``ray``, ``ray://HOST:PORT``, or ``local:N``:
    N loopback nodes started here and stopped with the fleet) until SIGINT or SIGTERM."""
    nodes = local.node_count(address)
    here = local.LocalCluster(nodes) if nodes is not None else None
    if here is not None:
        gcs = here.start()  # before anything else runs here (Ray wants the main thread)
        log.info("local fleet: %d Ray nodes on 127.0.0.1 (GCS %s)", nodes, gcs)
    else:
        gcs = rayenv.gcs_address(address)
    try:
        rayenv.connect(gcs)
        return await _serve(config, settings, store_path, workers)
    finally:
        if here is not None:
            import ray

            ray.shutdown()
            here.stop()


async def _serve(config: Any, settings: Any, store_path: str, workers: int) -> int:
    spec = controller_spec(config, settings, store_path, workers=workers)
    controller = start_controller(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    info = await controller.ready.remote()
    log.info("modelconsole fleet: control plane on %s (store %s on the head)", info["url"], store_path)
    shown: dict[str, tuple[str, str | None]] = {}
    token_dir = Path(store_path).resolve().parent if settings.token and store_path != ":memory:" else None
    while not stop.is_set():
        for node, n in info["nodes"].items():
            if shown.get(node) != (n["health"], n["frontend"]):
                shown[node] = (n["health"], n["frontend"])
                _say(node, n)
                if n["frontend"] and token_dir is not None:
                    host, port = n["frontend"].split("//")[1].rsplit(":", 1)
                    if tokenfile.is_loopback(host):
                        tokenfile.write_token(token_dir, int(port), settings.token)
        try:
            await asyncio.wait_for(stop.wait(), WATCH_S)
        except TimeoutError:
            pass
        info = await controller.ready.remote()
    log.info("stopping the fleet")
    await controller.shutdown.remote()
    import ray

    ray.kill(controller, no_restart=True)
    return 0


def _say(node: str, n: dict[str, Any]) -> None:
    """One serve-log line for a node whose health or front end changed."""
    if n["health"] == "lost":
        log.error("node %s lost: %s; it held %s", node[:8], n.get("why") or "?", ", ".join(n.get("held") or [])
                  or "nothing")
    elif n["health"] == "degraded":
        log.warning("node %s degraded: %s", node[:8], n.get("why") or "no front end")
    elif n["frontend"]:
        grpc = f", gRPC on port {n['grpc_port']}" if n.get("grpc_port") else ""
        log.info("node %s: front end on %s%s", node[:8], n["frontend"], grpc)

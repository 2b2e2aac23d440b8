"""Ray, as modelconsole uses it: names, the connection, and a loopback-only environment.

Ray gives the fleet node discovery, placement by node affinity, the
controller's restarts and health; requests never ride Ray's own HTTP proxy
(docs/cluster.md says why).  Only this package imports ``ray``, and lazily:
``pip install 'modelconsole[cluster]'`` brings it.

Ray moves our own objects between our own processes with its serializer
(pickle inside the cluster's trust boundary).  What a client sends never
becomes a Python object that way: infer calls travel as ``server/ipc.py``
frames (``bytes``), and control calls as JSON-able dicts the receiving side
checks again.
"""

from __future__ import annotations

import os
import socket
from typing import Any

NAMESPACE = "modelconsole"
CONTROLLER = "modelconsole-controller"


def core_name(node_id: str) -> str:
    return f"modelconsole-core-{node_id}"


def frontend_name(node_id: str) -> str:
    return f"modelconsole-frontend-{node_id}"


def gcs_address(setting: str) -> str:
    """``[cluster] ray_address`` as ``ray.init`` takes it: "ray" joins the cluster this machine
    belongs to (``ray start`` ran here: "auto"); "ray://HOST:PORT" is the head's GCS address."""
    if setting == "ray":
        return "auto"
    if setting.startswith("ray://"):
        return setting[len("ray://"):]
    raise ValueError(f'cluster: expected "ray" or "ray://HOST:PORT", got {setting!r}')


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment for a Ray cluster that binds and connects on 127.0.0.1 only (tests, CI,
    benchmarks; scale-out.md): without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray reaches itself
    through the machine's external address even when told 127.0.0.1, and two metrics ports
    default to fixed numbers."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def apply_loopback_env() -> None:
    for k, v in loopback_env().items():
        os.environ.setdefault(k, v)


def connect(address: str) -> Any:
    """Join the Ray cluster at ``address`` (``gcs_address``'s answer) as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    return ray


def node_affinity(node_id: str) -> Any:
    """Scheduling that puts an actor on that node and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_actor_gone(e: BaseException) -> bool:
    """A call failed because its actor (or the actor's node) is gone, not because of the call."""
    from ray import exceptions as rx

    return isinstance(e, (rx.RayActorError, rx.ActorUnavailableError, rx.ActorDiedError))


def cause(e: BaseException) -> BaseException | str:
    """The error behind a Ray task's failure (a RayTaskError wraps what the actor raised)."""
    inner = getattr(e, "cause", None)
    return inner if isinstance(inner, BaseException) else (str(e).strip().splitlines() or [type(e).__name__])[-1]

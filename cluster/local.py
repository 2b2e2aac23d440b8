"""``--cluster local:N``: a fleet of N Ray nodes on this machine, loopback only, for trying
and testing a fleet without setting up Ray (docs/cluster.md).

Every Ray process binds and connects on 127.0.0.1 (``rayenv.loopback_env``, set before Ray
is imported), the dashboard is off, and the nodes go away with the process that started them.
Each node gets a share of the machine's cores and one GPU: a real one (node i sees GPU i)
where the machine has at least N, else a simulated one (``sim_gpu``).
"""

from __future__ import annotations

import os
import re
from typing import Any

from . import rayenv

MAX_NODES = 16


def node_count(address: str) -> int | None:
    """N of ``local:N``; None for any other address."""
    m = re.fullmatch(r"local:(\d{1,3})", address)
    return int(m.group(1)) if m else None


def node_args(index: int, nodes: int, cores: int, gpus: int) -> dict[str, Any]:
    """What node ``index`` of a ``local:nodes`` fleet starts with (pure: the test reads it)."""
    args: dict[str, Any] = {"num_cpus": max(1, cores // nodes), "node_ip_address": "127.0.0.1"}
    if gpus >= nodes:
        args["num_gpus"] = 1
    else:
        args["resources"] = {"sim_gpu": 1}
    if index == 0:
        args["include_dashboard"] = False
    return args


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: simulated GPUs
        return 0


class LocalCluster:
    """N Ray nodes started by this process (``ray.cluster_utils.Cluster``)."""

    def __init__(self, nodes: int) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"--cluster local:N: expected N from 1 to {MAX_NODES}, got {nodes}")
        self.nodes = nodes
        self._cluster: Any = None

    def start(self) -> str:
        """Start the nodes; the head's GCS address (``ray.init`` takes it)."""
        rayenv.apply_loopback_env()
        from ray.cluster_utils import Cluster

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        gpus = _cuda_devices()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cluster = None
        try:
            for i in range(self.nodes):
                args = node_args(i, self.nodes, cores, gpus)
                if "num_gpus" in args:  # the node's raylet sees its own GPU (inherited by its workers)
                    os.environ["CUDA_VISIBLE_DEVICES"] = str(i)
                if cluster is None:
                    cluster = self._cluster = Cluster(initialize_head=True, head_node_args=args)
                else:
                    cluster.add_node(**args)
        finally:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        assert cluster is not None
        return cluster.address

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

"""``modelconsole --serve --cluster local:N``: a fleet of N Ray nodes on this machine, loopback
only, started and stopped with one command (a real Ray cluster, the real CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
import sys

import pytest

from modelconsole.cluster import local
from modelconsole.scheduler.config import ConfigError, cluster_address

TOKEN = "local-fleet-token"
CONFIG = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0
replicas = 2

[server]
grpc_port = "off"
"""
ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


def test_local_addresses_are_checked():
    assert cluster_address("--cluster", "local:2") == "local:2"
    for bad in ("local:0", "local:17", "local:x", "local:", "local:2:3"):
        with pytest.raises(ConfigError, match='"local:N" \\(N from 1 to 16\\)'):
            cluster_address("--cluster", bad)
    assert local.node_count("local:3") == 3 and local.node_count("ray") is None


def test_each_local_node_gets_a_share_of_the_cores_and_a_gpu():
    # no GPUs: a simulated one each; the dashboard off on the head
    head, other = local.node_args(0, 2, cores=8, gpus=0), local.node_args(1, 2, cores=8, gpus=0)
    assert head == {"num_cpus": 4, "node_ip_address": "127.0.0.1", "resources": {"sim_gpu": 1},
                    "include_dashboard": False}
    assert other == {"num_cpus": 4, "node_ip_address": "127.0.0.1", "resources": {"sim_gpu": 1}}
    # a GPU for every node: a real one each; at least one core each
    assert local.node_args(2, 4, cores=2, gpus=4) == {"num_cpus": 1, "node_ip_address": "127.0.0.1", "num_gpus": 1}


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


async def test_serve_cluster_local_starts_a_loopback_fleet_serves_on_every_node_and_stops_it(tmp_path):
    pytest.importorskip("ray")
    import aiohttp
    import psutil

    (tmp_path / "fleet.toml").write_text(CONFIG)
    env = dict(os.environ, MODELCONSOLE_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "modelconsole.console", "--serve", "--cluster", "local:2", "--config",
           str(tmp_path / "fleet.toml"), "--store", str(tmp_path / "fleet.db"), "--port", "0"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                start_new_session=True)
    lines: list[str] = []

    async def read_until(pred) -> str:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 180)).decode()
            assert line, "the process ended:\n" + "".join(lines)
            lines.append(line)
            if pred(line):
                return line

    try:
        await read_until(lambda ln: "local fleet: 2 Ray nodes on 127.0.0.1" in ln)
        fronts = []
        while len(fronts) < 2:
            line = await read_until(lambda ln: "front end on" in ln)
            fronts.append(line.split("front end on ")[1].split(",")[0].strip())
        async with aiohttp.ClientSession() as s:
            for url in fronts:  # every node answers; replicas = 2 puts tiny on both
                async with s.post(f"{url}/v2/models/tiny/infer", json=ROW) as r:
                    assert r.status == 200, await r.text()
            async with s.get(f"{fronts[0]}/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                snap = await r.json()
        assert sorted(n["health"] for n in snap["nodes"]) == ["ok", "ok"]
        # every process of the fleet (Ray's included) listens on loopback only
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = []
        for p in tree:
            try:
                listening += [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        assert len(tree) > 5 and listening
        assert all(_loopback(ip) for ip in listening), listening
        # SIGTERM stops the fleet and its nodes: nothing of it is left running
        proc.send_signal(signal.SIGTERM)
        await read_until(lambda ln: "stopping the fleet" in ln)
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        gone, alive = psutil.wait_procs(tree[1:], timeout=60)
        assert not alive, [p.name() for p in alive]
    finally:  # a failed run leaves no Ray process behind for the next test
        if proc.returncode is None or _session_left(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def _session_left(sid: int) -> bool:
    """Any process left of the session the fleet was started in."""
    import psutil

    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                return True
    return False

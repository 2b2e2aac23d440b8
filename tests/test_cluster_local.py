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
from waiting import until

from modelconsole.cluster import local
from modelconsole.scheduler.config import ConfigError, cluster_address

TOKEN = "local-fleet-token"
CONFIG = """
[[models]]
name = "tiny"
source = "zoo:tiny-mlp"
warmup = 0
replicas = 2

[[models]]
name = "solo"
source = "zoo:tiny-mlp"
warmup = 0

[[models]]
name = "slow"
source = "zoo:tiny-mlp"
warmup = 0
max_queue_delay_ms = 2000
max_batch_size = 256

[server]
grpc_port = "off"
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}
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


async def test_serve_cluster_local_with_front_end_processes_serves_every_model_on_every_node(tmp_path):
    """``--serve --cluster local:2 --workers 2``: two loopback Ray nodes, each with two front-end
    processes on its port over the local transport to its engine core; a version held on one
    node only is served through the other node's port too; SIGTERM drains and stops it all."""
    pytest.importorskip("ray")
    import aiohttp
    import psutil

    (tmp_path / "fleet.toml").write_text(CONFIG)
    env = dict(os.environ, MODELCONSOLE_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "modelconsole.console", "--serve", "--cluster", "local:2", "--workers", "2",
           "--config", str(tmp_path / "fleet.toml"), "--store", str(tmp_path / "fleet.db"), "--port", "0"]
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
        fronts = {}
        while len(fronts) < 2:
            line = await read_until(lambda ln: "front end on" in ln)
            fronts[line.split("node ")[1].split(":")[0]] = line.split("front end on ")[1].split(",")[0].strip()
        urls = list(fronts.values())
        async with aiohttp.ClientSession() as s:
            # replicas = 2: held on both nodes; a node's front ends use their own engine core
            async with s.post(f"{urls[0]}/api/models/tiny/load", json={}, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                assert len((await r.json())["nodes"]) == 2
            for _ in range(10):
                async with s.post(f"{urls[0]}/v2/models/tiny/infer", json=ROW) as r:
                    assert r.status == 200, await r.text()
            # held on one node only: both nodes' ports serve it (the other core sends it on)
            async with s.post(f"{urls[0]}/api/models/solo/load", json={}, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                holder = (await r.json())["nodes"]
            assert len(holder) == 1
            for url in urls:
                for _ in range(3):
                    async with s.post(f"{url}/v2/models/solo/infer", json=ROW) as r:
                        assert r.status == 200, await r.text()
            models = await _until_served(s, urls[0], {"tiny": 10, "solo": 6})  # as the nodes last reported
            tiny = {r["node"][:8]: r["served"] for r in models["tiny"]["replicas"]}
            first = next(iter(fronts))
            assert tiny[first] == 10 and sum(tiny.values()) == 10, tiny  # all on the local core
            solo = {r["node"]: r["served"] for r in models["solo"]["replicas"]}
            assert solo[holder[0]] == 6 and sum(solo.values()) == 6, solo  # the other node's 3 sent on
            # every process of the fleet, front ends included, listens on loopback only
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            assert sum("modelconsole.server.frontend" in " ".join(p.cmdline()) for p in tree) == 4
            listening = []
            for p in tree:
                try:
                    listening += [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            assert listening and all(_loopback(ip) for ip in listening), listening
            # in flight when the signal comes (slow's batches wait 2 s in the queue): all answered
            async with s.post(f"{urls[1]}/v2/models/slow/infer", json=ROW) as r:
                assert r.status == 200, await r.text()  # loaded somewhere
            traffic = [asyncio.ensure_future(s.post(f"{urls[i % 2]}/v2/models/slow/infer", json=ROW))
                       for i in range(6)]
            await _until_queued(s, urls[0], "slow", 6)
            proc.send_signal(signal.SIGTERM)
            await read_until(lambda ln: "stopping the fleet" in ln)
            answers = await asyncio.wait_for(asyncio.gather(*traffic, return_exceptions=True), 120)
        assert [a if isinstance(a, BaseException) else a.status for a in answers] == [200] * 6
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        gone, alive = psutil.wait_procs(tree[1:], timeout=60)
        assert not alive, [p.name() for p in alive]
    finally:  # a failed run leaves no Ray process behind for the next test
        if proc.returncode is None or _session_left(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def _until_served(session, url, counts):
    """The snapshot's models once the nodes' reports count these answers per model."""
    async def served():
        async with session.get(f"{url}/api/snapshot", headers=AUTH) as r:
            models = {m["name"]: m for m in (await r.json())["models"]}
        done = all(sum(x["served"] for x in models[n]["replicas"]) >= c for n, c in counts.items())
        return models if done else None

    return await until(served, f"the nodes reporting {counts} answers", 60)


async def _until_queued(session, url, name, n):
    """The fleet's own count of requests queued or running for ``name`` reaches ``n``."""
    async def queued():
        async with session.get(f"{url}/api/snapshot", headers=AUTH) as r:
            m = next(m for m in (await r.json())["models"] if m["name"] == name)
        return m["queue"] + m["in_flight"] >= n

    await until(queued, f"{n} requests queued for {name}", 60)


def _session_left(sid: int) -> bool:
    """Any process left of the session the fleet was started in."""
    import psutil

    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                return True
    return False
